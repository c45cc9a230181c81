"""Where halton-meter keeps its state and what the user configured: one frozen Settings.

Precedence: command-line flags, then `<home>/config.toml`, then defaults. The home directory is
`--home`, else `$HALTON_METER_HOME`, else `~/.halton-meter`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_PORT = 8081
DEFAULT_API_PORT = 8765
DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_CONNECT_TIMEOUT_S = 15.0
DEFAULT_SHUTDOWN_GRACE_S = 2.0


class ConfigError(Exception):
    """A user-facing configuration problem: says what is wrong and how to fix it."""


@dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    listen: str = DEFAULT_LISTEN
    port: int = DEFAULT_PORT
    # provider host -> (address, port) that receives its traffic; SNI, Host and verification
    # still use the provider host name.
    upstreams: dict[str, tuple[str, int]] = field(default_factory=dict)
    upstream_ca_files: tuple[Path, ...] = ()
    # TCP connect plus TLS handshake to an upstream; past it the client gets a 504.
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    # On SIGTERM, how long calls in flight may go on before they are cut (`interrupted`).
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    # The daemon's local HTTP API (api.py), on `listen` too; 0 picks a free port.
    api_port: int = DEFAULT_API_PORT

    @property
    def db_path(self) -> Path:
        return self.home / "db.sqlite"

    @property
    def ca_dir(self) -> Path:
        return self.home / "ca"

    @property
    def bundle_path(self) -> Path:
        return self.home / "ca-bundle.pem"

    @property
    def config_path(self) -> Path:
        return self.home / "config.toml"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"


def resolve_home(flag: str | None = None) -> Path:
    raw = flag or os.environ.get("HALTON_METER_HOME") or "~/.halton-meter"
    return Path(raw).expanduser().resolve()


def load_settings(
    home: Path,
    *,
    port: int | None = None,
    listen: str | None = None,
    api_port: int | None = None,
    upstreams: list[str] | None = None,
    upstream_ca_files: list[str] | None = None,
) -> Settings:
    """Settings from `<home>/config.toml` with command-line values laid over it."""
    settings = _from_file(home)
    if port is not None:
        settings = replace(settings, port=port)
    if listen is not None:
        settings = replace(settings, listen=listen)
    if api_port is not None:
        settings = replace(settings, api_port=api_port)
    if upstreams:
        merged = dict(settings.upstreams)
        merged.update(parse_upstream(item) for item in upstreams)
        settings = replace(settings, upstreams=merged)
    if upstream_ca_files:
        extra = tuple(Path(p).expanduser().resolve() for p in upstream_ca_files)
        settings = replace(settings, upstream_ca_files=settings.upstream_ca_files + extra)
    check_loopback(settings.listen)
    for port_value in (settings.port, settings.api_port):
        if not 0 <= port_value <= 65535:
            raise ConfigError(f"Port {port_value} is out of range. Use a port from 0 to 65535.")
    for path in settings.upstream_ca_files:
        if not path.is_file():
            raise ConfigError(f"Upstream CA file {path} does not exist. Pass an existing PEM file.")
    return settings


def parse_upstream(text: str) -> tuple[str, tuple[str, int]]:
    """`HOST=ADDR:PORT` -> (host, (addr, port))."""
    host, sep, target = text.partition("=")
    addr, colon, port_text = target.rpartition(":")
    if not sep or not host or not colon or not addr or not port_text.isdigit():
        raise ConfigError(
            f"Upstream override {text!r} is not HOST=ADDR:PORT. "
            "Write it like api.anthropic.com=127.0.0.1:9443."
        )
    return host.strip().lower(), (addr.strip("[]"), int(port_text))


def check_loopback(address: str) -> None:
    """Refuse any listen address that is not loopback: the proxy must never face a network.

    A name (`localhost`) is accepted only if every address it resolves to is loopback.
    """
    try:
        candidates = [ipaddress.ip_address(address)]
    except ValueError:
        try:
            candidates = [ipaddress.ip_address(info[4][0].split("%")[0])
                          for info in socket.getaddrinfo(address, None)]
        except (socket.gaierror, UnicodeError, ValueError):
            candidates = []
    if not candidates or not all(ip.is_loopback for ip in candidates):
        raise ConfigError(
            f"Refusing to listen on {address}: halton-meter binds loopback only. "
            "Use 127.0.0.1 (the default) or ::1."
        )


def _from_file(home: Path) -> Settings:
    path = home / "config.toml"
    settings = Settings(home=home)
    if not path.exists():
        return settings
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}). Fix or remove the file.") from exc
    proxy, api = data.get("proxy", {}), data.get("api", {})
    for name, table in (("proxy", proxy), ("api", api)):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table. See the README's configuration section.")
    try:
        upstreams = dict(
            parse_upstream(f"{host}={target}") for host, target in proxy.get("upstreams", {}).items()
        )
        return replace(
            settings,
            port=int(proxy.get("port", DEFAULT_PORT)),
            listen=str(proxy.get("listen", DEFAULT_LISTEN)),
            connect_timeout_s=float(proxy.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S)),
            shutdown_grace_s=float(proxy.get("shutdown_grace_s", DEFAULT_SHUTDOWN_GRACE_S)),
            api_port=int(api.get("port", DEFAULT_API_PORT)),
            upstreams=upstreams,
            upstream_ca_files=tuple(
                Path(p).expanduser().resolve() for p in proxy.get("upstream_ca", [])
            ),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: invalid [proxy] or [api] value ({exc}). See the README's configuration section.") from exc
