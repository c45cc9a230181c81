"""Supervision: systemd and launchd through fake tools (tests/fakebin) that really run the units,
and the detached keeper for real. Services are harmless sleepers; every process a test starts
carries a tag in its environment, and the fixture kills whatever still carries it, pass or fail.
"""

from __future__ import annotations

import json
import os
import plistlib
import signal
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from halton_meter.config import Settings
from halton_meter.lifecycle.supervise import (
    DetachedSupervisor,
    SupervisorError,
    detect,
    keeper_command,
    service_commands,
    supervisor_for,
    systemd_quote,
)
from tests.conftest import REPO

FAKEBIN = Path(__file__).resolve().parent / "fakebin"
TAG = "HALTON_METER_TEST_TAG"
HAS_PROC = Path("/proc/self/cmdline").exists()
SYSTEMD_UNITS = ("halton-meter-daemon.service", "halton-meter-edge.service")


def sleeper(name: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(600)", name, *extra]


COMMANDS = {"daemon": sleeper("daemon"), "edge": sleeper("edge")}


@dataclass
class Env:
    settings: Settings
    user: Path
    state: Path
    tag: str

    def calls(self, skip: tuple[str, ...] = ("show", "print")) -> list[list[str]]:
        """Fake tool invocations so far, less the read-only queries; then forget them."""
        path = self.state / "calls.jsonl"
        if not path.exists():
            return []
        calls = [json.loads(line) for line in path.read_text().splitlines()]
        path.unlink()
        return [call for call in calls if not set(call[1:3]) & set(skip)]

    def tagged(self) -> list[int]:
        return tagged_pids(self.tag)

    def pid_file(self, name: str) -> Path:
        return self.settings.run_dir / f"{name}.pid"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A throwaway user (HOME, XDG_CONFIG_HOME), fake tools first on PATH, a tagged environment."""
    tag = uuid.uuid4().hex
    user, state, pybin = tmp_path / "user", tmp_path / "fake-state", tmp_path / "pybin"
    for directory in (user, state, pybin):
        directory.mkdir()
    # The fakes are `#!/usr/bin/env python3`: point that at this interpreter, not a slow shim.
    (pybin / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("HOME", str(user))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(user / ".config"))
    monkeypatch.setenv("FAKE_SUPERVISOR_STATE", str(state))
    monkeypatch.setenv("PATH", os.pathsep.join([str(FAKEBIN), str(pybin), os.environ.get("PATH", "")]))
    monkeypatch.setenv("HALTON_METER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HALTON_METER_SUPERVISOR", raising=False)
    monkeypatch.setenv(TAG, tag)
    yield Env(Settings(home=tmp_path / "home"), user, state, tag)
    for pid in set(tagged_pids(tag)) | set(_pids_in_files(tmp_path)):
        _kill(pid)


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries this test's tag (Linux; elsewhere none found)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*") if HAS_PROC else ():
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if int(entry.name) != os.getpid() and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _pids_in_files(root: Path) -> list[int]:
    pids = []
    for path in root.rglob("*.pid"):
        text = path.read_text().strip()
        if text.isdigit() and int(text) != os.getpid():
            pids.append(int(text))
    return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def pids(supervisor) -> dict[str, int | None]:
    return {name: state.pid for name, state in supervisor.status().items()}


def assert_all_gone(old: dict[str, int | None]) -> None:
    assert wait_for(lambda: not any(alive(pid) for pid in old.values())), old


# --- pure pieces ------------------------------------------------------------------------------

def test_systemd_quote_follows_unit_file_syntax():
    assert systemd_quote("/usr/bin/python3") == "/usr/bin/python3"
    assert systemd_quote("--api-port") == "--api-port"
    assert systemd_quote("/tmp/my home") == '"/tmp/my home"'
    assert systemd_quote('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert systemd_quote("100%") == "100%%"
    assert systemd_quote("$HOME") == "$$HOME"
    assert systemd_quote("a b$%") == '"a b$$%%"'
    assert systemd_quote(";") == "\\;"
    assert systemd_quote("") == '""'
    assert systemd_quote("tab\there") == '"tab\\x09here"'
    assert systemd_quote("HOME=/a b$", expand_dollar=False) == '"HOME=/a b$"'


def test_service_commands_are_the_two_processes(tmp_path):
    commands = service_commands(Settings(home=tmp_path), 8081, 8090)
    base = [sys.executable, "-m", "halton_meter", "--home", str(tmp_path)]
    assert commands == {"daemon": [*base, "daemon", "--api-port", "8090"],
                        "edge": [*base, "edge", "--port", "8081"]}


def test_detect_honours_the_override(monkeypatch):
    for kind in ("systemd", "launchd", "detached"):
        monkeypatch.setenv("HALTON_METER_SUPERVISOR", kind)
        assert detect() == kind
    monkeypatch.setenv("HALTON_METER_SUPERVISOR", " Detached ")
    assert detect() == "detached"
    monkeypatch.setenv("HALTON_METER_SUPERVISOR", "upstart")
    with pytest.raises(SupervisorError, match="HALTON_METER_SUPERVISOR='upstart'.*systemd, launchd, detached"):
        detect()
    with pytest.raises(SupervisorError, match="not a supervisor"):
        supervisor_for("upstart", Settings(home=Path("/nonexistent")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd detection is Linux-only")
def test_detect_asks_the_user_manager(env):
    assert detect() == "systemd"
    (env.state / "no-user-manager").touch()
    assert detect() == "detached"
    assert env.calls() == [["systemctl", "--user", "show-environment"]] * 2


# --- systemd through the fake systemctl -------------------------------------------------------

@pytest.mark.skipif(not HAS_PROC, reason="checks argv through /proc")
def test_systemd_install_writes_quoted_units_once(env):
    commands = {"daemon": sleeper("daemon"), "edge": sleeper("edge", "my port 8081", "100%", "$HOME")}
    supervisor = supervisor_for("systemd", env.settings)
    lines = supervisor.install(commands)

    units = env.user / ".config" / "systemd" / "user"
    assert lines == [f"wrote ~/.config/systemd/user/{SYSTEMD_UNITS[0]}",
                     f"wrote ~/.config/systemd/user/{SYSTEMD_UNITS[1]}",
                     f"enabled {' '.join(SYSTEMD_UNITS)} (started with your user session)",
                     f"started {SYSTEMD_UNITS[0]}", f"started {SYSTEMD_UNITS[1]}"]
    assert env.calls() == [["systemctl", "--user", "daemon-reload"],
                           ["systemctl", "--user", "enable", *SYSTEMD_UNITS],
                           ["systemctl", "--user", "start", SYSTEMD_UNITS[0]],
                           ["systemctl", "--user", "start", SYSTEMD_UNITS[1]]]
    edge = (units / SYSTEMD_UNITS[1]).read_text().splitlines()
    assert (f"ExecStart={systemd_quote(sys.executable)} -c \"import time; time.sleep(600)\" edge "
            "\"my port 8081\" 100%% $$HOME") in edge
    for line in ("Restart=always", "RestartSec=1", "WantedBy=default.target",
                 f"Environment=HALTON_METER_HOME={env.settings.home}", "Environment=PYTHONUNBUFFERED=1",
                 "After=halton-meter-daemon.service"):
        assert line in edge
    assert not [line for line in edge if line.startswith(("Requires=", "BindsTo=", "Requisite="))]
    assert "After=" not in (units / SYSTEMD_UNITS[0]).read_text()

    status = supervisor.status()
    assert all(state.running and state.installed for state in status.values()), status
    # The argv survived quoting: the running edge got exactly the list it was given.
    assert cmdline(status["edge"].pid) == commands["edge"]
    assert status["edge"].detail == f"active (pid {status['edge'].pid})"
    assert stat.S_IMODE((env.settings.run_dir / "services.json").stat().st_mode) == 0o600

    assert supervisor.install(commands) == []
    assert env.calls() == []
    assert pids(supervisor) == {name: state.pid for name, state in status.items()}

    # A changed command rewrites that unit and restarts that service alone.
    assert supervisor.install({**commands, "edge": sleeper("edge", "--port", "9000")}) == [
        f"wrote ~/.config/systemd/user/{SYSTEMD_UNITS[1]}", f"restarted {SYSTEMD_UNITS[1]} (its unit changed)"]
    assert env.calls() == [["systemctl", "--user", "daemon-reload"],
                           ["systemctl", "--user", "restart", SYSTEMD_UNITS[1]]]
    after = supervisor.status()
    assert after["daemon"].pid == status["daemon"].pid
    assert cmdline(after["edge"].pid)[-2:] == ["--port", "9000"]
    supervisor.uninstall()


def test_systemd_stop_start_restart_uninstall(env):
    supervisor_for("systemd", env.settings).install(COMMANDS)
    env.calls()
    supervisor = supervisor_for("systemd", env.settings)  # a later process: units and services.json only
    first = pids(supervisor)
    assert all(first.values())
    assert supervisor.is_installed()
    assert supervisor.log_hint("edge") == "journalctl --user -u halton-meter-edge.service"

    assert supervisor.stop() == [f"stopped {SYSTEMD_UNITS[1]}", f"stopped {SYSTEMD_UNITS[0]}"]
    assert env.calls() == [["systemctl", "--user", "stop", SYSTEMD_UNITS[1]],
                           ["systemctl", "--user", "stop", SYSTEMD_UNITS[0]]]
    assert_all_gone(first)
    assert supervisor.status()["edge"].detail == "inactive (stopped)"
    assert supervisor.stop() == []

    assert supervisor.start() == [f"started {SYSTEMD_UNITS[0]}", f"started {SYSTEMD_UNITS[1]}"]
    assert supervisor.start() == []
    second = pids(supervisor)
    assert all(second.values()) and not set(second.values()) & set(first.values())
    env.calls()

    # `halton-meter stop` without --all: the daemon alone; start brings back just that one.
    assert supervisor.stop(("daemon",)) == [f"stopped {SYSTEMD_UNITS[0]}"]
    assert env.calls() == [["systemctl", "--user", "stop", SYSTEMD_UNITS[0]]]
    assert not alive(second["daemon"]) and alive(second["edge"])
    assert supervisor.start() == [f"started {SYSTEMD_UNITS[0]}"]
    second = pids(supervisor)
    env.calls()
    with pytest.raises(SupervisorError, match="Unknown service"):
        supervisor.stop(("proxy",))

    assert supervisor.restart() == [f"restarted {SYSTEMD_UNITS[0]}", f"restarted {SYSTEMD_UNITS[1]}"]
    assert env.calls() == [["systemctl", "--user", "restart", SYSTEMD_UNITS[0]],
                           ["systemctl", "--user", "restart", SYSTEMD_UNITS[1]]]
    third = pids(supervisor)
    assert all(third.values()) and not set(third.values()) & set(second.values())
    assert_all_gone(second)

    lines = supervisor.uninstall()
    assert lines[0] == f"stopped and disabled {SYSTEMD_UNITS[1]} {SYSTEMD_UNITS[0]}"
    assert env.calls() == [["systemctl", "--user", "disable", "--now", SYSTEMD_UNITS[1], SYSTEMD_UNITS[0]],
                           ["systemctl", "--user", "daemon-reload"]]
    assert not list((env.user / ".config" / "systemd" / "user").iterdir())
    assert not (env.settings.run_dir / "services.json").exists()
    assert_all_gone(third)
    assert env.tagged() == []
    assert supervisor.uninstall() == []
    assert env.calls() == []
    assert {state.detail for state in supervisor.status().values()} == {"unit file missing"}
    with pytest.raises(SupervisorError, match="not installed.*halton-meter start"):
        supervisor.start()


def test_systemctl_failure_names_the_fix(env):
    supervisor = supervisor_for("systemd", env.settings)
    supervisor.install(COMMANDS)
    (env.state / "loaded" / SYSTEMD_UNITS[1]).unlink()  # systemd lost the unit: restart fails
    with pytest.raises(SupervisorError) as failure:
        supervisor.restart()
    message = str(failure.value)
    assert "`systemctl --user restart halton-meter-edge.service` failed (exit 5)" in message
    assert "Unit halton-meter-edge.service not found" in message
    assert "HALTON_METER_SUPERVISOR=detached" in message
    supervisor.uninstall()


# --- launchd through the fake launchctl -------------------------------------------------------

def test_launchd_agents_lifecycle(env):
    supervisor = supervisor_for("launchd", env.settings)
    domain = f"gui/{os.getuid()}"
    labels = {name: f"com.halton-meter.{name}" for name in ("daemon", "edge")}
    agents = env.user / "Library" / "LaunchAgents"
    lines = supervisor.install(COMMANDS)
    assert lines == [f"wrote ~/Library/LaunchAgents/{labels['daemon']}.plist",
                     f"loaded {labels['daemon']} (runs at login, restarted when it exits)",
                     f"wrote ~/Library/LaunchAgents/{labels['edge']}.plist",
                     f"loaded {labels['edge']} (runs at login, restarted when it exits)"]
    assert env.calls() == [call for name in ("daemon", "edge") for call in (
        ["launchctl", "enable", f"{domain}/{labels[name]}"],
        ["launchctl", "bootstrap", domain, str(agents / f"{labels[name]}.plist")])]
    with open(agents / f"{labels['edge']}.plist", "rb") as source:
        agent = plistlib.load(source)
    assert agent["Label"] == labels["edge"]
    assert agent["ProgramArguments"] == COMMANDS["edge"]
    assert agent["KeepAlive"] is True and agent["RunAtLoad"] is True
    assert agent["EnvironmentVariables"]["HALTON_METER_HOME"] == str(env.settings.home)
    assert agent["EnvironmentVariables"]["PYTHONUNBUFFERED"] == "1"
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(env.settings.log_dir / "edge.log")
    assert supervisor.log_hint("edge") == str(env.settings.log_dir / "edge.log")

    first = pids(supervisor)
    assert all(first.values())
    assert supervisor.status()["daemon"].detail == f"running (pid {first['daemon']})"
    assert supervisor.install(COMMANDS) == []
    assert env.calls() == []

    changed = {**COMMANDS, "edge": sleeper("edge", "--port", "9000")}
    assert supervisor.install(changed)[0] == f"wrote ~/Library/LaunchAgents/{labels['edge']}.plist"
    assert env.calls() == [["launchctl", "bootout", f"{domain}/{labels['edge']}"],
                           ["launchctl", "enable", f"{domain}/{labels['edge']}"],
                           ["launchctl", "bootstrap", domain, str(agents / f"{labels['edge']}.plist")]]
    second = pids(supervisor)
    assert second["daemon"] == first["daemon"] and second["edge"] != first["edge"]
    assert not alive(first["edge"])

    later = supervisor_for("launchd", env.settings)
    assert later.stop() == [f"stopped {labels['edge']}", f"stopped {labels['daemon']}"]
    assert env.calls() == [["launchctl", "bootout", f"{domain}/{labels[name]}"] for name in ("edge", "daemon")]
    assert_all_gone(second)
    assert later.status()["edge"].detail == "not loaded"
    assert later.start() == [f"started {labels['daemon']}", f"started {labels['edge']}"]
    third = pids(later)
    assert all(third.values())
    env.calls()
    assert later.stop(["daemon"]) == [f"stopped {labels['daemon']}"]
    assert env.calls() == [["launchctl", "bootout", f"{domain}/{labels['daemon']}"]]
    assert later.status()["edge"].pid == third["edge"]
    assert later.start() == [f"started {labels['daemon']}"]
    assert env.calls() == [["launchctl", "bootstrap", domain, str(agents / f"{labels['daemon']}.plist")]]
    third = pids(later)
    assert later.restart() == [f"restarted {labels['daemon']}", f"restarted {labels['edge']}"]
    assert env.calls() == [["launchctl", "kickstart", "-k", f"{domain}/{labels[name]}"]
                           for name in ("daemon", "edge")]
    assert_all_gone(third)

    lines = later.uninstall()
    assert f"removed ~/Library/LaunchAgents/{labels['edge']}.plist" in lines
    assert env.calls() == [["launchctl", "bootout", f"{domain}/{labels[name]}"] for name in ("edge", "daemon")]
    assert list(agents.iterdir()) == []
    assert wait_for(lambda: env.tagged() == [])
    assert later.uninstall() == []
    assert env.calls() == []


# --- detached: the real keeper ----------------------------------------------------------------

@pytest.mark.skipif(not HAS_PROC, reason="checks parents and argv through /proc")
def test_detached_start_status_stop(env):
    supervisor = DetachedSupervisor(env.settings, COMMANDS)
    lines = supervisor.start()
    keeper = int(env.pid_file("keeper").read_text())
    assert lines[:2] == [f"wrote {env.settings.run_dir / 'services.json'}",
                         f"started keeper (pid {keeper}), logs in {env.settings.log_dir}"]
    status = supervisor.status()
    assert all(state.running and state.installed for state in status.values()), status
    for name, state in status.items():
        assert int(env.pid_file(name).read_text()) == state.pid
        assert cmdline(state.pid) == COMMANDS[name]
        assert Path(f"/proc/{state.pid}/stat").read_text().rpartition(")")[2].split()[1] == str(keeper)
    assert status["edge"].detail == f"running (pid {status['edge'].pid})"
    assert supervisor.log_hint("edge") == str(env.settings.log_dir / "edge.log")
    assert supervisor.start() == []

    # Only the settings: a later process finds the installation through services.json.
    later = supervisor_for("detached", env.settings)
    assert later.is_installed() and pids(later) == pids(supervisor)

    # `stop` without --all: the keeper stops the daemon and keeps it stopped; the edge runs on.
    running = pids(supervisor)
    assert later.stop(("daemon",)) == [f"stopped daemon (pid {running['daemon']}); the keeper holds it "
                                       "stopped until `halton-meter start`"]
    assert not alive(running["daemon"])
    time.sleep(0.7)  # longer than the first restart backoff
    status = later.status()
    assert status["daemon"].pid is None and status["edge"].pid == running["edge"]
    assert status["daemon"].detail == "stopped on request; `halton-meter start` starts it again"
    assert later.stop(("daemon",)) == []
    lines = later.start()
    assert lines == [f"started daemon (pid {pids(later)['daemon']})"]
    assert pids(later)["edge"] == running["edge"] and alive(pids(later)["daemon"])
    assert later.start() == []

    second = subprocess.run(keeper_command(env.settings), capture_output=True, text=True, timeout=10, cwd=REPO)
    assert second.returncode == 1
    assert f"already supervises {env.settings.home} (pid {keeper})" in second.stderr
    assert pids(later) == pids(supervisor)

    before = pids(later)
    assert later.stop() == [f"stopped keeper (pid {keeper}) and its services"]
    assert_all_gone({**before, "keeper": keeper})
    assert env.tagged() == []
    assert not list(env.settings.run_dir.glob("*.pid"))
    assert {state.detail for state in later.status().values()} == {"stopped (no keeper running)"}
    assert later.stop() == []


def test_detached_restarts_a_crashed_service(env):
    supervisor = DetachedSupervisor(env.settings, COMMANDS)
    supervisor.start()
    first = pids(supervisor)
    os.kill(first["edge"], signal.SIGKILL)
    assert wait_for(lambda: pids(supervisor)["edge"] not in (None, first["edge"]), timeout=3)
    status = supervisor.status()
    assert status["daemon"].pid == first["daemon"]
    assert status["edge"].detail == f"running (pid {status['edge'].pid}); restarted 1 time"
    log = (env.settings.log_dir / "keeper.log").read_text()
    assert "service=edge exited status=-9" in log and "service=edge restart attempt=1" in log

    second = pids(supervisor)
    assert supervisor.restart() == [f"restarted {name} (pid {pid})" for name, pid in pids(supervisor).items()]
    third = pids(supervisor)
    assert all(third.values()) and not set(third.values()) & set(second.values())
    assert_all_gone(second)

    # A keeper killed outright leaves its services behind; stop ends them all the same.
    os.kill(int(env.pid_file("keeper").read_text()), signal.SIGKILL)
    assert wait_for(lambda: supervisor.status()["edge"].detail == "stopped (no keeper running)")
    assert alive(third["edge"]) and alive(third["daemon"])
    assert supervisor.stop() == [f"stopped a leftover edge (pid {third['edge']})",
                                 f"stopped a leftover daemon (pid {third['daemon']})"]
    assert_all_gone(third)


def test_detached_survives_a_command_that_cannot_run(env):
    broken = {**COMMANDS, "edge": ["/nonexistent/halton-meter-edge", "--port", "1"]}
    supervisor = DetachedSupervisor(env.settings, broken)
    started = time.monotonic()
    with pytest.raises(SupervisorError, match="The edge could not be started: could not run "
                                              "/nonexistent/halton-meter-edge.*halton-meter restart"):
        supervisor.start()
    assert time.monotonic() - started < 5  # it says so at once, not after the start timeout
    time.sleep(1.0)  # a few retries later the keeper still stands
    keeper = int(env.pid_file("keeper").read_text())
    assert alive(keeper)
    status = supervisor.status()
    assert status["daemon"].running
    assert not status["edge"].running and status["edge"].pid is None
    assert "No such file" in status["edge"].detail and "the keeper retries" in status["edge"].detail
    assert "service=edge exec_failed" in (env.settings.log_dir / "keeper.log").read_text()

    # Installing a fixed command reloads the running keeper (SIGHUP) instead of replacing it.
    lines = supervisor.install(COMMANDS)
    assert lines[0] == f"wrote {env.settings.run_dir / 'services.json'}"
    assert [line.split(" (")[0] for line in lines[1:]] == ["restarted daemon", "restarted edge"]
    assert supervisor.status()["edge"].running
    assert int(env.pid_file("keeper").read_text()) == keeper
    supervisor.stop()
    assert wait_for(lambda: env.tagged() == [])


@pytest.mark.skipif(not HAS_PROC, reason="pid reuse is detected through /proc")
def test_detached_stale_and_reused_pid_files(env):
    supervisor = DetachedSupervisor(env.settings, COMMANDS)
    supervisor.install(COMMANDS)
    supervisor.stop()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # keeper.pid and daemon.pid now name this test process: alive, but not ours to signal.
    env.pid_file("keeper").write_text(f"{os.getpid()}\n")
    env.pid_file("daemon").write_text(f"{os.getpid()}\n")
    env.pid_file("edge").write_text(f"{dead.pid}\n")
    status = supervisor.status()
    assert not any(state.running for state in status.values())
    assert status["edge"].detail == "stopped (no keeper running)"
    assert supervisor.stop() == []
    assert not list(env.settings.run_dir.glob("*.pid"))

    env.pid_file("keeper").write_text(f"{dead.pid}\n")
    env.pid_file("daemon").write_text(f"{os.getpid()}\n")
    assert supervisor.start()[0].startswith("started keeper")
    running = pids(supervisor)
    assert all(running.values()) and os.getpid() not in running.values()
    supervisor.uninstall()
    assert_all_gone(running)


def test_detached_install_and_uninstall(env):
    supervisor = supervisor_for("detached", env.settings)
    assert not supervisor.is_installed()
    with pytest.raises(SupervisorError, match="not installed.*Run `halton-meter start`"):
        supervisor.start()
    lines = supervisor.install(COMMANDS)
    assert lines[0] == f"wrote {env.settings.run_dir / 'services.json'}"
    assert lines[1].startswith("started keeper (pid ")
    assert stat.S_IMODE((env.settings.run_dir / "services.json").stat().st_mode) == 0o600
    running = pids(supervisor)
    assert supervisor.install(COMMANDS) == []
    assert pids(supervisor) == running

    lines = supervisor.uninstall()
    assert lines[0].startswith("stopped keeper (pid ")
    assert lines[1] == f"removed {env.settings.run_dir / 'services.json'}"
    assert_all_gone(running)
    assert wait_for(lambda: env.tagged() == [])
    assert sorted(p.name for p in env.settings.run_dir.iterdir()) == []
    assert supervisor.uninstall() == []
    assert {state.detail for state in supervisor.status().values()} == {"not installed"}
