"""Keeps the daemon and the edge running: as systemd user units, as launchd agents, or under a
detached keeper process where neither exists (containers). One Supervisor API over all three;
`python -m halton_meter.lifecycle.supervise --home HOME` is the keeper itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import plistlib
import re
import select
import shlex
import shutil
import signal
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from halton_meter.config import Settings, make_private_dir, resolve_home

log = logging.getLogger("halton_meter.lifecycle.supervise")  # also when run as __main__

SERVICES = ("daemon", "edge")  # start order; stop in reverse
KINDS = ("systemd", "launchd", "detached")
OVERRIDE_ENV = "HALTON_METER_SUPERVISOR"
KEEPER_MODULE = "halton_meter.lifecycle.supervise"
TOOL_TIMEOUT_S = 10.0     # one systemctl / launchctl call
DETECT_TIMEOUT_S = 3.0    # `systemctl --user show-environment` hangs when the bus is wedged
READY_TIMEOUT_S = 10.0    # start/restart/stop wait this long for the keeper and its services
TERM_GRACE_S = 5.0        # a service gets this long after SIGTERM before SIGKILL
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0     # a service up this long starts its backoff over
DESCRIPTIONS = {"daemon": "metering daemon (interception and the ledger)",
                "edge": "always-on local proxy listener"}
NOT_INSTALLED_FIX = "Run `halton-meter start` to install and start them."


@dataclass(frozen=True)
class ServiceState:
    name: str          # "edge" | "daemon"
    installed: bool    # unit / plist / stored command present
    running: bool
    pid: int | None
    detail: str        # one human line


class SupervisorError(Exception):
    """Supervision failed; the message says what failed and the command that fixes it."""


def service_commands(settings: Settings, edge_port: int, api_port: int) -> dict[str, list[str]]:
    """The argv of each long-running process of one installation."""
    base = [sys.executable, "-m", "halton_meter", "--home", str(settings.home)]
    return {"daemon": [*base, "daemon", "--api-port", str(api_port)],
            "edge": [*base, "edge", "--port", str(edge_port)]}


def detect() -> str:
    """The supervisor this machine offers; $HALTON_METER_SUPERVISOR overrides (containers, tests)."""
    forced = os.environ.get(OVERRIDE_ENV, "").strip()
    if forced:
        if forced.lower() not in KINDS:
            raise SupervisorError(
                f"{OVERRIDE_ENV}={forced!r} is not a supervisor. "
                f"Set it to one of {', '.join(KINDS)}, or unset it to detect one.")
        return forced.lower()
    if sys.platform.startswith("linux") and _has_user_manager():
        return "systemd"
    if sys.platform == "darwin":
        return "launchd"
    return "detached"


def supervisor_for(kind: str, settings: Settings,
                   commands: dict[str, list[str]] | None = None) -> Supervisor:
    classes = {"systemd": SystemdSupervisor, "launchd": LaunchdSupervisor, "detached": DetachedSupervisor}
    if kind not in classes:
        raise SupervisorError(f"{kind!r} is not a supervisor. Use one of {', '.join(KINDS)}.")
    return classes[kind](settings, commands)


def installed_commands(settings: Settings) -> dict[str, list[str]] | None:
    """The argv per service the last install stored, or None when nothing is installed."""
    data = _stored(settings)
    return data and data["commands"]


def installed_kind(settings: Settings) -> str | None:
    """Which supervisor the last install used ("systemd", ...), or None."""
    data = _stored(settings)
    return data and data["kind"]


def service_environment(settings: Settings) -> dict[str, str]:
    """Environment every service runs with, whichever supervisor starts it."""
    env = {"HALTON_METER_HOME": str(settings.home), "PYTHONUNBUFFERED": "1"}
    root = _checkout_root()
    if root is not None:
        env["PYTHONPATH"] = root
    return env


def keeper_command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", KEEPER_MODULE, "--home", str(Path(settings.home).resolve())]


class Supervisor:
    """Install, start, stop and inspect the services; subclasses speak to one supervisor each."""

    kind = "base"

    def __init__(self, settings: Settings, commands: dict[str, list[str]] | None = None) -> None:
        self.settings = settings
        self._commands = _checked(commands) if commands is not None else None

    def install(self, commands: dict[str, list[str]]) -> list[str]:
        raise NotImplementedError

    def uninstall(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> list[str]:
        """Start whatever is not running (installing first when given commands); running -> []."""
        if not self.is_installed():
            return self.install(self._given_commands())
        return self._start()

    def stop(self, services: Iterable[str] = SERVICES) -> list[str]:
        """Stop these services (default both), the edge before the daemon; stopped -> []."""
        wanted = set(services)
        if not wanted <= set(SERVICES):
            raise SupervisorError(f"Unknown service {sorted(wanted - set(SERVICES))}: "
                                  f"use {' or '.join(SERVICES)}.")
        return self._stop([service for service in reversed(SERVICES) if service in wanted])

    def restart(self) -> list[str]:
        """Restart the daemon, then the edge: the edge keeps clients served while the daemon is down."""
        if not self.is_installed():
            return self.install(self._given_commands())
        return self._restart()

    def status(self) -> dict[str, ServiceState]:
        raise NotImplementedError

    def is_installed(self) -> bool:
        raise NotImplementedError

    def log_hint(self, service: str) -> str:
        return str(self.settings.log_dir / f"{service}.log")

    def _start(self) -> list[str]:
        raise NotImplementedError

    def _restart(self) -> list[str]:
        raise NotImplementedError

    def _stop(self, services: list[str]) -> list[str]:
        raise NotImplementedError

    @property
    def commands_path(self) -> Path:
        return self.settings.run_dir / "services.json"

    def _given_commands(self) -> dict[str, list[str]]:
        if self._commands is None:
            raise SupervisorError(f"halton-meter's services are not installed for {self.settings.home}. "
                                  + NOT_INSTALLED_FIX)
        return self._commands

    def _persist(self, commands: dict[str, list[str]]) -> bool:
        """Store the commands so a later process with only the settings can manage the services."""
        data = json.dumps({"kind": self.kind, "commands": commands}, indent=2) + "\n"
        return _write_if_changed(self.commands_path, data.encode(), 0o600)


# --- systemd ----------------------------------------------------------------------------------

class SystemdSupervisor(Supervisor):
    kind = "systemd"

    def __init__(self, settings: Settings, commands: dict[str, list[str]] | None = None) -> None:
        super().__init__(settings, commands)
        config_home = os.environ.get("XDG_CONFIG_HOME", "")
        base = Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config"
        self.unit_dir = base / "systemd" / "user"

    def unit(self, service: str) -> str:
        return f"halton-meter-{service}.service"

    def unit_path(self, service: str) -> Path:
        return self.unit_dir / self.unit(service)

    def install(self, commands: dict[str, list[str]]) -> list[str]:
        commands = _checked(commands)
        for service, argv in commands.items():
            if not os.path.isabs(argv[0]):
                raise SupervisorError(f"systemd needs an absolute program path for the {service}, not "
                                      f"{argv[0]!r}. Pass the full path (e.g. from `command -v`).")
        self._persist(commands)
        env = service_environment(self.settings)
        lines, changed = [], []
        for service in SERVICES:
            text = render_unit(service, commands[service], env)
            if _write_if_changed(self.unit_path(service), text.encode(), 0o644):
                changed.append(service)
                lines.append(f"wrote {_display(self.unit_path(service))}")
        if changed:
            self._systemctl("daemon-reload")
        props = {service: self._show(service) for service in SERVICES}
        disabled = [self.unit(s) for s in SERVICES if props[s].get("UnitFileState") != "enabled"]
        if disabled:
            self._systemctl("enable", *disabled)
            lines.append(f"enabled {' '.join(disabled)} (started with your user session)")
        for service in SERVICES:
            if props[service].get("ActiveState") != "active":
                self._systemctl("start", self.unit(service))
                lines.append(f"started {self.unit(service)}")
            elif service in changed:
                self._systemctl("restart", self.unit(service))
                lines.append(f"restarted {self.unit(service)} (its unit changed)")
        return lines

    def uninstall(self) -> list[str]:
        present = [s for s in reversed(SERVICES) if self.unit_path(s).exists()]
        lines = []
        if present:
            done = self._systemctl("disable", "--now", *map(self.unit, present), check=False)
            if done.returncode != 0:
                # A unit file systemd never loaded cannot be stopped; one that still runs must be.
                for service in present:
                    if self._is_active(self._show(service)):
                        self._systemctl("stop", self.unit(service))
            lines.append(f"stopped and disabled {' '.join(map(self.unit, present))}")
            for service in present:
                self.unit_path(service).unlink(missing_ok=True)
                lines.append(f"removed {_display(self.unit_path(service))}")
            self._systemctl("daemon-reload")
        self.commands_path.unlink(missing_ok=True)
        return lines

    def _start(self) -> list[str]:
        lines = []
        for service in SERVICES:
            if self._show(service).get("ActiveState") != "active":
                self._systemctl("start", self.unit(service))
                lines.append(f"started {self.unit(service)}")
        return lines

    def _stop(self, services: list[str]) -> list[str]:
        lines = []
        for service in services:
            if self.unit_path(service).exists() and self._is_active(self._show(service)):
                self._systemctl("stop", self.unit(service))
                lines.append(f"stopped {self.unit(service)}")
        return lines

    def _restart(self) -> list[str]:
        # One call per unit, in order: restarting both at once would take the edge down too.
        for service in SERVICES:
            self._systemctl("restart", self.unit(service))
        return [f"restarted {self.unit(service)}" for service in SERVICES]

    def status(self) -> dict[str, ServiceState]:
        states = {}
        for service in SERVICES:
            if not self.unit_path(service).exists():
                states[service] = ServiceState(service, False, False, None, "unit file missing")
                continue
            props = self._show(service)
            pid = int(props.get("MainPID") or 0) or None
            running = props.get("ActiveState") == "active" and pid is not None
            states[service] = ServiceState(service, True, running, pid, self._detail(service, props, pid))
        return states

    def is_installed(self) -> bool:
        return all(self.unit_path(service).exists() for service in SERVICES)

    def log_hint(self, service: str) -> str:
        return f"journalctl --user -u {self.unit(service)}"

    def _detail(self, service: str, props: dict[str, str], pid: int | None) -> str:
        active, sub = props.get("ActiveState", "unknown"), props.get("SubState", "")
        restarts = int(props.get("NRestarts") or 0)
        again = f"restarted {restarts} time{'s' * (restarts != 1)}"
        if active == "active" and pid:
            return f"active (pid {pid})" + (f", {again}" if restarts else "")
        if sub == "auto-restart":
            return f"restarting after it exited ({again}); see {self.log_hint(service)}"
        if active == "failed":
            return f"failed; see {self.log_hint(service)}"
        if active == "inactive":
            return "inactive (stopped)"
        return f"{active} ({sub})"

    @staticmethod
    def _is_active(props: dict[str, str]) -> bool:
        # `activating` includes the wait between automatic restarts: stopping must end that too.
        return props.get("ActiveState") in ("active", "activating", "reloading")

    def _show(self, service: str) -> dict[str, str]:
        names = ("LoadState", "ActiveState", "SubState", "MainPID", "NRestarts", "UnitFileState")
        args = [arg for name in names for arg in ("-p", name)]
        out = self._systemctl("show", *args, self.unit(service)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def _systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        units = " ".join(self.unit(service) for service in SERVICES)
        return _run_tool(["systemctl", "--user", *args], check=check,
                         fix=f"Check `systemctl --user status {units}`, or set {OVERRIDE_ENV}=detached "
                             "to let halton-meter supervise itself.")


def render_unit(service: str, argv: list[str], env: dict[str, str]) -> str:
    """A systemd user unit that keeps `argv` running: restarted a second after any exit, forever."""
    lines = ["# Written by halton-meter; edits are overwritten when it installs again.",
             "[Unit]", f"Description=halton-meter {service}: {DESCRIPTIONS[service]}"]
    if service == "edge":
        # Ordering only: the edge must run (and tunnel directly) even when the daemon cannot.
        lines.append("After=halton-meter-daemon.service")
    # Without this, five quick exits make systemd give up on a unit that Restart=always should keep.
    lines += ["StartLimitIntervalSec=0", "", "[Service]", "Type=simple",
              "ExecStart=" + " ".join(systemd_quote(arg) for arg in argv)]
    lines += [f"Environment={systemd_quote(f'{key}={value}', expand_dollar=False)}"
              for key, value in env.items()]
    lines += ["Restart=always", "RestartSec=1", "TimeoutStopSec=10", "",
              "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


_SYSTEMD_BARE = re.compile(r"[\w@%+=:,./$-]+", re.ASCII)


def systemd_quote(arg: str, *, expand_dollar: bool = True) -> str:
    """One argument for a unit file: systemd.syntax(7) quoting, `%%` for specifiers, `$$` in Exec*."""
    text = arg.replace("%", "%%")
    if expand_dollar:
        text = text.replace("$", "$$")
    if arg == ";":
        return "\\;"  # a lone semicolon separates commands (systemd.service(5), "Command lines")
    if _SYSTEMD_BARE.fullmatch(arg):
        return text
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# --- launchd ----------------------------------------------------------------------------------

class LaunchdSupervisor(Supervisor):
    kind = "launchd"

    def __init__(self, settings: Settings, commands: dict[str, list[str]] | None = None) -> None:
        super().__init__(settings, commands)
        self.agent_dir = Path.home() / "Library" / "LaunchAgents"
        self.domain = f"gui/{os.getuid()}"

    def label(self, service: str) -> str:
        return f"com.halton-meter.{service}"

    def plist_path(self, service: str) -> Path:
        return self.agent_dir / f"{self.label(service)}.plist"

    def target(self, service: str) -> str:
        return f"{self.domain}/{self.label(service)}"

    def install(self, commands: dict[str, list[str]]) -> list[str]:
        commands = _checked(commands)
        self._persist(commands)
        make_private_dir(self.settings.log_dir)  # launchd will not create it
        env = service_environment(self.settings)
        lines = []
        for service in SERVICES:
            path = self.plist_path(service)
            data = render_plist(self.label(service), commands[service], env, Path(self.log_hint(service)))
            loaded = self._info(service) is not None
            if _read_bytes(path) != data:
                if loaded:  # launchd keeps the job it loaded; a changed plist needs a fresh load
                    self._launchctl("bootout", self.target(service))
                    loaded = False
                _write_if_changed(path, data, 0o644)
                lines.append(f"wrote {_display(path)}")
            if not loaded:
                # A job once `launchctl disable`d refuses bootstrap with a bare I/O error.
                self._launchctl("enable", self.target(service))
                self._bootstrap(service)
                lines.append(f"loaded {self.label(service)} (runs at login, restarted when it exits)")
        return lines

    def uninstall(self) -> list[str]:
        lines = []
        for service in reversed(SERVICES):
            if self._info(service) is not None:
                done = self._launchctl("bootout", self.target(service), check=False)
                if done.returncode != 0 and self._info(service) is not None:
                    raise _tool_error(["launchctl", "bootout", self.target(service)], done, self._fix())
                lines.append(f"stopped and unloaded {self.label(service)}")
            if self.plist_path(service).exists():
                self.plist_path(service).unlink()
                lines.append(f"removed {_display(self.plist_path(service))}")
        self.commands_path.unlink(missing_ok=True)
        return lines

    def _start(self) -> list[str]:
        lines = []
        for service in SERVICES:
            info = self._info(service)
            if info is None:
                self._bootstrap(service)
            elif info.get("state") != "running":
                self._launchctl("kickstart", self.target(service))
            else:
                continue
            lines.append(f"started {self.label(service)}")
        return lines

    def _stop(self, services: list[str]) -> list[str]:
        # bootout, not kill: KeepAlive would bring a killed job straight back.
        lines = []
        for service in services:
            if self._info(service) is not None:
                self._launchctl("bootout", self.target(service))
                lines.append(f"stopped {self.label(service)}")
        return lines

    def _restart(self) -> list[str]:
        lines = []
        for service in SERVICES:
            if self._info(service) is None:
                self._bootstrap(service)
                lines.append(f"started {self.label(service)}")
            else:
                self._launchctl("kickstart", "-k", self.target(service))
                lines.append(f"restarted {self.label(service)}")
        return lines

    def status(self) -> dict[str, ServiceState]:
        states = {}
        for service in SERVICES:
            installed = self.plist_path(service).exists()
            info = self._info(service)
            pid_text = (info or {}).get("pid", "")
            pid = int(pid_text) if pid_text.isdigit() else None
            running = info is not None and info.get("state") == "running" and pid is not None
            if running:
                detail = f"running (pid {pid})"
            elif info is not None:
                detail = f"loaded, not running (last exit code {info.get('last exit code', 'unknown')})"
            else:
                detail = "not loaded" if installed else "plist missing"
            states[service] = ServiceState(service, installed, running, pid, detail)
        return states

    def is_installed(self) -> bool:
        return all(self.plist_path(service).exists() for service in SERVICES)

    def _bootstrap(self, service: str) -> None:
        # Right after a bootout launchd may still be tearing the job down and refuse it briefly.
        for attempt in range(3):
            done = self._launchctl("bootstrap", self.domain, str(self.plist_path(service)),
                                   check=attempt == 2)
            if done.returncode == 0:
                return
            time.sleep(0.5)

    def _info(self, service: str) -> dict[str, str] | None:
        """`launchctl print` top-level fields of a loaded job, or None when it is not loaded."""
        done = self._launchctl("print", self.target(service), check=False)
        if done.returncode != 0:
            return None
        info: dict[str, str] = {}
        for line in done.stdout.splitlines():
            if line.startswith("\t") and not line.startswith("\t\t") and " = " in line:
                key, _, value = line.strip().partition(" = ")
                info.setdefault(key, value)
        return info

    def _fix(self) -> str:
        return (f"Check `launchctl print {self.target('edge')}`, or set {OVERRIDE_ENV}=detached "
                "to let halton-meter supervise itself.")

    def _launchctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run_tool(["launchctl", *args], check=check, fix=self._fix())


def render_plist(label: str, argv: list[str], env: dict[str, str], log_path: Path) -> bytes:
    """A launchd agent that runs `argv` at login and again whenever it exits."""
    return plistlib.dumps({
        "Label": label,
        "ProgramArguments": list(argv),
        "EnvironmentVariables": dict(env),
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 1,     # launchd's default waits 10 s between respawns
        "ProcessType": "Standard",  # Background would throttle CPU and I/O on the request path
        "WorkingDirectory": "/",
        "StandardOutPath": str(log_path),
        "StandardErrorPath": str(log_path),
    }, sort_keys=True)


# --- detached: the keeper ---------------------------------------------------------------------

class DetachedSupervisor(Supervisor):
    """Services run under a keeper process of our own, for machines without a user supervisor."""

    kind = "detached"

    def install(self, commands: dict[str, list[str]]) -> list[str]:
        lines = []
        if self._persist(_checked(commands)):
            lines.append(f"wrote {_display(self.commands_path)}")
            if self._keeper_pid() is not None:  # the keeper rereads the commands on SIGHUP
                return lines + self._restart()
        return lines + self._start()

    def uninstall(self) -> list[str]:
        lines = self.stop()
        if self.commands_path.exists():
            self.commands_path.unlink()
            lines.append(f"removed {_display(self.commands_path)}")
        _remove(_lock_path(self.settings))
        return lines

    def _start(self) -> list[str]:
        pid = self._keeper_pid()
        if pid is not None:
            return self._resume(pid)
        # Stale pid and state files stay: the new keeper overwrites them, and uses the service
        # pid files to end what a killed keeper left running. Removing them here could race a
        # concurrent start whose keeper just wrote them.
        _remove(_held_path(self.settings))
        requested = time.time()
        keeper = self._spawn_keeper()
        pids = self._await_services(keeper, {}, requested)
        return ([f"started keeper (pid {self._keeper_pid()}), logs in {_display(self.settings.log_dir)}"]
                + [f"started {service} (pid {pids[service]})" for service in SERVICES])

    def _resume(self, keeper: int) -> list[str]:
        """The keeper runs: start now what `stop` held back or what waits out a restart backoff."""
        before = {service: self._service_pid(service, keeper) for service in SERVICES}
        if all(before.values()) and not _read_held(self.settings):
            return []
        _remove(_held_path(self.settings))
        requested = time.time()
        _signal(keeper, signal.SIGUSR1)
        pids = self._await_services(None, {}, requested)
        return [f"started {service} (pid {pids[service]})" for service in SERVICES if before[service] is None]

    def _stop(self, services: list[str]) -> list[str]:
        if set(services) == set(SERVICES):
            return self._stop_keeper()
        keeper = self._keeper_pid()
        if keeper is None:
            return []
        before = {service: self._service_pid(service, keeper) for service in services}
        held = _read_held(self.settings)
        if held >= set(services) and not any(before.values()):
            return []
        _write_atomic(_held_path(self.settings), json.dumps(sorted(held | set(services))).encode(), 0o600)
        _signal(keeper, signal.SIGUSR1)  # the keeper stops held services and leaves them stopped
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(_alive(pid) for pid in before.values() if pid) or any(
                self._service_pid(service, keeper) for service in services):
            if time.monotonic() > deadline:
                raise SupervisorError(f"The {' and '.join(services)} did not stop within {READY_TIMEOUT_S:.0f} s. "
                                      f"See {_display(_keeper_log(self.settings))}, then run `halton-meter stop --all`.")
            time.sleep(0.02)
        return [f"stopped {service} (pid {pid}); the keeper holds it stopped until `halton-meter start`"
                for service, pid in before.items() if pid]

    def _stop_keeper(self) -> list[str]:
        lines = []
        pid = self._keeper_pid()
        if pid is not None:
            _signal(pid, signal.SIGTERM)
            if _wait_gone(pid, READY_TIMEOUT_S):
                lines.append(f"stopped keeper (pid {pid}) and its services")
            else:
                _signal(pid, signal.SIGKILL)
                lines.append(f"keeper (pid {pid}) did not stop within {READY_TIMEOUT_S:.0f} s; killed it")
        lines += _kill_leftovers(self.settings, self._stored_commands())
        for name in ("keeper", *SERVICES):
            _remove(_pid_path(self.settings, name))
        _remove(_state_path(self.settings))
        _remove(_held_path(self.settings))
        return lines

    def _restart(self) -> list[str]:
        pid = self._keeper_pid()
        if pid is None:
            return self._start()
        before = {service: self._service_pid(service, pid) for service in SERVICES}
        _remove(_held_path(self.settings))  # restart means both services, held or not
        requested = time.time()
        _signal(pid, signal.SIGHUP)
        pids = self._await_services(None, before, requested)
        return [f"restarted {service} (pid {pids[service]})" for service in SERVICES]

    def status(self) -> dict[str, ServiceState]:
        commands = self._stored_commands() or {}
        keeper = self._keeper_pid()
        services = _read_json(_state_path(self.settings)).get("services", {}) if keeper else {}
        held = _read_held(self.settings)
        states = {}
        for service in SERVICES:
            installed = service in commands
            pid = self._service_pid(service, keeper) if keeper else None
            info = services.get(service, {})
            if not installed:
                detail = "not installed"
            elif keeper is None:
                detail = "stopped (no keeper running)"
            elif pid is not None:
                detail = f"running (pid {pid})" + _restart_note(info)
            elif service in held:
                detail = "stopped on request; `halton-meter start` starts it again"
            elif info.get("problem"):
                detail = f"not running: {info['problem']}; the keeper retries" + _restart_note(info)
            else:
                detail = "starting"
            states[service] = ServiceState(service, installed, pid is not None, pid, detail)
        return states

    def is_installed(self) -> bool:
        return self._stored_commands() is not None

    def _stored_commands(self) -> dict[str, list[str]] | None:
        try:
            return installed_commands(self.settings)
        except SupervisorError:
            return None

    def _keeper_pid(self) -> int | None:
        """The live keeper of this home, or None; a reused pid is not mistaken for it."""
        pid = _read_pid(_pid_path(self.settings, "keeper"))
        if pid is None or not _alive(pid):
            return None
        text = _command_of(pid)
        home = str(Path(self.settings.home).resolve())
        if text is not None and (KEEPER_MODULE not in text or home not in text):
            return None
        return pid

    def _service_pid(self, service: str, keeper: int) -> int | None:
        pid = _read_pid(_pid_path(self.settings, service))
        if pid is None or not _alive(pid):
            return None
        parent = _parent_of(pid)
        return pid if parent is None or parent == keeper else None

    def _spawn_keeper(self) -> subprocess.Popen:
        make_private_dir(self.settings.run_dir)
        make_private_dir(self.settings.log_dir)
        env = dict(os.environ)
        env.update(service_environment(self.settings))
        if "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
        with open(_keeper_log(self.settings), "ab") as out:
            keeper = subprocess.Popen(keeper_command(self.settings) + ["--detach"], stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, cwd="/", env=env, start_new_session=True)
        try:
            keeper.wait(READY_TIMEOUT_S)  # --detach: it forks and exits at once; reap it, leave no zombie
        except subprocess.TimeoutExpired:
            _spawned[keeper.pid] = keeper
        return keeper

    def _await_services(self, keeper: subprocess.Popen | None, before: dict[str, int | None],
                        requested: float) -> dict[str, int]:
        """Wait until a keeper runs every service under a pid other than `before`'s."""
        logfile = _display(_keeper_log(self.settings))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            pid = self._keeper_pid()
            if pid is not None:
                pids = {service: self._service_pid(service, pid) for service in SERVICES}
                if all(pids[s] is not None and pids[s] != before.get(s) for s in SERVICES):
                    return pids
                self._raise_start_failure(requested)
            elif keeper is not None and keeper.poll() not in (None, 0):  # 0: it forked (--detach)
                raise SupervisorError(
                    f"The keeper exited at once (status {keeper.returncode}): {_last_line(_keeper_log(self.settings))}. "
                    f"Fix what {logfile} says, then run `halton-meter start`.")
            if time.monotonic() > deadline:
                raise SupervisorError(
                    f"The services did not start within {READY_TIMEOUT_S:.0f} s. See {logfile} and "
                    f"{_display(self.settings.log_dir)}/<service>.log, then run `halton-meter start`.")
            time.sleep(0.05)

    def _raise_start_failure(self, requested: float) -> None:
        """Fail at once when the keeper could not even launch a service since our request."""
        services = _read_json(_state_path(self.settings)).get("services", {})
        for service in SERVICES:
            info = services.get(service, {})
            if info.get("cause") == "exec" and (info.get("problem_at") or 0) >= requested:
                raise SupervisorError(
                    f"The {service} could not be started: {info['problem']}. The keeper keeps retrying; "
                    f"fix the command in {_display(self.commands_path)} or reinstall, then run "
                    "`halton-meter restart`.")


class Keeper:
    """The detached supervisor process: runs each service and restarts it whenever it exits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.commands: dict[str, list[str]] = {}
        self.children: dict[str, subprocess.Popen | None] = {service: None for service in SERVICES}
        self.started_at: dict[str, float] = {}
        self.due: dict[str, float | None] = {service: None for service in SERVICES}
        self.delay = {service: BACKOFF_FIRST_S for service in SERVICES}
        self.info = {service: {"restarts": 0, "problem": None, "problem_at": None, "cause": None}
                     for service in SERVICES}
        self.never_started = set(SERVICES)
        self.held: set[str] = set()  # services `stop` asked to keep stopped while the others run
        self.stopping = False
        self.reloading = False
        self.applying = False
        self.wakeup = -1

    def run(self) -> int:
        make_private_dir(self.settings.run_dir)
        make_private_dir(self.settings.log_dir)
        lock = _try_lock(_lock_path(self.settings))
        if lock is None:
            other = _read_pid(_pid_path(self.settings, "keeper"))
            log.error("keeper_refused home=%s other_pid=%s", self.settings.home, other)
            print(f"halton-meter: a keeper already supervises {self.settings.home} (pid {other}). "
                  "Stop it first with `halton-meter stop`.", file=sys.stderr)
            return 1
        try:
            self.commands = installed_commands(self.settings) or {}
        except SupervisorError as exc:
            log.error("keeper_no_commands error=%s", exc)
        if not self.commands:
            log.error("keeper_exit reason=nothing installed path=%s", self.settings.run_dir / "services.json")
            return 1
        self.held = _read_held(self.settings)
        self._handle_signals()
        _write_pid(_pid_path(self.settings, "keeper"), os.getpid())
        log.info("keeper_started pid=%d home=%s", os.getpid(), self.settings.home)
        try:
            _kill_leftovers(self.settings, self.commands)  # a keeper killed by SIGKILL leaves them
            while not self.stopping:
                try:
                    self._tick()
                except Exception:  # the keeper outlives its own bugs: log, breathe, go on
                    log.exception("keeper_error")
                    time.sleep(0.5)
                self._wait()
        finally:
            self._stop_children()
            if _read_pid(_pid_path(self.settings, "keeper")) == os.getpid():
                _remove(_pid_path(self.settings, "keeper"))
            _remove(_state_path(self.settings))
            log.info("keeper_stopped pid=%d", os.getpid())
        return 0

    def _handle_signals(self) -> None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        self.wakeup = read_end
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)  # wakes select() on any signal
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_holds)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True

    def _on_reload(self, signum, frame) -> None:
        self.reloading = True

    def _on_holds(self, signum, frame) -> None:
        self.applying = True

    def _wait(self) -> None:
        now = time.monotonic()
        timeout = min([30.0] + [max(0.0, due - now) for due in self.due.values() if due is not None])
        if self.stopping or self.reloading or self.applying:
            return
        select.select([self.wakeup], [], [], timeout)
        try:
            os.read(self.wakeup, 4096)
        except BlockingIOError:
            pass

    def _tick(self) -> None:
        if self.reloading and not self.stopping:
            self.reloading = False
            self._reload()
        self._reap()
        if self.applying and not self.stopping:
            self.applying = False
            self._apply_holds()
        now = time.monotonic()
        for service in SERVICES:
            if self.stopping or service in self.held:
                continue
            if service in self.never_started:
                self._spawn(service)
                continue
            due = self.due[service]
            if due is not None and due <= now:
                self.info[service]["restarts"] += 1
                log.info("service=%s restart attempt=%d", service, self.info[service]["restarts"])
                self._spawn(service)

    def _spawn(self, service: str) -> None:
        argv = self.commands.get(service)
        self.due[service] = None
        self.never_started.discard(service)
        if not argv:
            return
        env = dict(os.environ)
        env.update({"HALTON_METER_HOME": str(self.settings.home), "PYTHONUNBUFFERED": "1"})
        try:
            with open(self.settings.log_dir / f"{service}.log", "ab") as out:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env)
        except Exception as exc:  # missing binary, no permission, bad argv: retry later, never die
            log.error("service=%s exec_failed error=%r", service, exc)
            self._note_problem(service, f"could not run {argv[0]} ({exc})", "exec")
            self._schedule(service, ran_s=0.0)
            return
        self.children[service] = child
        self.started_at[service] = time.monotonic()
        _write_pid(_pid_path(self.settings, service), child.pid)
        log.info("service=%s started pid=%d", service, child.pid)
        self._save_state()

    def _reap(self) -> None:
        for service, child in self.children.items():
            if child is None or child.poll() is None:
                continue
            self.children[service] = None
            _remove(_pid_path(self.settings, service))
            ran_s = time.monotonic() - self.started_at.get(service, time.monotonic())
            self._note_problem(service, f"exited with {_exit_text(child.returncode)}", "exit")
            delay = self._schedule(service, ran_s)
            log.warning("service=%s exited status=%s ran_s=%.1f restart_in_s=%.1f",
                        service, child.returncode, ran_s, delay)

    def _schedule(self, service: str, ran_s: float) -> float:
        """Restart like systemd's Restart=always, but backing off while a service keeps failing."""
        if ran_s >= STABLE_AFTER_S:
            self.delay[service] = BACKOFF_FIRST_S
        delay = self.delay[service]
        self.due[service] = time.monotonic() + delay
        self.delay[service] = min(delay * 2, BACKOFF_MAX_S)
        self._save_state()
        return delay

    def _note_problem(self, service: str, problem: str, cause: str) -> None:
        self.info[service].update(problem=problem, problem_at=time.time(), cause=cause)

    def _reload(self) -> None:
        """SIGHUP: reread the commands and restart the daemon, then the edge."""
        try:
            self.commands = installed_commands(self.settings) or self.commands
        except SupervisorError as exc:
            log.error("keeper_reload_kept_old_commands error=%s", exc)
        self.held = _read_held(self.settings)
        log.info("keeper_reload")
        for service in SERVICES:
            self._end(service)
            self.delay[service] = BACKOFF_FIRST_S
            if service not in self.held:
                self._spawn(service)

    def _apply_holds(self) -> None:
        """SIGUSR1: stop the services `stop` holds back; start at once the others that are down."""
        self.held = _read_held(self.settings)
        log.info("keeper_holds held=%s", ",".join(sorted(self.held)) or "-")
        for service in reversed(SERVICES):
            if service in self.held:
                self._end(service)
                self.due[service] = None
        for service in SERVICES:
            if service not in self.held and self.children.get(service) is None:
                self.delay[service] = BACKOFF_FIRST_S
                self._spawn(service)
        self._save_state()

    def _end(self, service: str) -> None:
        """Stop one service on purpose: no restart follows."""
        child = self.children.get(service)
        if child is not None and child.poll() is None:
            child.terminate()
            self._await_exit(child, TERM_GRACE_S)
            log.info("service=%s stopped pid=%d status=%s", service, child.pid, child.returncode)
        self.children[service] = None
        _remove(_pid_path(self.settings, service))

    def _stop_children(self) -> None:
        running = [child for service in reversed(SERVICES)
                   if (child := self.children.get(service)) is not None and child.poll() is None]
        for child in running:
            child.terminate()
        deadline = time.monotonic() + TERM_GRACE_S
        for child in running:
            self._await_exit(child, max(0.0, deadline - time.monotonic()))
            log.info("pid=%d stopped status=%s", child.pid, child.returncode)
        for service in SERVICES:
            self.children[service] = None
            _remove(_pid_path(self.settings, service))

    @staticmethod
    def _await_exit(child: subprocess.Popen, grace_s: float) -> None:
        """Wait for a child sent SIGTERM; SIGKILL it when the grace runs out."""
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid=%d kill reason=still running %.0f s after SIGTERM", child.pid, grace_s)
            child.kill()
            child.wait()

    def _save_state(self) -> None:
        services = {}
        for service in SERVICES:
            child = self.children.get(service)
            running = child is not None and child.poll() is None
            services[service] = {"pid": child.pid if running else None, **self.info[service]}
        data = json.dumps({"keeper_pid": os.getpid(), "services": services}).encode()
        try:
            _write_atomic(_state_path(self.settings), data, 0o600)
        except OSError as exc:
            log.error("keeper_state_write_failed error=%r", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {KEEPER_MODULE}",
        description="The detached keeper: runs the daemon and the edge of one home and restarts them "
                    "when they exit. `halton-meter start` runs it; SIGTERM stops it, SIGHUP restarts both, "
                    "SIGUSR1 applies the services `halton-meter stop` holds stopped.")
    parser.add_argument("--home", help="state directory (default: $HALTON_METER_HOME or ~/.halton-meter)")
    parser.add_argument("--detach", action="store_true",
                        help="fork and let the starting process go: the keeper then belongs to no one's "
                             "process tree (`run` execs the user's command right after starting it)")
    args = parser.parse_args(argv)
    if args.detach and os.fork() > 0:
        os._exit(0)  # the parent, reaped by whoever started it; the child carries on as the keeper
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return Keeper(Settings(home=resolve_home(args.home))).run()


# --- helpers: files, processes, tools ---------------------------------------------------------

_spawned: dict[int, subprocess.Popen] = {}  # keepers this process started, reaped when checked


def _pid_path(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def _state_path(settings: Settings) -> Path:
    return settings.run_dir / "keeper-state.json"


def _lock_path(settings: Settings) -> Path:
    return settings.run_dir / "keeper.lock"


def _held_path(settings: Settings) -> Path:
    return settings.run_dir / "keeper-held.json"


def _read_held(settings: Settings) -> set[str]:
    try:
        names = json.loads(_held_path(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {name for name in names if name in SERVICES} if isinstance(names, list) else set()


def _keeper_log(settings: Settings) -> Path:
    return settings.log_dir / "keeper.log"


def _stored(settings: Settings) -> dict | None:
    path = settings.run_dir / "services.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SupervisorError(f"{path} is unreadable ({exc}). Remove it and run `halton-meter start`.") from exc
    try:
        return {"kind": str(data["kind"]), "commands": _checked(data["commands"])}
    except (TypeError, KeyError, SupervisorError):
        raise SupervisorError(f"{path} is not a halton-meter services file. Remove it and run "
                              "`halton-meter start`.") from None


def _checked(commands) -> dict[str, list[str]]:
    """One non-empty argv of strings per service, and nothing else."""
    if not isinstance(commands, dict) or set(commands) != set(SERVICES):
        raise SupervisorError(f"Commands must name exactly {' and '.join(SERVICES)}. "
                              "Build them with service_commands().")
    for service in SERVICES:
        argv = commands[service]
        if not isinstance(argv, (list, tuple)) or not argv or not all(isinstance(a, str) for a in argv):
            raise SupervisorError(f"The {service} command must be a non-empty list of strings, not "
                                  f"{argv!r}. Build it with service_commands().")
    return {service: list(commands[service]) for service in SERVICES}


def _checkout_root() -> str | None:
    """Where this package lives when run from a source checkout rather than site-packages.

    Services started by systemd, launchd or the keeper then need it on PYTHONPATH to import the
    same halton_meter as the command that installed them.
    """
    root = Path(__file__).resolve().parents[2]
    installed = [*getattr(site, "getsitepackages", lambda: [])(), site.getusersitepackages()]
    return None if any(Path(p).resolve() == root for p in installed) else str(root)


def _has_user_manager() -> bool:
    """A user systemd answers; it does not in most containers or in ssh sessions without logind."""
    if shutil.which("systemctl") is None:
        return False
    try:
        done = subprocess.run(["systemctl", "--user", "show-environment"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=DETECT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _run_tool(argv: list[str], *, check: bool, fix: str) -> subprocess.CompletedProcess:
    """Run systemctl / launchctl with a timeout; a failure becomes a SupervisorError with `fix`."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError:
        raise SupervisorError(f"{argv[0]} is not on PATH. Install it, or set {OVERRIDE_ENV}=detached "
                              "to let halton-meter supervise itself.") from None
    except subprocess.TimeoutExpired:
        raise SupervisorError(f"`{shlex.join(argv)}` did not finish within {TOOL_TIMEOUT_S:.0f} s. {fix}") from None
    if check and done.returncode != 0:
        raise _tool_error(argv, done, fix)
    return done


def _tool_error(argv: list[str], done: subprocess.CompletedProcess, fix: str) -> SupervisorError:
    said = " ".join((done.stderr or done.stdout or "").split()) or "no message"
    return SupervisorError(f"`{shlex.join(argv)}` failed (exit {done.returncode}): {said}. {fix}")


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_if_changed(path: Path, data: bytes, mode: int) -> bool:
    """Write `data` unless the file already holds it; True when it wrote."""
    if _read_bytes(path) == data:
        return False
    _write_atomic(path, data, mode)
    return True


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        _remove(temp)
        raise


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_pid(path: Path, pid: int) -> None:
    _write_atomic(path, f"{pid}\n".encode(), 0o644)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _try_lock(path: Path) -> int | None:
    """An exclusive lock held for the keeper's life: the kernel drops it however the keeper dies."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (in containers nobody may reap orphans)."""
    child = _spawned.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc, or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1])


def _parent_of(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _command_of(pid: int) -> str | None:
    """The command line of `pid` joined by spaces, or None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None  # Linux and the process is gone
    except OSError:
        return None
    try:
        done = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True,
                              text=True, timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.strip()
    return text if done.returncode == 0 and text else None


def _runs(pid: int, argv: list[str]) -> bool:
    """Does `pid` run `argv`? Unknown counts as no: never kill what we cannot identify."""
    text = _command_of(pid)
    if text is None:
        return False
    if " ".join(argv) in text:
        return True
    # A #! script shows up as `interpreter script args...`.
    return len(argv) > 1 and text.endswith(" " + " ".join(argv[1:])) and os.path.basename(argv[0]) in text


def _kill_leftovers(settings: Settings, commands: dict[str, list[str]] | None) -> list[str]:
    """End services whose keeper died without stopping them (SIGKILL, OOM), so none runs twice."""
    lines = []
    for service in reversed(SERVICES):
        path = _pid_path(settings, service)
        pid = _read_pid(path)
        if pid is not None and commands and _alive(pid) and _runs(pid, commands.get(service, [])):
            _signal(pid, signal.SIGTERM)
            if not _wait_gone(pid, TERM_GRACE_S):
                _signal(pid, signal.SIGKILL)
                _wait_gone(pid, 1.0)
            log.warning("service=%s leftover_stopped pid=%d", service, pid)
            lines.append(f"stopped a leftover {service} (pid {pid})")
        _remove(path)
    return lines


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _exit_text(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


def _restart_note(info: dict) -> str:
    restarts = info.get("restarts") or 0
    return f"; restarted {restarts} time{'s' * (restarts != 1)}" if restarts else ""


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def _display(path: Path) -> str:
    """`~/...` for paths under the home directory: shorter in messages, same meaning."""
    try:
        return "~/" + str(Path(path).relative_to(Path.home()))
    except (ValueError, RuntimeError, KeyError):
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
