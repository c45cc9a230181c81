"""Trusting the local CA in the OS stores: the macOS login keychain and the Linux system anchors.

The Linux store paths are looked up under $HALTON_METER_TRUST_ROOT (default "/"), so tests and
packagers building into a staging root can point them elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from halton_meter.tls.ca import write_atomically

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60
# add-trusted-cert waits for the user to type a password in a macOS authorisation dialog.
KEYCHAIN_PROMPT_TIMEOUT_S = 300
# `security` exits 44 (errSecItemNotFound) when the keychain holds no matching certificate.
SECURITY_NOT_FOUND = 44
ANCHOR_MODE = 0o644

# (anchors directory under the root, our file name, update command): Debian/Ubuntu/Alpine,
# Fedora/RHEL, Arch. Debian's update-ca-certificates only reads *.crt files.
_SYSTEM_STORES = (
    ("usr/local/share/ca-certificates", "halton-meter.crt", ("update-ca-certificates",)),
    ("etc/pki/ca-trust/source/anchors", "halton-meter.pem", ("update-ca-trust", "extract")),
    ("etc/ca-certificates/trust-source/anchors", "halton-meter.crt", ("trust", "extract-compat")),
)
_PEM_HEADER = "-----BEGIN CERTIFICATE-----"
_PEM_FOOTER = "-----END CERTIFICATE-----"


class TrustError(Exception):
    """A user-facing problem: the failing command, what it printed, and how to fix it."""


@dataclass(frozen=True)
class TrustChange:
    store: str      # "keychain" or "system"
    changed: bool
    detail: str     # one human line: what was done, or why nothing was


@dataclass(frozen=True)
class SystemStore:
    anchors: Path
    filename: str
    update: tuple[str, ...]

    @property
    def anchor_path(self) -> Path:
        return self.anchors / self.filename


def ca_sha1(ca_pem: Path) -> str:
    """Uppercase hex SHA-1 of the CA certificate's DER: the hash `security` prints and takes."""
    return hashlib.sha1(_der(ca_pem)).hexdigest().upper()


# -- macOS login keychain ----------------------------------------------------------------------

def keychain_path() -> Path:
    return Path.home() / "Library" / "Keychains" / "login.keychain-db"


def keychain_trusts(ca_pem: Path) -> bool:
    """Whether the login keychain holds the CA (it is only ever added there with trust settings)."""
    done = _run(["security", "find-certificate", "-a", "-Z", str(keychain_path())],
                fix="Check that the login keychain is unlocked (Keychain Access), then try again.",
                allowed=(0, SECURITY_NOT_FOUND))
    return f"SHA-1 hash: {ca_sha1(ca_pem)}" in done.stdout


def add_to_keychain(ca_pem: Path) -> TrustChange:
    """Trust the CA as a root for the current user; nothing to do if it is already there."""
    sha1 = ca_sha1(ca_pem)
    if keychain_trusts(ca_pem):
        return TrustChange("keychain", False, f"the login keychain already trusts the CA (SHA-1 {sha1})")
    _run(["security", "add-trusted-cert", "-r", "trustRoot", "-k", str(keychain_path()), str(ca_pem)],
         fix="Approve the password dialog macOS shows (run from a logged-in desktop session, not over SSH), "
             "or add the certificate by hand in Keychain Access and set it to Always Trust.",
         timeout_s=KEYCHAIN_PROMPT_TIMEOUT_S)
    log.info("keychain_trusted sha1=%s", sha1)
    return TrustChange("keychain", True, f"added the CA to the login keychain as a trusted root (SHA-1 {sha1})")


def remove_from_keychain(sha1: str) -> TrustChange:
    """Delete the certificate with this SHA-1 and its trust settings; nothing to do if it is absent."""
    done = _run(["security", "delete-certificate", "-Z", sha1, "-t", str(keychain_path())],
                fix="Delete the halton-meter certificate by hand in Keychain Access (login keychain).",
                allowed=(0, SECURITY_NOT_FOUND))
    if done.returncode == SECURITY_NOT_FOUND:
        return TrustChange("keychain", False, f"the login keychain holds no certificate with SHA-1 {sha1}")
    log.info("keychain_untrusted sha1=%s", sha1)
    return TrustChange("keychain", True, f"removed the CA (SHA-1 {sha1}) from the login keychain")


# -- Linux system store ------------------------------------------------------------------------

def system_store() -> SystemStore | None:
    """The first known anchors directory that exists and whose update command is installed."""
    root = Path(os.environ.get("HALTON_METER_TRUST_ROOT") or "/")
    for relative, filename, update in _SYSTEM_STORES:
        anchors = root / relative
        if anchors.is_dir() and shutil.which(update[0]):
            return SystemStore(anchors, filename, update)
    return None


def system_store_permitted(store: SystemStore) -> bool:
    """Whether this process may add a file to the anchors directory (usually: is it root)."""
    return os.access(store.anchors, os.W_OK)


def system_store_trusts(store: SystemStore, ca_pem: Path) -> bool:
    """Whether our anchor file is present and holds exactly this CA certificate."""
    return _read_or_none(store.anchor_path) == ca_pem.read_bytes()


def add_to_system_store(store: SystemStore, ca_pem: Path) -> TrustChange:
    """Copy the CA into the anchors directory (only if different) and rebuild the system bundle."""
    path = store.anchor_path
    previous = _read_or_none(path)
    certificate = ca_pem.read_bytes()
    if previous == certificate:
        return TrustChange("system", False, f"{path} already holds the CA")
    _write_anchor(path, certificate)
    _run_update(store, undo=previous)
    log.info("system_store_trusted path=%s", path)
    verb = "replaced the old CA in" if previous is not None else "added the CA to"
    return TrustChange("system", True, f"{verb} {path} and ran `{' '.join(store.update)}`")


def remove_from_system_store(store: SystemStore) -> TrustChange:
    """Delete our anchor file and rebuild the system bundle; nothing to do if it is absent."""
    path = store.anchor_path
    previous = _read_or_none(path)
    if previous is None:
        return TrustChange("system", False, f"{path} does not exist")
    try:
        path.unlink()
    except OSError as error:
        raise TrustError(f"Could not delete {path}: {error.strerror or error}. "
                         "Run the command again as root (with sudo).") from error
    _run_update(store, undo=previous)
    log.info("system_store_untrusted path=%s", path)
    return TrustChange("system", True, f"removed {path} and ran `{' '.join(store.update)}`")


def per_client_explanation(bundle: Path, proxy_url: str = "http://127.0.0.1:<port>") -> str:
    """What to set instead when the system store cannot be used: one variable per client family."""
    return "\n".join([
        "Without the system trust store, each client has to be pointed at halton-meter's CA itself.",
        "Set these in the environment of the programs whose API calls you want metered:",
        f"  HTTPS_PROXY={proxy_url}",
        "      sends their HTTPS traffic through halton-meter (provider hosts are metered, the rest tunnelled)",
        f"  SSL_CERT_FILE={bundle}",
        "      Python's ssl module and httpx (the OpenAI and Anthropic Python SDKs), OpenSSL-based tools",
        f"  REQUESTS_CA_BUNDLE={bundle}",
        "      Python requests, which ignores SSL_CERT_FILE",
        f"  CURL_CA_BUNDLE={bundle}",
        "      curl",
        f"  NODE_EXTRA_CA_CERTS={bundle}",
        "      Node.js programs, Claude Code and other npm CLIs among them",
        "The bundle holds the system's CAs as well as halton-meter's, so every other site still verifies.",
        "`halton-meter run` sets all five for the command it starts; `halton-meter init --apps` writes",
        "them to your shell rc files so every new shell has them.",
    ])


# -- plumbing ----------------------------------------------------------------------------------

def _run(command: list[str], *, fix: str, allowed: tuple[int, ...] = (0,),
         timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `command`; a missing binary, a timeout or an exit code not in `allowed` is a TrustError."""
    shown = " ".join(command)
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=timeout_s)
    except FileNotFoundError:
        raise TrustError(f"`{shown}` failed: {command[0]} is not installed or not on PATH. {fix}") from None
    except subprocess.TimeoutExpired:
        raise TrustError(f"`{shown}` did not finish within {timeout_s:g} s. {fix}") from None
    if done.returncode not in allowed:
        output = (done.stderr.strip() or done.stdout.strip() or "no output")
        raise TrustError(f"`{shown}` failed with exit code {done.returncode}: {output}. {fix}")
    return done


def _run_update(store: SystemStore, *, undo: bytes | None) -> None:
    """Rebuild the system bundle; if that fails, put the anchor back as it was (`undo`: its
    previous bytes, None for absent), so a retry sees the work as undone and runs it again."""
    try:
        _run(list(store.update),
             fix=f"Fix what {store.update[0]} reports and run the command again as root (with sudo).")
    except TrustError:
        _restore(store.anchor_path, undo)
        raise


def _write_anchor(path: Path, data: bytes) -> None:
    try:
        write_atomically(path, data, ANCHOR_MODE)
    except OSError as error:
        raise TrustError(f"Could not write {path}: {error.strerror or error}. "
                         "Run the command again as root (with sudo), or use the per-client "
                         "variables that `halton-meter init --apps` sets.") from error


def _restore(path: Path, previous: bytes | None) -> None:
    try:
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            write_atomically(path, previous, ANCHOR_MODE)
    except OSError as error:
        log.warning("anchor_restore_failed path=%s error=%s", path, error)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _der(ca_pem: Path) -> bytes:
    """The DER of the first certificate in `ca_pem`."""
    text = ca_pem.read_text("ascii", errors="replace")
    start, end = text.find(_PEM_HEADER), text.find(_PEM_FOOTER)
    if start < 0 or end < start:
        raise TrustError(f"{ca_pem} holds no PEM certificate. "
                         "Run `halton-meter init` to create the CA again.")
    return ssl.PEM_cert_to_DER_cert(text[start: end + len(_PEM_FOOTER)])
