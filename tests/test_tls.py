"""The local CA and the client bundle, checked with real openssl and real TLS handshakes."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import socket
import ssl
import stat
import subprocess
import threading

import pytest

from halton_meter.adapters import PROVIDER_HOSTS
from halton_meter.tls.bundle import system_ca_file, write_client_bundle
from halton_meter.tls.ca import CAError, CertificateAuthority

HOST = "api.anthropic.com"


@pytest.fixture
def ca(tmp_path: pathlib.Path) -> CertificateAuthority:
    authority = CertificateAuthority(tmp_path / "ca", PROVIDER_HOSTS)
    authority.ensure()
    return authority


# -- helpers ---------------------------------------------------------------------------------

def openssl(*args: object, stdin: bytes | None = None) -> str:
    done = subprocess.run(["openssl", *map(str, args)], input=stdin, capture_output=True, check=True)
    return done.stdout.decode()


def cert_text(path: pathlib.Path) -> str:
    return openssl("x509", "-text", "-noout", "-in", path)


def validity_days(path: pathlib.Path) -> float:
    lines = openssl("x509", "-noout", "-dates", "-in", path).splitlines()
    dates = {name: ssl.cert_time_to_seconds(value) for name, value in (ln.split("=", 1) for ln in lines)}
    return (dates["notAfter"] - dates["notBefore"]) / 86400


def client_context(cafile: pathlib.Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; our certs must pass it
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str,
              alpn: list[str] | None = None) -> str | None:
    """Serve one TLS connection on 127.0.0.1 and connect to it; returns the client's ALPN."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError):
            pass  # the client side reports what went wrong

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        if alpn:
            client.set_alpn_protocols(alpn)
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client.wrap_socket(raw, server_hostname=hostname) as tls:
                assert tls.recv(2) == b"ok"
                return tls.selected_alpn_protocol()
    finally:
        thread.join(5)
        listener.close()


def sign_with_ca_key(ca: CertificateAuthority, host: str, directory: pathlib.Path) -> pathlib.Path:
    """Issue a leaf for any host straight from the CA key, as someone who stole it would."""
    key = directory / f"{host}.key"
    key.write_text(openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"))
    ext = directory / f"{host}.ext"
    ext.write_text(f"subjectAltName = DNS:{host}\nextendedKeyUsage = serverAuth\n"
                   "keyUsage = critical, digitalSignature\nbasicConstraints = critical, CA:FALSE\n"
                   "authorityKeyIdentifier = keyid\nsubjectKeyIdentifier = hash\n")
    request = openssl("req", "-new", "-key", key, "-subj", f"/CN={host}").encode()
    cert = openssl("x509", "-req", "-CA", ca.ca_cert_path, "-CAkey", ca.ca_key_path, "-extfile", ext,
                   "-days", 30, "-set_serial", "0x1234", stdin=request)
    chain = directory / f"{host}.pem"
    chain.write_text(cert + ca.ca_cert_path.read_text())
    return chain


def server_for(chain: pathlib.Path, key: pathlib.Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    return context


# -- the CA ----------------------------------------------------------------------------------

def test_ca_files_modes_and_extensions(ca: CertificateAuthority) -> None:
    assert stat.S_IMODE(ca.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(ca.ca_key_path.stat().st_mode) == 0o600
    text = cert_text(ca.ca_cert_path)
    assert "CA:TRUE, pathlen:0" in text
    assert "Certificate Sign, CRL Sign" in text
    assert "prime256v1" in text and "ecdsa-with-SHA256" in text
    assert "X509v3 Name Constraints: critical" in text
    permitted, excluded = text.split("Permitted:")[1].split("Signature Algorithm")[0].split("Excluded:")
    assert sorted(line.strip().removeprefix("DNS:") for line in permitted.split("\n") if line.strip()) \
        == sorted(PROVIDER_HOSTS)
    assert [line.strip() for line in excluded.split("\n") if line.strip()] == [
        "IP:0.0.0.0/0.0.0.0", "IP:0:0:0:0:0:0:0:0/0:0:0:0:0:0:0:0"]
    assert 3649 < validity_days(ca.ca_cert_path) < 3651
    assert (ca.directory / "hosts.txt").read_text().split("\n")[:-1] == ["constraints=2", *sorted(PROVIDER_HOSTS)]


def test_a_ca_with_older_constraints_is_rebuilt(ca: CertificateAuthority) -> None:
    before = ca.fingerprint_sha256
    hosts = ca.hosts_path.read_text().splitlines()
    ca.hosts_path.write_text("".join(f"{h}\n" for h in hosts[1:]))  # as written before the IP exclusions
    assert ca.pending_rebuild() == "constraints_changed"
    assert ca.ensure() is True and ca.fingerprint_sha256 != before and ca.pending_rebuild() is None


def test_fingerprint_is_sha256_of_der(ca: CertificateAuthority) -> None:
    der = ssl.PEM_cert_to_DER_cert(ca.ca_cert_path.read_text())
    pairs = ca.fingerprint_sha256.split(":")
    assert len(pairs) == 32 and all(len(p) == 2 and p == p.upper() for p in pairs)
    assert "".join(pairs) == hashlib.sha256(der).hexdigest().upper()
    openssl_view = openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", ca.ca_cert_path)
    assert openssl_view.strip().split("=", 1)[1] == ca.fingerprint_sha256


def test_ca_is_private_even_with_open_umask(tmp_path: pathlib.Path) -> None:
    previous = os.umask(0)
    try:
        authority = CertificateAuthority(tmp_path / "ca", [HOST])
        authority.ensure()
        authority.leaf_paths(HOST)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(authority.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(authority.ca_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(authority.leaf_key_path.stat().st_mode) == 0o600


def test_ensure_twice_keeps_the_ca(ca: CertificateAuthority) -> None:
    fingerprint = ca.fingerprint_sha256
    again = CertificateAuthority(ca.directory, reversed(PROVIDER_HOSTS))
    assert again.ensure() is False
    assert again.fingerprint_sha256 == fingerprint


def test_changed_hosts_rebuild_the_ca(ca: CertificateAuthority, caplog: pytest.LogCaptureFixture) -> None:
    fingerprint = ca.fingerprint_sha256
    ca.premint()
    assert list(ca.leaves_dir.iterdir())
    fewer = CertificateAuthority(ca.directory, PROVIDER_HOSTS[:2])
    with caplog.at_level(logging.WARNING, logger="halton_meter.tls.ca"):
        assert fewer.ensure() is True
    assert fewer.fingerprint_sha256 != fingerprint
    assert not ca.leaves_dir.exists() and not ca.leaf_key_path.exists()
    assert "reason=hosts_changed" in caplog.text
    assert cert_text(fewer.ca_cert_path).count("DNS:") == 2


def test_expiring_ca_is_rebuilt(ca: CertificateAuthority) -> None:
    config = ca.directory / "short.cnf"
    config.write_text("[req]\nprompt = no\ndistinguished_name = dn\n[dn]\nCN = short\n")
    ca.ca_cert_path.write_text(openssl("req", "-new", "-x509", "-config", config, "-key", ca.ca_key_path,
                                       "-days", 100))
    short = ca.fingerprint_sha256
    assert CertificateAuthority(ca.directory, PROVIDER_HOSTS).ensure() is True
    assert ca.fingerprint_sha256 != short
    assert validity_days(ca.ca_cert_path) > 3000


def test_check_permissions_names_the_fix(ca: CertificateAuthority) -> None:
    ca.ca_key_path.chmod(0o644)
    with pytest.raises(CAError, match=rf"\(mode 0644\)\. Fix it with: chmod 600 {ca.ca_key_path}$"):
        ca.check_permissions()
    with pytest.raises(CAError, match="chmod 600"):
        ca.ensure()  # an existing CA's key is never silently re-permissioned
    ca.ca_key_path.chmod(0o600)
    ca.directory.chmod(0o755)
    with pytest.raises(CAError, match=rf"Fix it with: chmod 700 {ca.directory}$"):
        ca.check_permissions()
    ca.directory.chmod(0o700)
    ca.check_permissions()
    ca.ca_cert_path.unlink()
    with pytest.raises(CAError, match="is missing"):
        ca.check_permissions()


def test_openssl_failures_become_ca_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CAError, match="was not found. Install the openssl"):
        CertificateAuthority(tmp_path / "a", [HOST], openssl=str(tmp_path / "no-openssl")).ensure()
    with pytest.raises(CAError, match="failed with exit code 1"):
        CertificateAuthority(tmp_path / "b", [HOST], openssl=shutil.which("false")).ensure()


# -- leaves ----------------------------------------------------------------------------------

def test_leaf_certificate_fields(ca: CertificateAuthority) -> None:
    cert_path, key_path = ca.leaf_paths(HOST)
    assert cert_path == ca.directory / "leaves" / f"{HOST}.pem"
    assert key_path == ca.directory / "leaf.key"
    assert cert_path.read_text().count("BEGIN CERTIFICATE") == 2
    assert cert_path.read_text().endswith(ca.ca_cert_path.read_text())
    text = cert_text(cert_path)
    assert f"DNS:{HOST}" in text and f"Subject: CN = {HOST}" in text
    assert "TLS Web Server Authentication" in text
    assert "CA:FALSE" in text and "Digital Signature" in text
    assert 396 < validity_days(cert_path) < 398
    openssl("verify", "-CAfile", ca.ca_cert_path, "-purpose", "sslserver", "-verify_hostname", HOST,
            cert_path)


def test_leaf_handshake_and_alpn(ca: CertificateAuthority) -> None:
    server = ca.server_context(HOST)
    assert ca.server_context(HOST.upper() + ".") is server
    assert handshake(server, client_context(ca.ca_cert_path), HOST, ["h2", "http/1.1"]) == "http/1.1"
    assert handshake(server, client_context(ca.ca_cert_path), HOST, ["h2"]) is None
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(server, client_context(ca.ca_cert_path), "api.openai.com")


def test_name_constraints_stop_a_stolen_key(ca: CertificateAuthority, tmp_path: pathlib.Path) -> None:
    # Control: the same signing recipe for a listed host verifies, so the failure below is the constraint.
    listed = sign_with_ca_key(ca, "api.openai.com", tmp_path)
    assert handshake(server_for(listed, tmp_path / "api.openai.com.key"),
                     client_context(ca.ca_cert_path), "api.openai.com") is None
    evil = sign_with_ca_key(ca, "evil.example.com", tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        handshake(server_for(evil, tmp_path / "evil.example.com.key"),
                  client_context(ca.ca_cert_path), "evil.example.com")
    assert failure.value.verify_message == "permitted subtree violation"
    with pytest.raises(CAError, match="signs only provider hosts; evil.example.com is not one"):
        ca.leaf_paths("evil.example.com")
    with pytest.raises(CAError):
        ca.server_context("evil.example.com")


def test_leaves_are_reused_from_disk(ca: CertificateAuthority) -> None:
    cert_path, _ = ca.leaf_paths(HOST)
    written = cert_path.stat().st_mtime_ns
    restarted = CertificateAuthority(ca.directory, PROVIDER_HOSTS)
    assert restarted.ensure() is False
    restarted.premint()
    assert restarted.leaves_minted == len(PROVIDER_HOSTS) - 1
    assert cert_path.stat().st_mtime_ns == written
    again = CertificateAuthority(ca.directory, PROVIDER_HOSTS)
    again.premint()
    assert again.leaves_minted == 0


def test_expiring_leaf_is_reminted(ca: CertificateAuthority, tmp_path: pathlib.Path) -> None:
    # A leaf with 20 days left, issued for the shared leaf key, sitting in the cache.
    cert_path, key_path = ca.leaf_paths(HOST)
    request = openssl("req", "-new", "-key", key_path, "-subj", f"/CN={HOST}").encode()
    ext = tmp_path / "ext"
    ext.write_text(f"subjectAltName = DNS:{HOST}\n")
    short = openssl("x509", "-req", "-CA", ca.ca_cert_path, "-CAkey", ca.ca_key_path, "-extfile", ext,
                    "-days", 20, "-set_serial", "0x99", stdin=request)
    cert_path.write_text(short + ca.ca_cert_path.read_text())
    restarted = CertificateAuthority(ca.directory, PROVIDER_HOSTS)
    restarted.leaf_paths(HOST)
    assert restarted.leaves_minted == 1
    assert validity_days(cert_path) > 396


def test_concurrent_first_requests_mint_once(ca: CertificateAuthority) -> None:
    barrier = threading.Barrier(8)
    results: list[object] = []

    def request() -> None:
        barrier.wait()
        results.append(ca.server_context("api.mistral.ai"))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert ca.leaves_minted == 1
    assert [p.name for p in ca.leaves_dir.iterdir()] == ["api.mistral.ai.pem"]  # no temp files left
    assert not [p for p in ca.directory.iterdir() if p.name.startswith(".tmp")]


# -- the client bundle -----------------------------------------------------------------------

def test_bundle_has_system_cas_then_ours(ca: CertificateAuthority, tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "out" / "bundle.pem"
    system = system_ca_file()
    assert write_client_bundle(ca.ca_cert_path, dest) == dest
    content = dest.read_text()
    assert content.endswith(ca.ca_cert_path.read_text())
    if system is not None:
        assert content.startswith(system.read_text().rstrip("\n"))
        assert content.count("BEGIN CERTIFICATE") == system.read_text().count("BEGIN CERTIFICATE") + 1
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert handshake(ca.server_context(HOST), client_context(dest), HOST) is None


def test_bundle_rewrites_only_on_change(ca: CertificateAuthority, tmp_path: pathlib.Path) -> None:
    system = tmp_path / "system.pem"
    system.write_text(ca.ca_cert_path.read_text())  # any PEM will do as the "system" CAs
    dest = tmp_path / "bundle.pem"
    write_client_bundle(ca.ca_cert_path, dest, system_bundle=system)
    os.utime(dest, ns=(1_000_000_000, 1_000_000_000))
    write_client_bundle(ca.ca_cert_path, dest, system_bundle=system)
    assert dest.stat().st_mtime_ns == 1_000_000_000
    system.write_text("")
    write_client_bundle(ca.ca_cert_path, dest, system_bundle=system)
    assert dest.stat().st_mtime_ns != 1_000_000_000
    assert dest.read_text().count("BEGIN CERTIFICATE") == 1
    # A bundle is never folded into itself (SSL_CERT_FILE may already point at it).
    write_client_bundle(ca.ca_cert_path, dest, system_bundle=dest)
    assert dest.read_text().count("BEGIN CERTIFICATE") == 1
