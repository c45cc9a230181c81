"""What `init` installed, kept in `<home>/install.json` so that re-running `init`, `status`,
`start`/`stop` and `uninstall` act on exactly that, and nothing else."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from halton_meter.config import Settings, make_private_dir
from halton_meter.tls.ca import write_atomically

MODES = ("run", "apps", "full")  # init, init --apps, init --full


@dataclass
class InstallState:
    mode: str  # one of MODES; "run": only `halton-meter run` routes programs
    supervisor: str  # systemd | launchd | detached
    edge_port: int
    api_port: int
    version: str = ""
    installed_at: float = 0.0
    rc_files: list[str] = field(default_factory=list)  # files holding our marked block
    launchctl_env: list[str] = field(default_factory=list)  # names set with `launchctl setenv`
    trust: dict = field(default_factory=dict)  # {"store": "keychain"|"system"|"none", ...}
    system_proxy: dict | None = None  # previous macOS proxy settings, restored by uninstall


def state_path(settings: Settings) -> Path:
    return settings.home / "install.json"


def load_state(settings: Settings) -> InstallState | None:
    try:
        data = json.loads(state_path(settings).read_text(encoding="utf-8"))
        return InstallState(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise StateError(f"{state_path(settings)} is damaged ({exc}). Run `halton-meter init` to rewrite it.") from exc


def save_state(settings: Settings, state: InstallState) -> None:
    make_private_dir(settings.home)
    data = json.dumps(asdict(state), indent=2, sort_keys=True).encode() + b"\n"
    write_atomically(state_path(settings), data, 0o600)


def remove_state(settings: Settings) -> bool:
    try:
        os.unlink(state_path(settings))
        return True
    except FileNotFoundError:
        return False


class StateError(Exception):
    """install.json cannot be read; the message says how to fix it."""
