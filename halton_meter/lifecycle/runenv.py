"""The metering environment: the variables that send a program's provider calls through the proxy.

`run` puts them in front of one command; `init --apps` writes the same ones (without a project)
into the shell rc block and, on macOS, `launchctl setenv` for GUI apps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from halton_meter.attribution import ProjectNameError, check_project

# Provider SDKs read the upper-case names; curl reads `http_proxy` only in lower case, so both.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")
# Python's ssl and httpx, requests, curl, Node (Claude Code, Codex CLI, Gemini CLI).
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def proxy_url(listen: str, port: int, project: str | None = None) -> str:
    """`http://[project@]127.0.0.1:PORT`: clients send the project as the proxy user name."""
    host = f"[{listen}]" if ":" in listen else listen
    user = f"{check_project(project)}@" if project else ""
    return f"http://{user}{host}:{port}"


def metering_env(listen: str, port: int, bundle: Path, *, project: str | None = None,
                 current: dict[str, str] | None = None) -> dict[str, str]:
    """The variables to set (not the whole environment). `current` supplies an existing NO_PROXY
    to extend, so hosts the user already keeps direct stay direct."""
    url = proxy_url(listen, port, project)
    env = {name: url for name in PROXY_VARIABLES}
    existing = ""
    if current is not None:
        existing = current.get("NO_PROXY") or current.get("no_proxy") or ""
    kept = [item.strip() for item in existing.split(",") if item.strip()]
    no_proxy = ",".join(kept + [name for name in LOOPBACK if name not in kept])
    env.update({name: no_proxy for name in NO_PROXY_VARIABLES})
    env.update({name: str(bundle) for name in CA_VARIABLES})
    if project:
        env["HALTON_PROJECT"] = project
    return env


def run_command(settings, argv: list[str], *, project: str | None, shell: bool) -> int:
    """exec `argv` with the metering environment; returns only when it cannot be started.

    Never breaks the user's work: when the proxy cannot be brought up, the command still runs,
    unmetered, after a warning on stderr."""
    from halton_meter.lifecycle.stack import StackError, daemon_healthy, ensure_running
    from halton_meter.lifecycle.state import StateError
    from halton_meter.lifecycle.supervise import SupervisorError

    if project is not None:
        try:
            check_project(project)
        except ProjectNameError as exc:
            print(f"halton-meter: {exc}", file=sys.stderr)
            return 2
    env = dict(os.environ)
    state, done, warning = None, [], "halton-meter's config.toml is invalid"
    if settings is not None:
        try:
            state, done = ensure_running(settings, wait_for_daemon=False)
        except (StackError, SupervisorError, StateError, OSError) as exc:
            warning = str(exc)
    for line in done:
        print(f"halton-meter: {line}", file=sys.stderr)
    if state is None:
        print(f"halton-meter: the proxy is not running ({warning}); running the command UNMETERED",
              file=sys.stderr)
    else:
        if not daemon_healthy(settings):
            print("halton-meter: metering is down (the daemon is not running); calls go through "
                  "unmetered. See `halton-meter status`.", file=sys.stderr)
        env.update(metering_env(settings.listen, state.edge_port, settings.bundle_path, project=project,
                                current=env))
    if shell:
        login = env.get("SHELL") or "/bin/sh"
        # Like ssh: the words are joined with spaces and the shell parses them (pipes, $VARS, aliases).
        argv = [login, "-c", " ".join(argv)] if argv else [login]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        print(f"halton-meter run: {argv[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"halton-meter run: {argv[0]}: permission denied", file=sys.stderr)
        return 126
    except OSError as exc:
        print(f"halton-meter run: {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 126
