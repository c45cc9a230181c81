"""`init` and `uninstall`: bring the machine to one install state, or take every trace of it away.

`init` reconciles: from nothing or from any earlier mode it applies the wanted state (CA and
bundle, supervision, shell rc block, launchctl environment, trust, macOS system proxy), undoing
what the earlier state had and the new one does not. It ends with the self-test; if that fails, it
puts the previous state back (or removes everything when there was none) and exits non-zero.
`uninstall` removes trust first, so nothing trusts a CA whose proxy is gone, then supervision,
the shell rc block and proxy settings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, TextIO

from halton_meter import __version__
from halton_meter.config import Settings
from halton_meter.lifecycle import shellrc, sysproxy, trust
from halton_meter.lifecycle.runenv import CA_VARIABLES, PROXY_VARIABLES, metering_env, proxy_url
from halton_meter.lifecycle.selftest import run_selftest
from halton_meter.lifecycle.stack import (StackError, edge_listening, pick_port, wait_ready)
from halton_meter.lifecycle.state import InstallState, StateError, load_state, remove_state, save_state
from halton_meter.lifecycle.supervise import (Supervisor, SupervisorError, detect, service_commands,
                                              supervisor_for)

# Everything a step may raise that means "this step failed, for a reason the message explains".
STEP_ERRORS = (SupervisorError, StackError, shellrc.ShellRcError, trust.TrustError, sysproxy.SysProxyError,
               OSError)
LAUNCHCTL_TIMEOUT_S = 10


class InitError(Exception):
    """init failed (and was rolled back); the message says why and what to do."""


class Report:
    """The lines a command prints: `step` for what changed or was checked, aligned."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.changed = 0

    def step(self, name: str, text: str, *, changed: bool = False) -> None:
        self.changed += changed
        print(f"  {name:<11} {text}", file=self.out, flush=True)


def macos(supervisor_kind: str) -> bool:
    """launchd exists only on macOS, so its supervisor marks the macOS integrations (keychain,
    launchctl environment, system proxy); on Linux tests it selects the same code paths."""
    return supervisor_kind == "launchd"


def run_init(settings: Settings, *, mode: str, shell_rc: bool = True, interactive: bool = False,
             port: int | None = None, api_port: int | None = None, ready_timeout_s: float = 20.0,
             out: TextIO = sys.stdout, ask: Callable[[str], bool] | None = None) -> int:
    from halton_meter.serve import prepare_ca

    report = Report(out)
    try:
        previous = load_state(settings)
    except StateError as exc:
        print(f"halton-meter: {exc}; reconciling from scratch (leftovers are swept)", file=sys.stderr)
        previous = None
        _sweep(settings, report)
    kind = detect()
    print(f"halton-meter init: mode {mode}, supervisor {kind}, home {settings.home}", file=out)

    _private_home(settings, report)
    ca = prepare_ca(settings)  # idempotent: made once, rebuilt only when out of date
    report.step("CA", f"{ca.ca_cert_path} (SHA-256 {ca.fingerprint_sha256[:23]}…)")
    report.step("bundle", f"{settings.bundle_path}")

    edge_port, api_port = _ports(settings, previous, port, api_port)
    wanted = InstallState(mode=mode, supervisor=kind, edge_port=edge_port, api_port=api_port,
                          version=__version__, installed_at=time.time(),
                          trust=dict(previous.trust) if previous else {},
                          system_proxy=previous.system_proxy if previous else None)
    confirm = ask if interactive and ask is not None else (lambda _question: True)
    try:
        wanted = apply(settings, wanted, previous, report, shell_rc=shell_rc, confirm=confirm)
        save_state(settings, wanted)
        supervisor = supervisor_for(kind, settings)
        wait_ready(settings, wanted, supervisor, ready_timeout_s)
        result = run_selftest(settings, wanted.edge_port)
        if not result.ok:
            raise InitError(f"the self-test failed: {result.reason}")
        report.step("self-test", f"passed in {result.elapsed_ms:.0f} ms: a streamed call through "
                                 f"127.0.0.1:{wanted.edge_port} was metered exactly")
    except (InitError, *STEP_ERRORS) as exc:
        print(f"halton-meter: init failed: {exc}", file=sys.stderr)
        _roll_back(settings, wanted, previous, report)
        return 1
    _panel(settings, wanted, ca.fingerprint_sha256, out)
    return 0


def _private_home(settings: Settings, report: Report) -> None:
    """The home holds the ledger (prompts' metadata, later bodies) and the CA: owner only."""
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = settings.home.stat().st_mode & 0o777
    if mode & 0o077:
        settings.home.chmod(0o700)
        report.step("home", f"{settings.home}: mode {mode:o} -> 700 (owner only)", changed=True)


def _ports(settings: Settings, previous: InstallState | None, port: int | None,
           api_port: int | None) -> tuple[int, int]:
    """Ports chosen once: a running stack keeps its own, others start from the configured ones."""
    running = previous is not None and edge_listening(settings.listen, previous.edge_port)
    if port is None or (previous is not None and port == previous.edge_port):
        edge = pick_port(settings.listen, previous.edge_port if previous else settings.port,
                         keep=previous.edge_port if running else None)
    else:
        edge = pick_port(settings.listen, port)
    if api_port is None or (previous is not None and api_port == previous.api_port):
        api = pick_port(settings.listen, previous.api_port if previous else settings.api_port,
                        keep=previous.api_port if running else None)
    else:
        api = pick_port(settings.listen, api_port)
    return edge, api


def apply(settings: Settings, wanted: InstallState, previous: InstallState | None, report: Report,
          *, shell_rc: bool = True, confirm: Callable[[str], bool] = lambda _q: True) -> InstallState:
    """Make the machine match `wanted`, undoing what `previous` had that `wanted` does not."""
    supervisor = supervisor_for(wanted.supervisor, settings)
    if previous is not None and previous.supervisor != wanted.supervisor:
        for line in supervisor_for(previous.supervisor, settings).uninstall():
            report.step("supervisor", f"{previous.supervisor}: {line}", changed=True)
    lines = supervisor.install(service_commands(settings, wanted.edge_port, wanted.api_port))
    restarted = previous is not None and (previous.edge_port, previous.api_port) != (wanted.edge_port, wanted.api_port)
    if restarted and previous.supervisor == wanted.supervisor:
        lines += supervisor.restart()  # new ports are in the commands; running services have the old ones
    lines += supervisor.start()
    for line in lines:
        report.step("supervisor", f"{wanted.supervisor}: {line}", changed=True)
    if not lines:
        report.step("supervisor", f"{wanted.supervisor}: installed and running (unchanged)")

    # Each step records what it changed in `wanted` as it goes, so that a failure half-way is
    # rolled back from what really happened. The user's own NO_PROXY is kept.
    env = metering_env(settings.listen, wanted.edge_port, settings.bundle_path, current=dict(os.environ))
    _apply_rc(wanted, previous, env, report, shell_rc, confirm)
    _apply_launchctl(wanted, previous, env, report)
    _apply_trust(settings, wanted, previous, report, confirm)
    _apply_system_proxy(wanted, previous, report)
    return wanted


def _apply_rc(wanted: InstallState, previous: InstallState | None, env: dict[str, str], report: Report,
              shell_rc: bool, confirm) -> None:
    files = wanted.rc_files = []
    if wanted.mode in ("apps", "full") and shell_rc:
        candidates = shellrc.rc_files(Path.home(), os.environ.get("SHELL"), _xdg_config_home(),
                                      zdotdir=Path(os.environ["ZDOTDIR"]) if os.environ.get("ZDOTDIR") else None)
        for path in candidates:
            if not confirm(f"Add the metering environment to {path}?"):
                continue
            files.append(str(path))  # recorded first: a failed write may have half-happened
            changed = shellrc.write_block(path, env)
            report.step("shell rc", f"{'wrote' if changed else 'unchanged:'} the marked block in {path}",
                        changed=changed)
    elif wanted.mode in ("apps", "full"):
        report.step("shell rc", "skipped (--no-shell-rc): set the variables yourself, or use `halton-meter run`")
    for stale in (previous.rc_files if previous else []):
        if stale not in files and shellrc.remove_block(Path(stale)):
            report.step("shell rc", f"removed the block from {stale}", changed=True)


def _apply_launchctl(wanted: InstallState, previous: InstallState | None, env: dict[str, str],
                     report: Report) -> None:
    """GUI apps on macOS do not read shell rc files: `launchctl setenv` gives them the variables."""
    names = wanted.launchctl_env = []
    if wanted.mode in ("apps", "full") and macos(wanted.supervisor):
        for name in (*PROXY_VARIABLES, "NO_PROXY", *CA_VARIABLES):
            names.append(name)
            _launchctl("setenv", name, env[name])
        report.step("apps", f"launchctl setenv {len(names)} variables for apps started from now on", changed=True)
    stale = [name for name in (previous.launchctl_env if previous else []) if name not in names]
    for name in stale:
        _launchctl("unsetenv", name)
    if stale:
        report.step("apps", f"launchctl unsetenv {len(stale)} variables", changed=True)


def _apply_trust(settings: Settings, wanted: InstallState, previous: InstallState | None, report: Report,
                 confirm) -> None:
    ca_pem = settings.ca_dir / "ca.pem"
    sha1 = trust.ca_sha1(ca_pem)
    before = dict(previous.trust) if previous else {}
    if macos(wanted.supervisor):
        store_name = "keychain"
    else:
        store = trust.system_store()
        already = before.get("store") == "system" and before.get("sha1") == sha1
        usable = store is not None and trust.system_store_permitted(store)
        store_name = "system" if usable and (already or confirm(
            f"Trust the halton-meter CA in the system store ({store.anchors})?")) else "none"
    if before.get("store") not in (None, "none") and (before.get("sha1") != sha1 or before["store"] != store_name):
        wanted.trust = before  # still recorded if the removal fails, so uninstall can retry it
        _remove_trust(before, report)  # a rebuilt CA, or a store this run no longer uses
    if store_name == "keychain":
        wanted.trust = {"store": "keychain", "sha1": sha1}
        change = trust.add_to_keychain(ca_pem)
    elif store_name == "system":
        wanted.trust = {"store": "system", "sha1": sha1, "anchor": str(store.anchor_path)}
        change = trust.add_to_system_store(store, ca_pem)
    else:
        wanted.trust = {"store": "none", "sha1": sha1}
        why = ("no system trust store found" if store is None else
               f"{store.anchors} is not writable by you" if not usable else "you chose not to")
        report.step("trust", f"the system store is not used ({why}); clients trust the CA through the bundle "
                             "variables (`halton-meter run` sets them; `halton-meter doctor` explains)")
        return
    report.step("trust", change.detail, changed=change.changed)


def _apply_system_proxy(wanted: InstallState, previous: InstallState | None, report: Report) -> None:
    saved = wanted.system_proxy = previous.system_proxy if previous else None
    if wanted.mode == "full" and macos(wanted.supervisor):
        if saved is not None and sysproxy.is_enabled(wanted.edge_port):
            report.step("sys proxy", f"every network service uses 127.0.0.1:{wanted.edge_port} (unchanged)")
            return
        if saved is not None:  # ours, but on an old port: put the user's back before re-enabling
            sysproxy.disable(saved)
            wanted.system_proxy = None
        wanted.system_proxy = sysproxy.enable(wanted.edge_port)
        report.step("sys proxy", f"{len(wanted.system_proxy)} network service(s) now use "
                                 f"127.0.0.1:{wanted.edge_port}", changed=True)
        return
    if wanted.mode == "full":
        report.step("sys proxy", "not supported on Linux: " + sysproxy.LINUX_UNSUPPORTED.splitlines()[0])
    if saved is not None:
        for line in sysproxy.disable(saved):
            report.step("sys proxy", line, changed=True)
        wanted.system_proxy = None


def _roll_back(settings: Settings, wanted: InstallState, previous: InstallState | None, report: Report) -> None:
    print("halton-meter: rolling back", file=sys.stderr)
    try:
        if previous is None:
            teardown(settings, wanted, report)
            remove_state(settings)
        else:
            save_state(settings, apply(settings, previous, wanted, report))
    except STEP_ERRORS as exc:
        print(f"halton-meter: the rollback did not finish ({exc}); run `halton-meter uninstall` "
              "to remove what is left", file=sys.stderr)


def teardown(settings: Settings, state: InstallState, report: Report) -> list[str]:
    """Undo `state`: trust first, then supervision, shell rc, launchctl environment, system proxy.
    Returns the failures (each step is tried even when an earlier one failed)."""
    failures = []
    steps = (
        ("trust", lambda: _remove_trust(state.trust, report)),
        ("supervisor", lambda: [report.step("supervisor", f"{state.supervisor}: {line}", changed=True)
                                for line in supervisor_for(state.supervisor, settings).uninstall()]),
        ("shell rc", lambda: [report.step("shell rc", f"removed the block from {path}", changed=True)
                              for path in state.rc_files if shellrc.remove_block(Path(path))]),
        ("apps", lambda: _apply_launchctl(replace(state, mode="run", launchctl_env=[]), state, {}, report)),
        ("sys proxy", lambda: [report.step("sys proxy", line, changed=True)
                               for line in (sysproxy.disable(state.system_proxy) if state.system_proxy else [])]),
    )
    for name, step in steps:
        try:
            step()
        except STEP_ERRORS as exc:
            report.step(name, f"FAILED: {exc}")
            failures.append(f"{name}: {exc}")
    return failures


def _remove_trust(recorded: dict, report: Report) -> None:
    store = recorded.get("store")
    if store == "keychain" and recorded.get("sha1"):
        change = trust.remove_from_keychain(recorded["sha1"])
        report.step("trust", change.detail, changed=change.changed)
    elif store == "system":
        system = trust.system_store()
        if system is not None:
            change = trust.remove_from_system_store(system)
            report.step("trust", change.detail, changed=change.changed)


def _launchctl(*args: str) -> None:
    try:
        done = subprocess.run(["launchctl", *args], capture_output=True, text=True, timeout=LAUNCHCTL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SupervisorError(f"`launchctl {' '.join(args[:2])}` could not run ({exc}).") from exc
    if done.returncode != 0:
        raise SupervisorError(f"`launchctl {' '.join(args[:2])}` failed: {done.stderr.strip() or done.returncode}")


def _xdg_config_home() -> Path | None:
    value = os.environ.get("XDG_CONFIG_HOME")
    return Path(value) if value else None


def _panel(settings: Settings, state: InstallState, fingerprint: str, out: TextIO) -> None:
    url = proxy_url(settings.listen, state.edge_port)
    if state.mode == "run":
        mode, next_step = "run (only commands started with `halton-meter run`)", "halton-meter run -- claude"
    elif state.mode == "apps":
        mode, next_step = "apps (new shells and apps use the proxy)", "open a new terminal, then: claude"
    else:
        mode, next_step = "full (apps + system proxy where supported)", "open a new terminal, then: claude"
    rows = [("mode", mode), ("proxy", f"{url} (edge; always on)"),
            ("API", f"http://{settings.listen}:{state.api_port}/health"),
            ("supervisor", state.supervisor), ("CA SHA-256", fingerprint), ("next", next_step),
            ("then", "halton-meter report")]
    width = max(len(value) for _, value in rows) + 14
    print("+" + "-" * width + "+", file=out)
    print(f"| {'halton-meter is metering':<{width - 2}} |", file=out)
    for name, value in rows:
        print(f"| {name:<11} {value:<{width - 14}} |", file=out)
    print("+" + "-" * width + "+", file=out)


def run_uninstall(settings: Settings, *, purge: bool, include_logs: bool, out: TextIO = sys.stdout) -> int:
    """Remove the integration; with --purge also the home directory except the database; with
    --include-logs (implies --purge) the database too. Nothing is purged while a step failed."""
    report = Report(out)
    print(f"halton-meter uninstall: home {settings.home}", file=out)
    try:
        state = load_state(settings)
    except StateError as exc:
        report.step("install", f"{exc}: sweeping every place halton-meter installs to")
        state = None
    failures: list[str] = []
    if state is not None:
        failures = teardown(settings, state, report)
        if not failures:
            remove_state(settings)
    else:
        failures = _sweep(settings, report)
        remove_state(settings)
    if failures:
        print("halton-meter: some steps failed (above); fix them and run `halton-meter uninstall` again "
              "(nothing was purged, so it can)", file=sys.stderr)
        return 1
    if purge or include_logs:
        _purge(settings, report, keep_database=not include_logs)
    _tell_restarts(state, out)
    print(f"Done: {report.changed} change(s).", file=out)
    return 0


def _sweep(settings: Settings, report: Report) -> list[str]:
    """With no (readable) install record: remove whatever halton-meter may have installed, from
    every supervisor kind, the usual rc files and our trust anchors. Returns the failures."""
    failures = []
    for kind in ("detached", "systemd", "launchd"):
        try:
            supervisor: Supervisor = supervisor_for(kind, settings)
            if supervisor.is_installed():
                for line in supervisor.uninstall():
                    report.step("supervisor", f"{kind}: {line}", changed=True)
        except STEP_ERRORS as exc:
            if kind == "detached":
                failures.append(f"supervisor: {exc}")
    rc = shellrc.rc_files(Path.home(), os.environ.get("SHELL"), _xdg_config_home())
    for path in {*rc, Path.home() / ".bashrc", Path.home() / ".zshrc", Path.home() / ".profile"}:
        try:
            if shellrc.remove_block(path):
                report.step("shell rc", f"removed the block from {path}", changed=True)
        except shellrc.ShellRcError as exc:
            failures.append(f"shell rc: {exc}")
    store = trust.system_store()
    ca_pem = settings.ca_dir / "ca.pem"
    try:
        if store is not None and store.anchor_path.exists():
            change = trust.remove_from_system_store(store)
            report.step("trust", change.detail, changed=change.changed)
        if sys.platform == "darwin" and ca_pem.exists():
            change = trust.remove_from_keychain(trust.ca_sha1(ca_pem))
            report.step("trust", change.detail, changed=change.changed)
    except (trust.TrustError, OSError) as exc:
        failures.append(f"trust: {exc}")
    if not report.changed:
        report.step("install", "nothing installed")
    return failures


def _purge(settings: Settings, report: Report, *, keep_database: bool) -> None:
    database = {settings.db_path.name, settings.db_path.name + "-wal", settings.db_path.name + "-shm"}
    if not settings.home.is_dir():
        return
    if keep_database:
        _fold_wal(settings.db_path)
    for entry in sorted(settings.home.iterdir()):
        if keep_database and entry.name in database:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        report.step("removed", str(entry), changed=True)
    if not any(settings.home.iterdir()):
        settings.home.rmdir()
        report.step("removed", str(settings.home), changed=True)
    elif keep_database and settings.db_path.exists():
        report.step("kept", f"{settings.db_path} (your call history; --include-logs removes it)")


def _fold_wal(path: Path) -> None:
    """Checkpoint the write-ahead log into the database file, so the one file kept is complete
    and its -wal/-shm companions go away with the last connection."""
    import sqlite3

    if not path.exists():
        return
    try:
        db = sqlite3.connect(path, timeout=5)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("PRAGMA journal_mode=DELETE")
        finally:
            db.close()
    except sqlite3.Error:
        pass  # kept as it is: the -wal file then stays beside it, and is needed


def _tell_restarts(state: InstallState | None, out: TextIO) -> None:
    """Programs started while the proxy variables were set still have them: name them."""
    if state is None:
        return
    marker = f":{state.edge_port}"
    holders = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            data = environ.read_bytes()
        except OSError:
            continue
        if any(line.startswith(b"HTTPS_PROXY=") and marker.encode() in line for line in data.split(b"\0")):
            pid = int(environ.parent.name)
            if pid == os.getpid():
                continue
            try:
                name = (environ.parent / "comm").read_text().strip()
            except OSError:
                name = "?"
            holders.append(f"{name} (pid {pid})")
    if holders:
        print("Restart these programs: they still send their calls to the removed proxy:", file=out)
        for holder in holders[:20]:
            print(f"  {holder}", file=out)
    if state.mode in ("apps", "full"):
        print("Open a new terminal (and restart apps started since init): existing shells still have "
              "the proxy variables.", file=out)
