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

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from halton_meter.attribution import Rule
    from halton_meter.otlp import OtlpSettings

DEFAULT_PORT = 8081
DEFAULT_API_PORT = 8765
DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_CONNECT_TIMEOUT_S = 15.0
DEFAULT_SHUTDOWN_GRACE_S = 2.0
DEFAULT_MAX_BODY_BYTES = 512 * 1024
DEFAULT_RETENTION_DAYS = 90


class ConfigError(Exception):
    """A user-facing configuration problem: says what is wrong and how to fix it."""


@dataclass(frozen=True, slots=True)
class BodySettings:
    """`[bodies]`: capture with redaction (bodies.py); `project set NAME body-capture on|off`
    overrides `enabled` per project."""

    enabled: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retention_days: int = DEFAULT_RETENTION_DAYS


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
    # Browser origins (scheme://host:port) allowed to read the API besides its own dashboard.
    api_allowed_origins: tuple[str, ...] = ()
    # [bodies]: request/response capture with redaction (bodies.py)
    bodies: BodySettings = field(default_factory=BodySettings)
    # [attribution]: find the calling process's project (attribution.py), then these rules
    process_lookup: bool = True
    attribution_rules: tuple[Rule, ...] = ()
    # [export.otlp]: ship every call to an OpenTelemetry collector (otlp.py); None: off, the default
    otlp: OtlpSettings | None = None
    # [budgets]: a desktop notification for budget events where the platform has one, and the
    # share of a budget that raises the early warning (budgets.py)
    budget_notify: bool = True
    budget_warn_at_percent: int = 80

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


def make_private_dir(path: Path) -> Path:
    """`mkdir -p path`, each directory it creates 0700: the home holds the ledger with captured
    bodies, the CA key and the hand-off socket, whoever creates it first and whatever the umask.
    Directories that exist already are left as they are (`status` reports a loose home)."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another process got there first: its own call made it private
        os.chmod(directory, 0o700)  # a umask can only take bits away; this also covers odd umasks
    return path


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


def _origins(value: object, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith(("http://", "https://"))
                                              for v in value):
        raise ConfigError(f"{path}: [api] allowed_origins must be a list of origins like "
                          '["http://localhost:3000"].')
    return tuple(value)


def _flag(table: dict, name: str, default: bool, path: Path) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: {name} must be true or false, not {value!r}.")
    return value


def _bodies(table: dict, path: Path) -> BodySettings:
    unknown = set(table) - {"enabled", "max_body_bytes", "retention_days"}
    if unknown:
        raise ConfigError(f"{path}: [bodies] has no setting {sorted(unknown)[0]!r}; "
                          "use enabled, max_body_bytes or retention_days.")
    limits = {}
    for name, default in (("max_body_bytes", DEFAULT_MAX_BODY_BYTES), ("retention_days", DEFAULT_RETENTION_DAYS)):
        value = table.get(name, default)
        if type(value) is not int or value < 1:
            raise ConfigError(f"{path}: [bodies] {name} must be a whole number of at least 1, not {value!r}.")
        limits[name] = value
    return BodySettings(enabled=_flag(table, "enabled", True, path), **limits)


_PROXY_KEYS = frozenset({"port", "listen", "connect_timeout_s", "shutdown_grace_s", "upstream_ca", "upstreams"})
_API_KEYS = frozenset({"port", "allowed_origins"})


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
    bodies, attribution = data.get("bodies", {}), data.get("attribution", {})
    budgets = data.get("budgets", {})
    for name, table in (("proxy", proxy), ("api", api), ("bodies", bodies), ("attribution", attribution),
                        ("budgets", budgets)):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table. See the README's configuration section.")
    from halton_meter.attribution import parse_rules  # it raises ConfigError, defined here

    unknown = set(attribution) - {"process_lookup", "rules"}
    if unknown:
        raise ConfigError(f"{path}: [attribution] has no setting {sorted(unknown)[0]!r}; "
                          "use process_lookup or [[attribution.rules]].")

    for name, table, known in (("proxy", proxy, _PROXY_KEYS), ("api", api, _API_KEYS)):
        unknown = set(table) - known
        if unknown:
            # A typo, or a setting that does not exist (an [api] listen address, say), must not
            # be silently ignored.
            raise ConfigError(f"{path}: [{name}] has no setting {sorted(unknown)[0]!r}; "
                              f"use {', '.join(sorted(known))}.")
    unknown = set(budgets) - {"notify", "warn_at_percent"}
    if unknown:
        raise ConfigError(f"{path}: [budgets] has no setting {sorted(unknown)[0]!r}; use notify or warn_at_percent.")
    warn_at = budgets.get("warn_at_percent", 80)
    if type(warn_at) is not int or not 1 <= warn_at <= 99:
        raise ConfigError(f"{path}: [budgets] warn_at_percent must be a whole number from 1 to 99, not {warn_at!r}.")
    settings = replace(settings, budget_notify=_flag(budgets, "notify", True, path), budget_warn_at_percent=warn_at)
    settings = replace(settings, bodies=_bodies(bodies, path),
                       process_lookup=_flag(attribution, "process_lookup", True, path),
                       attribution_rules=parse_rules(attribution.get("rules"), where=str(path)))
    export = data.get("export", {})
    if not isinstance(export, dict):
        raise ConfigError(f"{path}: [export] must be a table. See the README's configuration section.")
    from halton_meter.otlp import parse_otlp_settings  # here: otlp imports ledger, which imports config

    settings = replace(settings, otlp=parse_otlp_settings(export.get("otlp"), where=str(path)))
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
            api_allowed_origins=_origins(api.get("allowed_origins", []), path),
            upstreams=upstreams,
            upstream_ca_files=tuple(
                Path(p).expanduser().resolve() for p in proxy.get("upstream_ca", [])
            ),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: invalid [proxy] or [api] value ({exc}). See the README's configuration section.") from exc
