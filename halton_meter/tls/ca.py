"""The local certificate authority: a name-constrained root and per-host leaf certificates.

Everything cryptographic is done by the `openssl` command-line tool; this module only decides
what to ask it for, caches the results on disk and in memory, and keeps the key files private.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import hashlib
import logging
import os
import pathlib
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

CA_VALIDITY_DAYS = 3650
# Apple platforms and the CA/Browser Forum cap server certificates at 398 days; stay a day short.
LEAF_VALIDITY_DAYS = 397
LEAF_RENEW_BEFORE_S = 30 * 86400
# A leaf must never outlive its issuer, so the CA is rebuilt once it has less than this left.
CA_RENEW_BEFORE_S = (LEAF_VALIDITY_DAYS + 3) * 86400
OPENSSL_TIMEOUT_S = 30

_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_INSTALL_HINT = ("Install the openssl command-line tool (OpenSSL 1.1.1 or newer, "
                 "e.g. `apt install openssl`) and try again.")

_CA_CONFIG = """\
[req]
prompt = no
distinguished_name = dn
[dn]
CN = {common_name}
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
nameConstraints = critical, {constraints}
"""
# RFC 5280 4.2.1.10: a CA with only DNS constraints may still vouch for any IP address, so every
# address is excluded. Bumped whenever the constraints change: an older CA is rebuilt.
_EXCLUDED_IPS = "excluded;IP:0.0.0.0/0.0.0.0, excluded;IP:0:0:0:0:0:0:0:0/0:0:0:0:0:0:0:0"
CONSTRAINTS_VERSION = 2

_LEAF_CONFIG = """\
[req]
prompt = no
distinguished_name = dn
[dn]
CN = {host}
[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:{host}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class CAError(Exception):
    """A user-facing problem: str(e) is one sentence saying what is wrong and one saying how to fix it."""


class CertificateAuthority:
    """A CA in `directory` that may sign only `hosts`; thread-safe, and safe across processes."""

    def __init__(self, directory: pathlib.Path, hosts: Iterable[str], *, openssl: str = "openssl") -> None:
        self.directory = pathlib.Path(directory)
        self.hosts: tuple[str, ...] = tuple(sorted({_normalise(h) for h in hosts}))
        if not self.hosts:
            raise CAError("The CA was given no hosts to sign for. Pass at least one provider host.")
        for host in self.hosts:
            if not _HOST_RE.match(host):
                raise CAError(f"{host!r} is not a valid DNS host name. "
                              "Remove it from the provider host list.")
        self.ca_cert_path = self.directory / "ca.pem"
        self.ca_key_path = self.directory / "ca.key"
        self.hosts_path = self.directory / "hosts.txt"
        self.leaf_key_path = self.directory / "leaf.key"
        self.leaves_dir = self.directory / "leaves"
        self.leaves_minted = 0  # leaf certificates this instance asked openssl for (status and tests)
        self._openssl_cmd = openssl
        self._lock = threading.Lock()  # guards the dicts below and the counter
        self._host_locks: dict[str, threading.Lock] = {}
        self._leaf_not_after: dict[str, float] = {}
        self._contexts: dict[str, tuple[ssl.SSLContext, float]] = {}
        self._leaf_key_lock = threading.Lock()

    # -- the CA ------------------------------------------------------------------------------

    def ensure(self) -> bool:
        """Create the CA, or rebuild it when the host list changed or it nears expiry; True if new."""
        # A new CA also chmods the directory to 0700 whatever the umask; an existing CA's loose
        # permissions are reported by check_permissions rather than silently repaired.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._process_lock():
            reason = self._rebuild_reason()
            if reason is not None:
                self._create_ca(reason)
        self.check_permissions()
        return reason is not None

    def check_permissions(self) -> None:
        """Raise CAError if a key or the directory is missing or open to other users."""
        if not self.directory.is_dir():
            raise CAError(f"The CA directory {self.directory} does not exist. "
                          "Restart halton-meter to create a new CA.")
        for path in (self.ca_key_path, self.ca_cert_path):
            if not path.is_file():
                raise CAError(f"The CA file {path} is missing. "
                              "Restart halton-meter to create a new CA, then trust it again.")
        _require_private(self.directory, "The CA directory", "is accessible by", 0o700)
        _require_private(self.ca_key_path, "The CA private key", "is readable by", 0o600)
        if self.leaf_key_path.exists():
            _require_private(self.leaf_key_path, "The leaf private key", "is readable by", 0o600)

    @property
    def fingerprint_sha256(self) -> str:
        der = ssl.PEM_cert_to_DER_cert(self.ca_cert_path.read_text("ascii"))
        return hashlib.sha256(der).digest().hex(":").upper()

    def pending_rebuild(self) -> str | None:
        """Why the next `ensure()` would (re)build the CA, or None when it is current."""
        return self._rebuild_reason()

    def _rebuild_reason(self) -> str | None:
        if not (self.ca_key_path.is_file() and self.ca_cert_path.is_file() and self.hosts_path.is_file()):
            return "created"  # hosts.txt is written last, so its absence also marks a crashed build
        recorded = tuple(self.hosts_path.read_text("ascii").split())
        version = recorded[0].removeprefix("constraints=") if recorded and recorded[0].startswith("constraints=") else "1"
        recorded = tuple(word for word in recorded if not word.startswith("constraints="))
        if version != str(CONSTRAINTS_VERSION):
            log.warning("ca_rebuild reason=constraints_changed from=%s to=%s", version, CONSTRAINTS_VERSION)
            return "constraints_changed"
        if recorded != self.hosts:
            log.warning("ca_rebuild reason=hosts_changed added=%s removed=%s",
                        ",".join(sorted(set(self.hosts) - set(recorded))) or "-",
                        ",".join(sorted(set(recorded) - set(self.hosts))) or "-")
            return "hosts_changed"
        try:
            remaining_s = _not_after(self.ca_cert_path.read_bytes()) - time.time()
        except ValueError:
            log.warning("ca_rebuild reason=unreadable cert=%s", self.ca_cert_path)
            return "unreadable"
        if remaining_s < CA_RENEW_BEFORE_S:
            log.warning("ca_rebuild reason=expiring cert=%s", self.ca_cert_path)
            return "expiring"
        return None

    def _create_ca(self, reason: str) -> None:
        os.chmod(self.directory, 0o700)
        self.hosts_path.unlink(missing_ok=True)
        self._forget_leaves()
        self.leaf_key_path.unlink(missing_ok=True)
        self._new_key(self.ca_key_path)
        common_name = f"halton-meter local CA ({_machine_name()}) {secrets.token_hex(4)}"
        permitted = ", ".join(f"permitted;DNS:{host}" for host in self.hosts)
        config = _CA_CONFIG.format(common_name=common_name, constraints=f"{permitted}, {_EXCLUDED_IPS}")
        with self._config_file(config) as config_path:
            cert = self._openssl("req", "-new", "-x509", "-config", config_path, "-extensions", "ca_ext",
                                 "-key", self.ca_key_path, "-sha256", "-days", str(CA_VALIDITY_DAYS),
                                 "-set_serial", _random_serial())
        write_atomically(self.ca_cert_path, cert, 0o644)
        record = "".join(f"{line}\n" for line in (f"constraints={CONSTRAINTS_VERSION}", *self.hosts))
        write_atomically(self.hosts_path, record.encode("ascii"), 0o644)
        log.info("ca_%s dir=%s fingerprint=%s hosts=%d", reason if reason == "created" else "rebuilt",
                 self.directory, self.fingerprint_sha256, len(self.hosts))

    # -- leaves ------------------------------------------------------------------------------

    def leaf_paths(self, host: str) -> tuple[pathlib.Path, pathlib.Path]:
        """(certificate chain, key) for `host`, minting a leaf if none is on disk or it expires soon."""
        host = self._admit(host)
        self._fresh_leaf(host)
        return self.leaves_dir / f"{host}.pem", self.leaf_key_path

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting `host`'s leaf, built once and then served from memory.

        The context is shared by every caller; do not change its settings.
        """
        host = self._admit(host)
        cached = self._contexts.get(host)
        if cached is not None and self._is_fresh(cached[1]):
            return cached[0]
        not_after = self._fresh_leaf(host)
        with self._host_lock(host):
            cached = self._contexts.get(host)
            if cached is None or cached[1] != not_after:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                try:
                    context.load_cert_chain(self.leaves_dir / f"{host}.pem", self.leaf_key_path)
                except (OSError, ssl.SSLError) as error:
                    raise CAError(f"The leaf certificate for {host} does not load ({error}). "
                                  f"Delete {self.leaves_dir} and restart halton-meter.") from error
                # The relay speaks HTTP/1.1 only; a client offering just h2 gets no ALPN and
                # then speaks HTTP/1.1 by default, which beats failing the handshake.
                context.set_alpn_protocols(["http/1.1"])
                cached = (context, not_after)
                with self._lock:
                    self._contexts[host] = cached
        return cached[0]

    def premint(self, hosts: Iterable[str] | None = None) -> None:
        """Make sure `hosts` (default: all) have fresh leaves, so no handshake waits on openssl."""
        for host in self.hosts if hosts is None else hosts:
            self.leaf_paths(host)

    def _fresh_leaf(self, host: str) -> float:
        """The notAfter of `host`'s usable leaf: from memory, else from disk, else newly minted."""
        not_after = self._leaf_not_after.get(host)
        if self._is_fresh(not_after):
            return not_after
        with self._host_lock(host):  # one mint per host; other hosts proceed in parallel
            not_after = self._leaf_not_after.get(host)
            if self._is_fresh(not_after):
                return not_after  # another thread minted it while we waited
            cert_path = self.leaves_dir / f"{host}.pem"
            try:
                not_after = _not_after(cert_path.read_bytes())
            except (OSError, ValueError):
                not_after = None
            if not self._is_fresh(not_after):
                not_after = self._mint_leaf(host, cert_path)
            with self._lock:
                self._leaf_not_after[host] = not_after
            return not_after

    def _mint_leaf(self, host: str, cert_path: pathlib.Path) -> float:
        if not self.ca_key_path.is_file():
            raise CAError(f"The CA in {self.directory} has not been created. "
                          "Restart halton-meter to create it.")
        leaf_key = self._leaf_key()
        with self._config_file(_LEAF_CONFIG.format(host=host)) as config_path:
            request = self._openssl("req", "-new", "-config", config_path, "-key", leaf_key)
            cert = self._openssl("x509", "-req", "-CA", self.ca_cert_path, "-CAkey", self.ca_key_path,
                                 "-extfile", config_path, "-extensions", "leaf_ext", "-sha256",
                                 "-days", str(LEAF_VALIDITY_DAYS), "-set_serial", _random_serial(),
                                 stdin=request)
        self.leaves_dir.mkdir(mode=0o700, exist_ok=True)
        write_atomically(cert_path, cert + self.ca_cert_path.read_bytes(), 0o644)
        with self._lock:
            self.leaves_minted += 1
        log.info("leaf_minted host=%s", host)
        return _not_after(cert)

    def _leaf_key(self) -> pathlib.Path:
        """The one key shared by all leaves; made once, even when two processes race to make it."""
        with self._leaf_key_lock:
            if not self.leaf_key_path.exists() and self._new_key(self.leaf_key_path, exclusive=True):
                # Certificates on disk were issued for a previous key and would not load with this one.
                self._forget_leaves()
        return self.leaf_key_path

    def _forget_leaves(self) -> None:
        shutil.rmtree(self.leaves_dir, ignore_errors=True)
        with self._lock:
            self._leaf_not_after.clear()
            self._contexts.clear()

    # -- plumbing ----------------------------------------------------------------------------

    def _admit(self, host: str) -> str:
        normal = _normalise(host)
        if normal not in self.hosts:
            raise CAError(f"halton-meter's CA signs only provider hosts; {host} is not one. "
                          "Add it to the provider host list if it really is an LLM API host.")
        return normal

    def _host_lock(self, host: str) -> threading.Lock:
        with self._lock:
            return self._host_locks.setdefault(host, threading.Lock())

    @staticmethod
    def _is_fresh(not_after: float | None) -> bool:
        return not_after is not None and not_after - time.time() > LEAF_RENEW_BEFORE_S

    @contextlib.contextmanager
    def _process_lock(self) -> Iterator[None]:
        """Serialise CA (re)builds with other halton-meter processes sharing the directory."""
        with open(self.directory / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _config_file(self, text: str) -> Iterator[pathlib.Path]:
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".tmp-") as scratch:
            path = pathlib.Path(scratch) / "openssl.cnf"
            path.write_text(text, "ascii")
            yield path

    def _new_key(self, path: pathlib.Path, *, exclusive: bool = False) -> bool:
        # The key comes back on stdout and is written through a 0600 descriptor, so it is never
        # on disk with wider permissions, not even for an instant.
        key = self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
        return write_atomically(path, key, 0o600, exclusive=exclusive)

    def _openssl(self, *args: object, stdin: bytes | None = None) -> bytes:
        command = [self._openssl_cmd, *map(str, args)]
        try:
            done = subprocess.run(command, input=stdin, capture_output=True, timeout=OPENSSL_TIMEOUT_S)
        except FileNotFoundError:
            raise CAError(f"The openssl command ({self._openssl_cmd}) was not found. "
                          f"{_INSTALL_HINT}") from None
        except subprocess.TimeoutExpired:
            raise CAError(f"openssl {args[0]} did not finish within {OPENSSL_TIMEOUT_S} s. "
                          f"{_INSTALL_HINT}") from None
        if done.returncode != 0:
            tail = " | ".join(done.stderr.decode(errors="replace").strip().splitlines()[-3:]) or "no output"
            raise CAError(f"openssl {args[0]} failed with exit code {done.returncode}: {tail}. "
                          f"{_INSTALL_HINT}")
        return done.stdout


def write_atomically(path: pathlib.Path, data: bytes, mode: int, *, exclusive: bool = False) -> bool:
    """Write `data` to `path` with exactly `mode`, so readers see the old file or the whole new one.

    With `exclusive`, an existing file wins and nothing is written; returns whether it wrote.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed or the caller widened it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(temp, path)
            return True
        try:
            os.link(temp, path)  # unlike rename, link refuses to replace an existing file
            return True
        except FileExistsError:
            return False
    finally:
        temp.unlink(missing_ok=True)


def _not_after(pem: bytes) -> float:
    """The notAfter (POSIX seconds) of the first certificate in `pem`, read from its DER.

    Leaf expiry is read from the certificate itself, so it needs no openssl call and no sidecar
    file that could disagree with the certificate.
    """
    text = pem.decode("ascii")
    footer = "-----END CERTIFICATE-----"
    der = ssl.PEM_cert_to_DER_cert(text[: text.index(footer) + len(footer)])
    _, tbs, _ = _der_item(der, _der_item(der, 0)[1])  # Certificate -> tbsCertificate
    tag, _, end = _der_item(der, tbs)
    position = end if tag == 0xA0 else tbs  # skip the optional explicit [0] version
    for _ in range(3):  # serialNumber, signature, issuer
        position = _der_item(der, position)[2]
    _, validity, _ = _der_item(der, position)
    tag, start, end = _der_item(der, _der_item(der, validity)[2])  # notBefore -> notAfter
    # RFC 5280 4.1.2.5: UTCTime (0x17) until 2049, GeneralizedTime (0x18) after.
    pattern = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"
    return float(calendar.timegm(time.strptime(der[start:end].decode("ascii"), pattern)))


def _der_item(der: bytes, position: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `position`."""
    if position + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[position], der[position + 1]
    position += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[position: position + size], "big")
        position += size
    if position + length > len(der):
        raise ValueError("truncated DER")
    return tag, position, position + length


def _require_private(path: pathlib.Path, what: str, verb: str, fix_mode: int) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CAError(f"{what} {path} {verb} other users (mode {mode:04o}). "
                      f"Fix it with: chmod {fix_mode:o} {path}")


def _normalise(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _machine_name() -> str:
    # Only characters that need no quoting in an openssl config or a certificate subject.
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname().split(".")[0])[:30] or "localhost"


def _random_serial() -> str:
    # RFC 5280 4.1.2.2: positive, at most 20 octets; 126 random bits keep it unguessable.
    return f"0x{secrets.randbits(126) | 1 << 125:x}"
