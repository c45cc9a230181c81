"""The macOS system proxy (`init --full`): every enabled network service pointed at halton-meter.

`enable` returns what each service had before, and `disable` puts exactly that back, so a
corporate proxy the user already had survives an install and an uninstall.
"""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger(__name__)

PROXY_HOST = "127.0.0.1"
BYPASS_DOMAINS = ("localhost", "127.0.0.1", "::1", "*.local")
NETWORKSETUP_TIMEOUT_S = 30

LINUX_UNSUPPORTED = (
    "halton-meter does not set a system-wide proxy on Linux: every desktop environment keeps it "
    "somewhere else, and most command-line tools ignore it anyway.\n"
    "Use `halton-meter init --apps` to set HTTPS_PROXY and the CA variables in your shell rc files, "
    "or start a program with `halton-meter run`."
)

# Each proxy kind: (key in the saved settings, label, get flag, set flag, state flag).
_KINDS = (
    ("web", "web (HTTP)", "-getwebproxy", "-setwebproxy", "-setwebproxystate"),
    ("secure_web", "secure web (HTTPS)", "-getsecurewebproxy", "-setsecurewebproxy", "-setsecurewebproxystate"),
)
_OFF = {"enabled": False, "server": "", "port": 0, "authenticated": False}
_FIX = ("Set or clear the proxy by hand in System Settings > Network > (service) > Details > Proxies, "
        "or use `halton-meter init --apps` instead.")


class SysProxyError(Exception):
    """A user-facing problem: the failing networksetup command, what it printed, and how to fix it."""


def network_services() -> list[str]:
    """The enabled network services, in networksetup's order."""
    return [name for name in _all_services() if not name.startswith("*")]


def enable(port: int) -> dict:
    """Point every enabled service's web and secure web proxy at 127.0.0.1:`port`.

    Returns each service's previous settings, JSON-serialisable, for `disable`. A proxy already
    at 127.0.0.1:`port` is recorded as off, and our bypass domains are left out of the recorded
    list, so that enabling twice can never make `disable` restore halton-meter itself.
    """
    saved = {service: _current(service, port) for service in network_services()}
    done = {}
    try:
        for service, previous in saved.items():
            for _, _, _, set_flag, _ in _KINDS:
                _networksetup(set_flag, service, PROXY_HOST, str(port))
            # Hosts the user already sent around their proxy keep going direct.
            bypass = list(BYPASS_DOMAINS) + [d for d in previous["bypass_domains"] if d not in BYPASS_DOMAINS]
            _networksetup("-setproxybypassdomains", service, *bypass)
            done[service] = previous
            log.info("system_proxy_enabled service=%s port=%d", service, port)
    except SysProxyError:
        try:
            disable({**done, service: previous})  # leave no service half-switched
        except SysProxyError as rollback_error:
            log.warning("system_proxy_rollback_failed error=%s", rollback_error)
        raise
    return saved


def disable(saved: dict) -> list[str]:
    """Put back each service's settings from `enable`; one human line per change, none if all match."""
    existing = {name.lstrip("*") for name in _all_services()}
    lines = []
    for service, previous in saved.items():
        if service not in existing:
            lines.append(f"{service}: the network service no longer exists; nothing to restore")
            continue
        for key, label, get_flag, set_flag, state_flag in _KINDS:
            want, have = previous[key], _proxy(get_flag, service)
            if _matches(have, want):
                continue
            enabled = have["enabled"]
            if want["server"] and (have["server"], have["port"]) != (want["server"], want["port"]):
                _networksetup(set_flag, service, want["server"], str(want["port"]))  # this also turns it on
                enabled = True
            if enabled != want["enabled"]:
                _networksetup(state_flag, service, "on" if want["enabled"] else "off")
            line = f"{service}: {label} proxy restored to {_describe(want)}"
            if want["authenticated"]:
                line += "; it needs a password, so re-enter it in System Settings > Network if asked"
            lines.append(line)
        have_bypass = _bypass_domains(service)
        if have_bypass != previous["bypass_domains"]:
            # "Empty" is networksetup's word for clearing the list.
            _networksetup("-setproxybypassdomains", service, *(previous["bypass_domains"] or ["Empty"]))
            lines.append(f"{service}: proxy bypass list restored to "
                         f"{', '.join(previous['bypass_domains']) or 'empty'}")
        log.info("system_proxy_restored service=%s", service)
    return lines


def is_enabled(port: int) -> bool:
    """Whether every enabled service sends HTTPS through an enabled proxy at 127.0.0.1:`port`."""
    services = network_services()
    return bool(services) and all(
        _is_ours(_proxy("-getsecurewebproxy", service), port) for service in services)


# -- reading settings --------------------------------------------------------------------------

def _all_services() -> list[str]:
    """Every service, disabled ones still carrying networksetup's leading "*"."""
    lines = _networksetup("-listallnetworkservices").splitlines()
    if lines and "asterisk" in lines[0]:
        lines = lines[1:]  # "An asterisk (*) denotes that a network service is disabled."
    return [line for line in lines if line.strip()]


def _current(service: str, port: int) -> dict:
    settings = {key: _proxy(get_flag, service) for key, _, get_flag, _, _ in _KINDS}
    bypass = _bypass_domains(service)
    for key, proxy in settings.items():
        if _is_ours(proxy, port):
            settings[key] = dict(_OFF)
    if bypass[:len(BYPASS_DOMAINS)] == list(BYPASS_DOMAINS):
        bypass = bypass[len(BYPASS_DOMAINS):]  # enable puts ours first; what follows was the user's
    return {**settings, "bypass_domains": bypass}


def _proxy(get_flag: str, service: str) -> dict:
    """Parse "Enabled: Yes / Server: proxy.corp / Port: 3128 / Authenticated Proxy Enabled: 0"."""
    fields = {}
    for line in _networksetup(get_flag, service).splitlines():
        key, colon, value = line.partition(":")  # partition: an IPv6 server keeps its colons
        if colon:
            fields[key.strip()] = value.strip()
    try:
        port = int(fields.get("Port") or 0)
    except ValueError:
        raise SysProxyError(f"`networksetup {get_flag} {service}` printed an unreadable port "
                            f"{fields.get('Port')!r}. {_FIX}") from None
    return {"enabled": fields.get("Enabled") == "Yes", "server": fields.get("Server", ""),
            "port": port, "authenticated": fields.get("Authenticated Proxy Enabled") == "1"}


def _bypass_domains(service: str) -> list[str]:
    output = _networksetup("-getproxybypassdomains", service)
    if output.startswith("There aren't any bypass domains"):
        return []
    return [line.strip() for line in output.splitlines() if line.strip()]


def _matches(have: dict, want: dict) -> bool:
    if have["enabled"] != want["enabled"]:
        return False
    # A proxy that was never configured has no server to restore; being off is all that matters.
    return not want["server"] or (have["server"], have["port"]) == (want["server"], want["port"])


def _is_ours(proxy: dict, port: int) -> bool:
    return proxy["enabled"] and proxy["server"] == PROXY_HOST and proxy["port"] == port


def _describe(proxy: dict) -> str:
    if proxy["enabled"]:
        return f"{proxy['server']}:{proxy['port']}"
    return f"off (server {proxy['server']}:{proxy['port']} kept)" if proxy["server"] else "off"


def _networksetup(*args: str) -> str:
    command = ["networksetup", *args]
    shown = " ".join(command)
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=NETWORKSETUP_TIMEOUT_S)
    except FileNotFoundError:
        raise SysProxyError("The networksetup command was not found; the system proxy can only be set on macOS. "
                            + LINUX_UNSUPPORTED.splitlines()[-1]) from None
    except subprocess.TimeoutExpired:
        raise SysProxyError(f"`{shown}` did not finish within {NETWORKSETUP_TIMEOUT_S} s. {_FIX}") from None
    # networksetup reports some errors on stdout with "** Error" and exit status 0.
    if done.returncode != 0 or "** Error" in done.stdout:
        output = " | ".join((done.stderr.strip() or done.stdout.strip() or "no output").splitlines())
        raise SysProxyError(f"`{shown}` failed with exit code {done.returncode}: {output}. {_FIX}")
    return done.stdout
