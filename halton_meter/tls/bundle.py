"""The client CA bundle: the system's trusted CAs followed by halton-meter's local CA.

Point `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE` and `CURL_CA_BUNDLE` at this file so Python, requests
and curl trust the proxy's leaves while still trusting every public site; Node needs only our CA
added (`NODE_EXTRA_CA_CERTS`), and the bundle works there too since it contains it.
"""

from __future__ import annotations

import pathlib
import ssl

from halton_meter.config import make_private_dir
from halton_meter.tls.ca import write_atomically

# Debian/Ubuntu/Alpine, Fedora/RHEL, macOS; tried after the paths OpenSSL was built with.
_WELL_KNOWN_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)


def system_ca_file() -> pathlib.Path | None:
    """The system's PEM bundle of trusted CAs, or None when none is found."""
    paths = ssl.get_default_verify_paths()
    # openssl_cafile is OpenSSL's built-in default; `cafile` may come from SSL_CERT_FILE, which
    # once the user follows our advice is our own bundle, and must not be folded into itself.
    for candidate in (paths.openssl_cafile, *_WELL_KNOWN_BUNDLES):
        if candidate and pathlib.Path(candidate).is_file():
            return pathlib.Path(candidate)
    return None


def write_client_bundle(ca_cert: pathlib.Path, dest: pathlib.Path, *,
                        system_bundle: pathlib.Path | None = None) -> pathlib.Path:
    """Write system CAs + `ca_cert` to `dest` (mode 0644), rewriting only when the content changed."""
    system_bundle = system_bundle or system_ca_file()
    parts = []
    if system_bundle is not None and not _same_file(system_bundle, dest):
        system_pem = system_bundle.read_bytes().rstrip(b"\n")
        if system_pem:
            parts.append(system_pem + b"\n")
    parts.append(b"# halton-meter local CA\n" + ca_cert.read_bytes().rstrip(b"\n") + b"\n")
    content = b"\n".join(parts)
    try:
        unchanged = dest.read_bytes() == content
    except FileNotFoundError:
        unchanged = False
    if unchanged:
        if dest.stat().st_mode & 0o777 != 0o644:
            dest.chmod(0o644)
    else:
        make_private_dir(dest.parent)
        write_atomically(dest, content, 0o644)
    return dest


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return a.samefile(b)
    except FileNotFoundError:
        return False
