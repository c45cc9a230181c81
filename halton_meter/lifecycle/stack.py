"""The installed stack (edge + metering daemon) as one thing: its ports, whether it is up, and
starting it through whichever supervisor `init` chose (supervise.py)."""

from __future__ import annotations

import errno
import socket
import sys
import time

from halton_meter import __version__
from halton_meter.api import get_json
from halton_meter.config import Settings
from halton_meter.edge_process import PORT_SEARCH, handoff_path
from halton_meter.handoff import UNHEALTHY_TTL_S, ping
from halton_meter.lifecycle.state import InstallState, load_state, save_state
from halton_meter.lifecycle.supervise import Supervisor, detect, service_commands, supervisor_for

READY_TIMEOUT_S = 20.0  # a first start creates the CA and mints a dozen leaves with openssl


class StackError(Exception):
    """The stack cannot be brought up; the message names the log to read."""


def edge_listening(listen: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((listen, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def daemon_healthy(settings: Settings) -> bool:
    return ping(handoff_path(settings))


def api_health(settings: Settings, port: int) -> dict | None:
    try:
        status, body = get_json(port, "/health", host=settings.listen)
    except (OSError, ValueError):
        return None
    return body if status == 200 and isinstance(body, dict) else None


def pick_port(listen: str, preferred: int, *, keep: int | None = None) -> int:
    """`keep` if our own stack already holds it, else `preferred` or the next free port after it
    (0: any free port). Chosen once at install time so rc files and apps keep working."""
    if keep:
        return keep
    candidates = [0] if preferred == 0 else range(preferred, preferred + PORT_SEARCH)
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    for candidate in candidates:
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.bind((listen, candidate))
            return probe.getsockname()[1]
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise StackError(f"Cannot bind {listen}:{candidate} ({exc.strerror}).") from exc
        finally:
            probe.close()
    raise StackError(f"No free port on {listen} from {preferred} to {preferred + PORT_SEARCH - 1}. "
                     "Free one, or pass --port.")


def supervisor_of(settings: Settings, state: InstallState | None) -> Supervisor:
    return supervisor_for(state.supervisor if state is not None else detect(), settings)


def wait_ready(settings: Settings, state: InstallState, supervisor: Supervisor,
               timeout_s: float = READY_TIMEOUT_S, *, daemon_too: bool = True) -> None:
    """Until the edge accepts and (with `daemon_too`) the daemon answers on its hand-off channel."""
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        edge = edge_listening(settings.listen, state.edge_port)
        daemon = daemon_healthy(settings) or not daemon_too
        if edge and daemon:
            if waited:  # the edge may still hold its "daemon down" verdict from a moment ago
                time.sleep(UNHEALTHY_TTL_S + 0.05)
            return
        waited = True
        if time.monotonic() > deadline:
            down = [name for name, up in (("edge", edge), ("daemon", daemon)) if not up]
            hints = "; ".join(f"{name}: {supervisor.log_hint(name)}" for name in down)
            raise StackError(f"The {' and '.join(down)} did not come up within {timeout_s:.0f} s. "
                             f"Its log: {hints}")
        time.sleep(0.05)


def ensure_running(settings: Settings, *, wait_for_daemon: bool = True) -> tuple[InstallState, list[str]]:
    """Start the stack if it is not up: the installed one, or (never initialised) a detached one
    with no system changes. Returns the state and what was done. Without `wait_for_daemon`
    (`run`), a listening edge is enough: it forwards unmetered while the daemon comes up or
    fails to, and the user's command does not wait on metering."""
    state = load_state(settings)
    done: list[str] = []
    if state is None:
        state = InstallState(mode="run", supervisor="detached", version=__version__, installed_at=time.time(),
                             edge_port=pick_port(settings.listen, settings.port),
                             api_port=pick_port(settings.listen, settings.api_port))
        supervisor = supervisor_for("detached", settings)
        done += supervisor.install(service_commands(settings, state.edge_port, state.api_port))
        save_state(settings, state)
    else:
        supervisor = supervisor_of(settings, state)
    edge_up = edge_listening(settings.listen, state.edge_port)
    if edge_up and (daemon_healthy(settings) or not wait_for_daemon):
        return state, done
    done += supervisor.start()
    # A first start waits for the daemon whatever the caller wants: it makes the CA bundle.
    wait_ready(settings, state, supervisor, daemon_too=wait_for_daemon or not settings.bundle_path.exists())
    return state, done


def control(settings: Settings, action: str, *, everything: bool = False) -> int:
    """`start`, `stop [--all]`, `restart`: through the installed supervisor; says what changed."""
    state = load_state(settings)
    if action == "start":
        if state is None:
            print("Not initialised: starting a detached proxy with no system changes "
                  "(`halton-meter init` installs supervision that survives reboots).")
        state, done = ensure_running(settings)
        for line in done:
            print(line)
        print(f"Running: edge on 127.0.0.1:{state.edge_port}, metering daemon healthy."
              if done else f"Already running: edge on 127.0.0.1:{state.edge_port}.")
        return 0
    if state is None:
        print(f"Nothing to {action}: halton-meter is not installed in {settings.home} (`halton-meter init`).")
        return 0 if action == "stop" else 1
    supervisor = supervisor_of(settings, state)
    if action == "restart":
        done = supervisor.restart()
        wait_ready(settings, state, supervisor)
    else:
        services = ("daemon", "edge") if everything else ("daemon",)
        done = supervisor.stop(services)
        if not everything:
            print("The edge keeps forwarding, unmetered, so programs using the proxy keep working; "
                  "`halton-meter stop --all` stops it too.")
        elif state.mode != "run":
            print("Programs using the proxy cannot connect until `halton-meter start`.", file=sys.stderr)
    for line in done:
        print(line)
    if not done:
        print(f"Nothing to {action}: already {'stopped' if action == 'stop' else 'done'}.")
    return 0
