"""Security promises, checked end to end against running processes: every listener is loopback
only, the CA is private and vouches for provider hosts alone, upstream certificates are always
verified, the API answers neither other sites nor other origins, and no secret is written down.

Unit tests of the same pieces live beside them (test_tls, test_api, test_redaction); these look
from outside: the kernel's socket table, file modes, openssl, real TLS peers, raw HTTP, and every
byte a running daemon left on disk or printed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from halton_meter.adapters import PROVIDER_HOSTS
from halton_meter.redaction import CATEGORIES
from halton_meter.tls.ca import CAError, CertificateAuthority
from tests.conftest import REPO, Proxy, subprocess_env
from tests.test_serve import _has_ipv6_loopback
from tests.test_tls import handshake, server_for

HAS_PROC_NET = Path("/proc/self/net/tcp").exists()


# ---- running halton-meter ------------------------------------------------------------------


@dataclass
class Launched:
    """A `python -m halton_meter COMMAND` process whose stdout and stderr go to files, so every
    byte it printed can be searched afterwards."""

    process: subprocess.Popen
    home: Path
    port: int
    stdout: Path
    stderr: Path

    @property
    def api_port(self) -> int:
        return int((self.home / "run" / "api.port").read_text())

    def proxy(self) -> Proxy:
        """conftest's client side (`connection`, `wait_rows`) for this process."""
        return Proxy(self.process, self.port, self.home, self.stdout.read_text())


def spawn(home: Path, command: str, *args: str, umask: int = 0o022) -> tuple[subprocess.Popen, Path, Path]:
    """Start a halton-meter command with `umask`, its output in files beside `home`."""
    stdout, stderr = home.parent / f"{home.name}-{command}.out", home.parent / f"{home.name}-{command}.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "halton_meter", command, *args], stdout=out, stderr=err,
                                   env=subprocess_env(home), cwd=str(REPO), umask=umask)
    return process, stdout, stderr


def is_ready(process: subprocess.Popen, stdout: Path, ready: str) -> bool:
    """Wait until the process prints `ready` (True) or exits or takes 30 s (False)."""
    deadline = time.monotonic() + 30
    while ready not in stdout.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def launch(home: Path, command: str, *args: str, umask: int = 0o022, ready: str = "use it:") -> Launched:
    process, stdout, stderr = spawn(home, command, *args, umask=umask)
    if not is_ready(process, stdout, ready):
        process.kill()
        raise AssertionError(f"{command} did not start:\n{stdout.read_text()}\n{stderr.read_text()}")
    port = int(re.search(r"listening on http://(?:\[[0-9a-f:]+\]|[0-9.]+):(\d+)", stdout.read_text()).group(1))
    return Launched(process, home, port, stdout, stderr)


def refusal(home: Path, command: str, *args: str) -> str:
    """The error a command that must not start prints. One that starts anyway is stopped (not
    left to run into a timeout) and fails the test."""
    process, stdout, stderr = spawn(home, command, *args)
    if is_ready(process, stdout, "use it:" if command != "edge" else "daemon hand-off"):
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        pytest.fail(f"{command} {' '.join(args)} started:\n{stdout.read_text()}")
    assert process.wait(15) == 1, stderr.read_text()
    assert "Traceback" not in stderr.read_text() and "listening" not in stdout.read_text()
    return stderr.read_text()


def stop(launched: Launched) -> int:
    if launched.process.poll() is None:
        launched.process.send_signal(signal.SIGTERM)
    return launched.process.wait(15)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "halton_meter", *args], capture_output=True, text=True,
                          env=subprocess_env(home), cwd=str(REPO), timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---- a TLS peer that records what reaches it -------------------------------------------------


class RecordingTlsServer:
    """A TLS server on 127.0.0.1 presenting one certificate chain. It counts connections,
    keeps every byte that arrives after a completed handshake, and answers each request with
    `answer` before closing: what an upstream or a site behind a tunnel really received."""

    def __init__(self, chain: Path, key: Path, answer: bytes) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(chain, key)
        self.leaf_der = ssl.PEM_cert_to_DER_cert(chain.read_text().split("-----END CERTIFICATE-----")[0]
                                                 + "-----END CERTIFICATE-----\n")
        self.answer = answer
        self.connections = 0
        self.received = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            with conn:
                conn.settimeout(10)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        self.received += read_request(tls)
                        tls.sendall(self.answer)
                except (OSError, ssl.SSLError):
                    pass  # the peer refused our certificate: nothing more arrives


def read_request(sock) -> bytes:
    """One HTTP/1.1 request (head and Content-Length body), or what came before the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    length = re.search(rb"(?im)^content-length:\s*(\d+)", data.partition(b"\r\n\r\n")[0])
    wanted = len(data.partition(b"\r\n\r\n")[0]) + 4 + (int(length.group(1)) if length else 0)
    while len(data) < wanted and (chunk := sock.recv(65536)):
        data += chunk
    return data


def http_answer(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def openssl(*args: object, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, args)], input=stdin, capture_output=True, check=check, timeout=30)


def issue(directory: Path, name: str, *, issuer_cert: Path, issuer_key: Path, subject: str, extensions: str,
          days: int = 30) -> tuple[Path, Path]:
    """(certificate, key) signed straight with `issuer_key` by the openssl command: how anyone
    holding a CA key, ours stolen included, makes a certificate say whatever they like."""
    key = directory / f"{name}.key"
    key.write_bytes(openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256").stdout)
    ext = directory / f"{name}.ext"
    ext.write_text(extensions + "\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n")
    request = openssl("req", "-new", "-key", key, "-subj", subject).stdout
    cert = openssl("x509", "-req", "-CA", issuer_cert, "-CAkey", issuer_key, "-extfile", ext, "-days", days,
                   "-set_serial", f"0x{random.getrandbits(64):x}", stdin=request).stdout
    path = directory / f"{name}.pem"
    path.write_bytes(cert)
    return path, key


LEAF_EXTENSIONS = ("basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
                   "extendedKeyUsage = serverAuth")


# ---- the shared daemon: provider hosts sent to upstreams with good and bad certificates --------

# Each provider host here reaches an upstream whose certificate is wrong in one way (the 502
# body names why); api.anthropic.com reaches a good one, the control.
BAD_UPSTREAMS = {
    "api.openai.com": "certificate in certificate chain",  # signed by a CA nobody trusts (self-signed root)
    "api.x.ai": "Hostname mismatch",  # a trusted certificate, for another name
    "api.mistral.ai": "certificate has expired",  # trusted, right name, expired
}
CONTROL_BODY = json.dumps({"id": "msg_control", "type": "message", "role": "assistant",
                           "model": "claude-sonnet-4-5-20250929", "content": [],
                           "usage": {"input_tokens": 1, "output_tokens": 1}}).encode()


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    """(provider host -> its RecordingTlsServer, the CA the daemon is given to trust)."""
    directory = tmp_path_factory.mktemp("upstreams")
    trusted = CertificateAuthority(directory / "trusted", ("api.anthropic.com", "api.mistral.ai", "wrong.example"))
    trusted.ensure()
    untrusted = CertificateAuthority(directory / "untrusted", ("api.openai.com",))
    untrusted.ensure()
    expired = issue(directory, "expired", issuer_cert=trusted.ca_cert_path, issuer_key=trusted.ca_key_path,
                    subject="/CN=api.mistral.ai", days=-1,
                    extensions=f"{LEAF_EXTENSIONS}\nsubjectAltName = DNS:api.mistral.ai")
    chains = {"api.anthropic.com": trusted.leaf_paths("api.anthropic.com"),
              "api.openai.com": untrusted.leaf_paths("api.openai.com"),
              "api.x.ai": trusted.leaf_paths("wrong.example"),
              "api.mistral.ai": expired}
    servers = {host: RecordingTlsServer(*chain, http_answer("200 OK", CONTROL_BODY)) for host, chain in chains.items()}
    yield servers, trusted.ca_cert_path
    for server in servers.values():
        server.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, upstreams):
    servers, trusted_ca = upstreams
    home = tmp_path_factory.mktemp("served") / "home"
    routes = [arg for host, server in servers.items() for arg in ("--upstream", f"{host}=127.0.0.1:{server.port}")]
    running = launch(home, "serve", "--port", "0", "--api-port", "0", *routes, "--upstream-ca", str(trusted_ca))
    yield running
    assert stop(running) == 0


# ---- 1. every listener is loopback only ----------------------------------------------------


def listening_tcp(pid: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of each TCP socket `pid` listens on, as the kernel sees it: the rows of
    /proc/PID/net/tcp and tcp6 in state 0A (LISTEN) whose inode is one of the process's descriptors."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:
                address, port = fields[1].split(":")
                found.append((kernel_address(address), int(port, 16)))
    return found


def kernel_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp prints an address as 32-bit words, each in the machine's byte order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


@pytest.mark.skipif(not HAS_PROC_NET, reason="reads the kernel's socket table from /proc")
def test_the_kernels_socket_table_is_read_right():
    # Control for the listener checks below: our own listeners, as the kernel spells them.
    addresses = ["127.0.0.1", "::1"] if _has_ipv6_loopback() else ["127.0.0.1"]
    listeners = [socket.create_server((address, 0), family=socket.AF_INET6 if ":" in address else socket.AF_INET)
                 for address in addresses]
    try:
        found = listening_tcp(os.getpid())
        for address, listener in zip(addresses, listeners):
            assert (ipaddress.ip_address(address), listener.getsockname()[1]) in found
    finally:
        for listener in listeners:
            listener.close()


@pytest.mark.skipif(not HAS_PROC_NET, reason="reads the kernel's socket table from /proc")
def test_serve_listens_on_loopback_only(served):
    sockets = listening_tcp(served.process.pid)
    assert sorted(port for _, port in sockets) == sorted([served.port, served.api_port])
    assert all(address == ipaddress.ip_address("127.0.0.1") for address, _ in sockets), sockets


@pytest.mark.skipif(not HAS_PROC_NET or not _has_ipv6_loopback(), reason="needs /proc and an IPv6 loopback")
def test_serve_on_ipv6_loopback_binds_nothing_wider(tmp_path):
    running = launch(tmp_path / "home", "serve", "--listen", "::1", "--port", "0", "--api-port", "0")
    try:
        sockets, expected = listening_tcp(running.process.pid), sorted([running.port, running.api_port])
    finally:
        assert stop(running) == 0
    assert sorted(port for _, port in sockets) == expected
    assert all(address == ipaddress.ip_address("::1") for address, _ in sockets), sockets


@pytest.fixture(scope="module")
def edge_then_daemon(tmp_path_factory):
    """The always-on pair started as a fresh install's supervisor may start it: the edge first,
    under an ordinary umask, then the daemon."""
    home = tmp_path_factory.mktemp("pair") / "home"
    edge = launch(home, "edge", "--port", "0", ready="daemon hand-off")
    try:
        daemon = launch(home, "daemon", "--api-port", "0")
    except BaseException:
        stop(edge)
        raise
    yield edge, daemon
    assert stop(edge) == 0
    assert stop(daemon) == 0


@pytest.mark.skipif(not HAS_PROC_NET, reason="reads the kernel's socket table from /proc")
def test_edge_and_daemon_listen_on_loopback_only(edge_then_daemon):
    edge, daemon = edge_then_daemon
    edge_sockets, daemon_sockets = listening_tcp(edge.process.pid), listening_tcp(daemon.process.pid)
    assert [port for _, port in edge_sockets] == [edge.port]
    assert sorted(port for _, port in daemon_sockets) == sorted([daemon.port, daemon.api_port])
    assert all(address.is_loopback for address, _ in edge_sockets + daemon_sockets), (edge_sockets, daemon_sockets)


def test_handoff_socket_is_the_owners_alone(edge_then_daemon):
    _, daemon = edge_then_daemon
    handoff = daemon.home / "run" / "daemon.sock"
    assert stat.S_ISSOCK(handoff.lstat().st_mode)
    assert mode(handoff) == 0o600 and handoff.lstat().st_uid == os.getuid()


def test_state_directories_are_private_whoever_starts_first(edge_then_daemon):
    edge, _ = edge_then_daemon
    assert mode(edge.home) & 0o077 == 0, oct(mode(edge.home))
    assert mode(edge.home / "run") & 0o077 == 0, oct(mode(edge.home / "run"))


@pytest.mark.parametrize("listen", ["0.0.0.0", "::", "192.0.2.10", "fd00::2"])
@pytest.mark.parametrize("command", ["serve", "daemon", "edge"])
def test_a_non_loopback_listen_flag_is_refused(tmp_path, command, listen):
    error = refusal(tmp_path / "home", command, "--listen", listen, "--port", "0")
    assert f"Refusing to listen on {listen}: halton-meter binds loopback only" in error


def test_a_non_loopback_proxy_listen_in_config_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[proxy]\nlisten = "0.0.0.0"\n')
    assert "Refusing to listen on 0.0.0.0" in refusal(home, "serve", "--port", "0", "--api-port", "0")


def test_a_non_loopback_api_listen_in_config_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[api]\nlisten = "0.0.0.0"\n')
    # The API listens where the proxy does ([proxy] listen, loopback only): [api] has no address.
    assert "[api] has no setting 'listen'" in refusal(home, "serve", "--port", "0", "--api-port", "0")


# ---- the hand-off goes to a daemon of this user only -----------------------------------------


@pytest.fixture
def reachable_home():
    """A home under a directory other users can traverse (pytest's own tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="hm-security-"))
    base.chmod(0o755)
    yield base / "home"
    shutil.rmtree(base, ignore_errors=True)


def impostor_daemon(path: Path) -> tuple[int, int]:
    """Fork a process that, as user nobody, listens on the hand-off path and plays the daemon:
    it answers pings and takes descriptors. Returns (pid, pipe) where the pipe carries b"c" for
    each channel it accepted and b"F" for each client socket it was handed."""
    report, report_to = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child touches only sockets and the pipe, then leaves without cleanup
        try:
            os.close(report)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(8)
            os.write(report_to, b"r")
            while True:
                channel, _ = listener.accept()
                os.write(report_to, b"c")
                while True:
                    message, fds, _, _ = socket.recv_fds(channel, 64, 16)
                    if not message and not fds:
                        break
                    os.write(report_to, b"F" * len(fds))
                    channel.sendall(b"".join(b"p" if byte == ord("P") else b"a" for byte in message))
                channel.close()
        finally:
            os._exit(0)
    os.close(report_to)
    assert os.read(report, 1) == b"r", "the impostor could not listen"
    return pid, report


@pytest.mark.skipif(os.geteuid() != 0 or not hasattr(os, "fork"), reason="needs root to run a process as nobody")
def test_the_edge_hands_no_client_to_a_daemon_of_another_user(reachable_home, fake):
    run_dir = reachable_home / "run"
    run_dir.mkdir(parents=True)
    for directory in (reachable_home, run_dir):
        directory.chmod(0o777)  # a run directory others may write, however it came to be
    pid, report = impostor_daemon(run_dir / "daemon.sock")
    edge = launch(reachable_home, "edge", "--port", "0", "--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}",
                  ready="daemon hand-off")
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", edge.port, timeout=10,
                                           context=ssl.create_default_context(cafile=str(fake.ca_path)))
        conn.set_tunnel("api.anthropic.com", 443)
        try:
            conn.request("POST", "/v1/messages", body=b"{}", headers={"content-type": "application/json"})
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            status = repr(exc)
        finally:
            conn.close()
    finally:
        stop(edge)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.set_blocking(report, False)
    reports = os.read(report, 4096)
    os.close(report)
    assert b"c" in reports  # the edge did reach the impostor...
    assert b"F" not in reports  # ...and handed it no client
    assert status == 200  # which the edge served itself, straight to the provider
    assert "handoff_refused reason=daemon_of_another_user" in edge.stderr.read_text()


# ---- 2. the CA's files are private, and serve refuses them otherwise ---------------------------


def test_ca_is_private_even_with_umask_000(tmp_path):
    home = tmp_path / "home"
    running = launch(home, "serve", "--port", "0", "--api-port", "0", umask=0)
    assert stop(running) == 0
    ca = home / "ca"
    assert {path.relative_to(home).as_posix(): mode(path)
            for path in (home, ca, ca / "ca.key", ca / "leaf.key", ca / "leaves")} == {
        ".": 0o700, "ca": 0o700, "ca/ca.key": 0o600, "ca/leaf.key": 0o600, "ca/leaves": 0o700}
    assert (ca / "leaves" / "api.anthropic.com.pem").is_file()  # the leaf key was really used


@pytest.mark.parametrize("name, loose, fix", [
    ("ca/ca.key", 0o640, "600"), ("ca/ca.key", 0o604, "600"),
    ("ca", 0o750, "700"), ("ca", 0o705, "700"),
    ("ca/leaf.key", 0o644, "600"),
])
def test_serve_refuses_ca_files_open_to_other_users(tmp_path, name, loose, fix):
    home = tmp_path / "home"
    ca = CertificateAuthority(home / "ca", PROVIDER_HOSTS)
    ca.ensure()
    ca.leaf_paths("api.anthropic.com")  # leaf.key exists
    target = home / name
    target.chmod(loose)
    error = refusal(home, "serve", "--port", "0", "--api-port", "0")
    assert "other users" in error and f"Fix it with: chmod {fix} {target}" in error
    assert mode(target) == loose  # reported, never silently repaired


# ---- 3. the CA vouches for provider hosts only ---------------------------------------------


@pytest.mark.parametrize("host", [
    "github.com", "evil.example", "localhost", "127.0.0.1", "anthropic.com", "*.anthropic.com",
    "api.anthropic.com.evil.example", "evil-api.anthropic.com", "api.anthropic.com:443",
    "api.anthropic.com/evil.example", "api.anthropic.com\nsubjectAltName = DNS:evil.example",
])
def test_the_ca_code_signs_for_no_other_host(served, host):
    ca = CertificateAuthority(served.home / "ca", PROVIDER_HOSTS)
    before = sorted(ca.leaves_dir.iterdir())
    for ask in (ca.leaf_paths, ca.server_context):
        with pytest.raises(CAError, match="signs only provider hosts"):
            ask(host)
    assert ca.leaves_minted == 0 and sorted(ca.leaves_dir.iterdir()) == before


_SUBDOMAINS_PERMITTED = pytest.mark.xfail(strict=True, reason=(
    "a DNS name constraint permits the host and every name under it (RFC 5280 4.2.1.10): a stolen "
    "CA key can vouch for evil.api.anthropic.com, or anything under chatgpt.com and openrouter.ai. "
    "Left open on purpose: excluding `.host` relies on a leading-dot reading that RFC 5280 gives "
    "only to URI and email constraints (OpenSSL honours it; the macOS trust store is untested)"))


@pytest.mark.parametrize("subject, names, check", [
    ("/CN=evil.example", "DNS:evil.example", "evil.example"),
    ("/CN=api.openai.com", "DNS:api.openai.com, DNS:evil.example", "evil.example"),
    ("/CN=github.com", None, "github.com"),  # no SAN: the subject name alone
    ("/O=Evil Corp", "DNS:*.com", "github.com"),
    ("/O=Evil Corp", "DNS:*.anthropic.com", "console.anthropic.com"),
    pytest.param("/O=Evil Corp", "DNS:evil.api.anthropic.com", "evil.api.anthropic.com", marks=_SUBDOMAINS_PERMITTED),
    pytest.param("/O=Evil Corp", "IP:93.184.216.34", "93.184.216.34"),
    pytest.param("/O=Evil Corp", "IP:2606:2800:220:1:248:1893:25c8:1946", "2606:2800:220:1:248:1893:25c8:1946"),
], ids=["dns", "provider-plus-other", "subject-only", "wildcard", "provider-wildcard", "subdomain", "ipv4",
        "ipv6"])
def test_a_stolen_ca_key_vouches_for_no_other_site(served, tmp_path, subject, names, check):
    ca_cert, ca_key = served.home / "ca" / "ca.pem", served.home / "ca" / "ca.key"
    extensions = LEAF_EXTENSIONS + (f"\nsubjectAltName = {names}" if names else "")
    leaf, key = issue(tmp_path, "forged", issuer_cert=ca_cert, issuer_key=ca_key, subject=subject,
                      extensions=extensions)
    assert_rejected(ca_cert, leaf, key, check)


def test_a_stolen_ca_key_cannot_make_a_sub_ca(served, tmp_path):
    ca_cert, ca_key = served.home / "ca" / "ca.pem", served.home / "ca" / "ca.key"
    sub_cert, sub_key = issue(tmp_path, "sub", issuer_cert=ca_cert, issuer_key=ca_key, subject="/CN=Evil sub-CA",
                              extensions="basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign")
    leaf, key = issue(tmp_path, "forged", issuer_cert=sub_cert, issuer_key=sub_key, subject="/CN=evil.example",
                      extensions=f"{LEAF_EXTENSIONS}\nsubjectAltName = DNS:evil.example")
    leaf.write_text(leaf.read_text() + sub_cert.read_text())  # served with its intermediate
    assert_rejected(ca_cert, leaf, key, "evil.example", untrusted=sub_cert)


def test_the_same_forgery_for_a_provider_host_verifies(served, tmp_path):
    # Control: the recipe of the forgeries above works for a permitted name, so what stops them
    # is the CA's constraints, not the recipe.
    ca_cert, ca_key = served.home / "ca" / "ca.pem", served.home / "ca" / "ca.key"
    leaf, key = issue(tmp_path, "forged", issuer_cert=ca_cert, issuer_key=ca_key, subject="/CN=api.openai.com",
                      extensions=f"{LEAF_EXTENSIONS}\nsubjectAltName = DNS:api.openai.com")
    assert openssl("verify", "-CAfile", ca_cert, "-purpose", "sslserver", "-verify_hostname", "api.openai.com",
                   leaf, check=False).returncode == 0
    handshake(server_for(leaf, key), ssl.create_default_context(cafile=str(ca_cert)), "api.openai.com")


def assert_rejected(ca_cert: Path, leaf: Path, key: Path, name: str, untrusted: Path | None = None) -> None:
    """Neither `openssl verify` nor Python's ssl accepts `leaf` for `name` under `ca_cert`."""
    check = ["-verify_ip" if _is_ip(name) else "-verify_hostname", name]
    extra = ["-untrusted", untrusted] if untrusted else []
    verdict = openssl("verify", "-CAfile", ca_cert, "-purpose", "sslserver", *check, *extra, leaf, check=False)
    assert verdict.returncode != 0, verdict.stdout
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_for(leaf, key), ssl.create_default_context(cafile=str(ca_cert)), name)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A TLS site that is not a provider, with its own CA and a certificate for github.com."""
    ca = CertificateAuthority(tmp_path_factory.mktemp("elsewhere") / "ca", ("github.com",))
    ca.ensure()
    server = RecordingTlsServer(*ca.leaf_paths("github.com"), http_answer("200 OK", b"from the site", "text/plain"))
    yield server, ca.ca_cert_path
    server.close()


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"])
def test_other_hosts_are_tunnelled_blind_with_the_sites_own_certificate(served, elsewhere, target):
    site, site_ca = elsewhere
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    sock.sendall(f"CONNECT {target}:{site.port} HTTP/1.1\r\nHost: {target}:{site.port}\r\n\r\n".encode())
    assert read_request(sock).startswith(b"HTTP/1.1 200")
    # The client trusts our CA as well, so an intercepted handshake would succeed too: only the
    # certificate it is shown tells whether the proxy stepped in.
    context = ssl.create_default_context(cafile=str(served.home / "ca-bundle.pem"))
    context.load_verify_locations(cafile=str(site_ca))
    with context.wrap_socket(sock, server_hostname="github.com") as tls:
        assert tls.getpeercert(binary_form=True) == site.leaf_der
        marker = f"GET /{target} HTTP/1.1\r\nHost: github.com\r\n\r\n".encode()
        tls.sendall(marker)
        assert read_request(tls).endswith(b"from the site")
    assert marker in site.received


# ---- 4. upstream certificates are always verified ------------------------------------------


def post_through(served: Launched, host: str, marker: str) -> tuple[int, bytes]:
    conn = served.proxy().connection(host)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "m", "marker": marker}).encode(),
                     headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_verified_upstream_receives_the_call(served, upstreams):
    # Control: the trust the daemon was given works, so the refusals below are about the certificates.
    servers, _ = upstreams
    status, body = post_through(served, "api.anthropic.com", "control-marker")
    assert status == 200 and body == CONTROL_BODY
    assert b"control-marker" in servers["api.anthropic.com"].received


@pytest.mark.parametrize("host", sorted(BAD_UPSTREAMS))
def test_a_bad_upstream_certificate_gets_502_and_never_the_request(served, upstreams, host):
    upstream = upstreams[0][host]
    connections_before = upstream.connections
    status, body = post_through(served, host, f"never-sent-to-{host}")
    assert status == 502
    text = body.decode()
    assert "failed verification" in text and BAD_UPSTREAMS[host] in text and "the call was not sent" in text
    assert upstream.connections > connections_before  # the daemon did try this upstream...
    assert upstream.received == b""  # ...and sent it nothing


_VERIFICATION_OFF = re.compile(
    r"CERT_NONE|CERT_OPTIONAL|check_hostname\s*=\s*False|_create_unverified_context|verify_mode\s*="
    r"|PYTHONHTTPSVERIFY|--insecure|no[-_]verify|verify\s*=\s*False")


def test_nothing_can_turn_upstream_verification_off():
    package = REPO / "halton_meter"
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in sorted(package.rglob("*.py")) if path.name != "fakeprovider.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if _VERIFICATION_OFF.search(line)]
    assert offenders == []
    assert _VERIFICATION_OFF.search("context.check_hostname = False")  # the pattern does catch it
    for command in ("serve", "daemon", "edge"):
        options = set(re.findall(r"--[a-z][a-z-]*", cli(REPO, command, "--help").stdout))
        assert "--upstream-ca" in options
        assert not {option for option in options if re.search(r"insecure|verif|no-tls|no-ssl", option)}


# ---- 5. the API answers loopback names and its own page only ---------------------------------

API_PATHS = ("/", "/health", "/api/summary", "/api/calls", "/api/projects", "/api/models", "/api/timeseries",
             "/metrics")


def api_request(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, list[str]], bytes]:
    """One raw request (any Host, as a browser under DNS rebinding sends it): status, headers, body."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()),
             "Connection: close", "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    found: dict[str, list[str]] = {}
    for field in fields:
        name, _, value = field.partition(":")
        found.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status_line.split()[1]), found, body


def own_origin(served: Launched) -> str:
    return f"http://127.0.0.1:{served.api_port}"


def test_the_api_serves_its_own_page_without_a_wildcard_origin(served):
    port = served.api_port
    for path in API_PATHS:
        status, headers, body = api_request(port, "GET", path, {"Host": f"127.0.0.1:{port}"})
        assert status == 200 and body, path
        assert "access-control-allow-origin" not in headers, path
        assert headers["x-content-type-options"] == ["nosniff"], path
        status, headers, _ = api_request(port, "GET", path, {"Host": f"127.0.0.1:{port}", "Origin": own_origin(served)})
        assert status == 200 and headers["access-control-allow-origin"] == [own_origin(served)], path
        assert "Origin" in ", ".join(headers["vary"]), path


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:{port}", "127.0.0.1.evil.example", "127.0.0.1.evil.example:{port}",
    "localhost.evil.example:{port}", "rebind.evil.example:{port}", "127.0.0.1.nip.io:{port}",
    "192.0.2.10:{port}", "[fd00::2]:{port}",
])
def test_the_api_refuses_a_foreign_host(served, host):
    port = served.api_port
    for path in API_PATHS:
        status, headers, body = api_request(port, "GET", path, {"Host": host.format(port=port)})
        assert status == 403, path
        assert "access-control-allow-origin" not in headers, path
        assert "loopback" in json.loads(body)["error"] and len(body) < 300, path  # the refusal and nothing else


FOREIGN_ORIGINS = ["http://evil.example", "null", "http://127.0.0.1.evil.example:{port}",
                   "http://127.0.0.1:{port}.evil.example", "https://127.0.0.1:{port}", "http://localhost:3000"]


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_the_api_refuses_cross_origin_reads(served, origin):
    port = served.api_port
    for path in API_PATHS:
        status, headers, body = api_request(port, "GET", path, {"Host": f"127.0.0.1:{port}",
                                                                "Origin": origin.format(port=port)})
        assert status == 403, path
        assert "access-control-allow-origin" not in headers, path
        assert "cross-origin" in json.loads(body)["error"] and len(body) < 300, path


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_the_api_refuses_a_foreign_preflight(served, origin):
    port = served.api_port
    preflight = {"Host": f"127.0.0.1:{port}", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    status, headers, _ = api_request(port, "OPTIONS", "/api/calls", {**preflight, "Origin": origin.format(port=port)})
    assert status == 403
    assert not any(name.startswith("access-control-") for name in headers), headers
    # Control: the dashboard's own origin is answered.
    status, headers, _ = api_request(port, "OPTIONS", "/api/calls", {**preflight, "Origin": own_origin(served)})
    assert status == 204 and headers["access-control-allow-origin"] == [own_origin(served)]


# ---- 6. no secret is written down ----------------------------------------------------------


class Corpus:
    """Made-up secrets in the shapes of redaction.CATEGORIES, one prompt line each. They are
    built at run time (seeded) so that secret scanners have nothing to flag in this file."""

    def __init__(self, seed: int = 20261123) -> None:
        rng = random.Random(seed)
        alnum = string.ascii_letters + string.digits

        def chars(alphabet: str, count: int) -> str:
            return "".join(rng.choice(alphabet) for _ in range(count))

        def b64url(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).decode().rstrip("=")

        jwt_head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64url(
            json.dumps({"sub": "user-" + chars(alnum, 8), "iat": 1795420800}).encode())
        jwt = jwt_head + "." + b64url(hmac.new(chars(alnum, 32).encode(), jwt_head.encode(), hashlib.sha256).digest())
        pem_body = [chars(alnum + "+/", 64) for _ in range(3)] + [chars(alnum + "+/", 24) + "=="]
        basic = chars(alnum, 20)
        shapes = [
            ("anthropic_key", s := "sk-ant-api03-" + chars(alnum + "_-", 93) + "AA", f"my Anthropic key is {s}"),
            ("openai_key", s := "sk-proj-" + chars(alnum + "_-", 156), f"OPENAI_API_KEY={s}"),
            ("openrouter_key", s := "sk-or-v1-" + chars("0123456789abcdef", 64), f"openrouter: {s}"),
            ("google_key", s := "AIza" + chars(alnum + "_-", 35), f"gemini key {s} works"),
            ("xai_key", s := "xai-" + chars(alnum, 80), f"XAI_API_KEY='{s}'"),
            ("groq_key", s := "gsk_" + chars(alnum, 52), f"groq {s}"),
            ("huggingface_token", s := "hf_" + chars(alnum, 34), f"HF_TOKEN {s}"),
            ("aws_access_key", s := "AKIA" + chars(string.ascii_uppercase + string.digits, 16),
             f"aws_access_key_id = {s}"),
            ("aws_secret_key", s := chars(alnum + "/+", 40), f"aws_secret_access_key = {s}"),
            ("github_token", s := "ghp_" + chars(alnum, 36), f"git clone https://github.com/acme/app # token {s}"),
            ("slack_token", s := f"xoxb-{chars(string.digits, 13)}-{chars(string.digits, 13)}-{chars(alnum, 24)}",
             f"slack bot: {s}"),
            ("stripe_key", s := "sk_live_" + chars(alnum, 24), f"stripe.api_key = {s}"),
            ("jwt", jwt, f"session: {jwt}"),
            ("private_key", "\n".join(pem_body),
             "-----BEGIN PRIVATE KEY-----\n" + "\n".join(pem_body) + "\n-----END PRIVATE KEY-----"),
            ("url_credentials", s := "pG-" + chars(alnum, 20), f"DATABASE_URL=postgres://app:{s}@db.internal:5432/app"),
            ("password_assignment", s := chars(alnum + "!#", 18), f"DB_PASSWORD={s}"),
            ("secret_assignment", s := chars(alnum, 32), f'{{"client_secret": "{s}"}}'),
            ("bearer_token", s := "ya29.a0" + chars(alnum + "_-", 60), f"curl -H 'Authorization: Bearer {s}'"),
            ("auth_header", s := base64.b64encode(f"deploy:{basic}".encode()).decode(), f"Authorization: Basic {s}"),
        ]
        # category -> (the secret, the line of prompt text that carries it)
        self.in_text = {category: (secret, line) for category, secret, line in shapes}
        self.basic_password = basic
        # Credentials sent the way clients send them: headers, the query string, the proxy URL.
        self.anthropic_header = "sk-ant-api03-" + chars(alnum + "_-", 93) + "AA"
        self.openai_header = "sk-proj-" + chars(alnum + "_-", 156)
        self.google_header = "AIza" + chars(alnum + "_-", 35)
        self.google_query = "AIza" + chars(alnum + "_-", 35)
        self.plain_query = chars(alnum, 32)
        self.gateway_password = chars(alnum, 24)
        self.proxy_password = chars(alnum, 24)
        self.custom_header = "ghp_" + chars(alnum, 36)
        self.in_headers = [self.anthropic_header, self.openai_header, self.google_header, self.google_query,
                           self.plain_query, self.gateway_password, self.proxy_password, self.custom_header]

    @property
    def prompt(self) -> str:
        return "Please review this config, it has everything:\n" + "\n".join(
            line for _, line in self.in_text.values())

    def gateway_basic(self) -> str:
        return base64.b64encode(f"gateway:{self.gateway_password}".encode()).decode()

    def proxy_basic(self) -> str:
        return base64.b64encode(f"secrets:{self.proxy_password}".encode()).decode()

    def sent(self) -> bytes:
        """Every secret as the client held it and as it went on the wire (Basic values encoded)."""
        return "\n".join([self.prompt, self.basic_password, *self.in_headers,
                          *(base64.b64encode(v.encode()).decode() for v in self.in_headers),
                          self.gateway_basic(), self.proxy_basic()]).encode()

    def needles(self) -> dict[str, bytes]:
        """label -> bytes that must appear nowhere: each secret, its last 12 characters (a
        partial redaction leaves a tail), each PEM line, and header credentials base64-encoded."""
        found: dict[str, bytes] = {}
        secrets = {category: secret for category, (secret, _) in self.in_text.items() if category != "private_key"}
        secrets.update({f"header {n}": value for n, value in enumerate(self.in_headers)})
        secrets["basic password"] = self.basic_password
        for label, secret in secrets.items():
            found[label] = secret.encode()
            found[f"{label} (tail)"] = secret[-12:].encode()
        for n, line in enumerate(self.in_text["private_key"][0].splitlines()):
            found[f"private_key line {n}"] = line.encode()
        for n, value in enumerate(self.in_headers):
            found[f"header {n} (base64)"] = base64.b64encode(value.encode())
        found["gateway basic"] = self.gateway_basic().encode()
        found["proxy basic"] = self.proxy_basic().encode()
        return found


class PlainSite(BaseHTTPRequestHandler):
    """A plain-HTTP site reached through the proxy's forward path."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@dataclass
class SecretRun:
    corpus: Corpus
    running: Launched
    call_ids: list[str]
    snapshot_while_running: dict[str, bytes]


def everything_under(home: Path) -> dict[str, bytes]:
    """Every regular file under `home`, by relative path: the ledger with its -wal and -shm, logs,
    state files, the CA."""
    return {path.relative_to(home).as_posix(): path.read_bytes()
            for path in sorted(home.rglob("*")) if path.is_file() and not path.is_symlink()}


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, fake):
    """A daemon at DEBUG with body capture on, sent the corpus every way a client sends secrets,
    then stopped cleanly."""
    corpus = Corpus()
    home = tmp_path_factory.mktemp("secrets") / "home"
    routes = [arg for host in ("api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com")
              for arg in ("--upstream", f"{host}=127.0.0.1:{fake.port}")]
    running = launch(home, "serve", "--port", "0", "--api-port", "0", "--log-level", "DEBUG", *routes,
                     "--upstream-ca", str(fake.ca_path))
    try:
        send_corpus(running, corpus)
        proxy = running.proxy()
        calls = proxy.wait_rows("secrets", 4)
        assert [row["status"] for row in calls] == [200] * 4, calls
        snapshot = everything_under(home)
    finally:
        assert stop(running) == 0
    return SecretRun(corpus, running, [row["call_id"] for row in calls], snapshot)


def send_corpus(running: Launched, corpus: Corpus) -> None:
    """Four metered calls (two echoed back by the provider, one streamed) and one plain-HTTP
    request, with secrets in headers, query strings, prompts, responses and the proxy URL."""
    proxy = running.proxy()
    tunnel = {"Proxy-Authorization": f"Basic {corpus.proxy_basic()}"}  # http://secrets:PASSWORD@proxy
    anthropic = {"content-type": "application/json", "x-api-key": corpus.anthropic_header,
                 "authorization": f"Basic {corpus.gateway_basic()}", "x-debug-token": corpus.custom_header,
                 "x-fake-echo": "1"}
    calls = [
        ("api.anthropic.com", f"/v1/messages?beta=true&key={corpus.google_query}", anthropic,
         {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": corpus.prompt}]}),
        ("api.anthropic.com", "/v1/messages", anthropic,
         {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
          "messages": [{"role": "user", "content": [{"type": "text", "text": corpus.prompt}]}]}),
        ("api.openai.com", "/v1/chat/completions",
         {"content-type": "application/json", "authorization": f"Bearer {corpus.openai_header}"},
         {"model": "gpt-4.1", "messages": [{"role": "user", "content": corpus.prompt}]}),
        ("generativelanguage.googleapis.com",
         f"/v1beta/models/gemini-2.5-flash:generateContent?key={corpus.google_query}",
         {"content-type": "application/json", "x-goog-api-key": corpus.google_header},
         {"contents": [{"role": "user", "parts": [{"text": corpus.prompt}]}]}),
    ]
    for host, path, headers, body in calls:
        conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=proxy.client_context(), timeout=15)
        conn.set_tunnel(host, 443, headers=tunnel)
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        answer = response.read()
        conn.close()
        assert response.status == 200, answer
        if headers.get("x-fake-echo"):
            assert corpus.in_text["github_token"][0].encode() in answer  # the provider did echo the secrets
    site = ThreadingHTTPServer(("127.0.0.1", 0), PlainSite)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=15)
        conn.request("GET", f"http://127.0.0.1:{site.server_port}/v1/models?api_key={corpus.plain_query}",
                     headers={"Proxy-Authorization": f"Basic {corpus.proxy_basic()}",
                              "Authorization": f"Bearer {corpus.openai_header}"})
        assert conn.getresponse().read() == b"ok"
        conn.close()
    finally:
        site.shutdown()


def leaks(files: dict[str, bytes], needles: dict[str, bytes]) -> list[str]:
    return [f"{label} in {name}" for name, data in files.items() for label, needle in needles.items() if needle in data]


def test_no_secret_is_written_anywhere(secret_run):
    needles = secret_run.corpus.needles()
    # Control: every needle is really part of the traffic, so finding none on disk means something.
    assert len(leaks({"sent": secret_run.corpus.sent()}, needles)) == len(needles)
    home = secret_run.running.home
    after_stop = everything_under(home)
    assert "db.sqlite" in after_stop and after_stop["db.sqlite"]
    output = {"stdout": secret_run.running.stdout.read_bytes(), "stderr": secret_run.running.stderr.read_bytes()}
    assert b" call call_id=" in output["stderr"]  # DEBUG really logged each call
    found = (leaks(secret_run.snapshot_while_running, needles) + leaks(after_stop, needles)
             + leaks(output, needles))
    assert found == []


def test_every_secret_category_is_stored_as_its_placeholder(secret_run):
    home = secret_run.running.home
    needles = secret_run.corpus.needles()
    redacted: dict[str, int] = {}
    for call_id in secret_run.call_ids:
        shown = cli(home, "bodies", "show", call_id)
        document = cli(home, "bodies", "show", call_id, "--json")
        assert shown.returncode == 0 and document.returncode == 0, shown.stderr
        assert leaks({"bodies show": shown.stdout.encode(), "bodies show --json": document.stdout.encode()},
                     needles) == []
        body = json.loads(document.stdout)
        for category, count in body["redactions"].items():
            redacted[category] = redacted.get(category, 0) + count
        assert "[REDACTED:github_token]" in body["request_body"] and "[REDACTED:" in shown.stdout
        headers = {name.lower(): value for name, value in body["request_headers"]}
        for name in ("x-api-key", "authorization", "x-goog-api-key"):
            assert headers.get(name) in (None, "[REDACTED:auth_header]"), (name, headers.get(name))
    assert sorted(redacted) == sorted(CATEGORIES)
    # The echoed responses, plain and streamed, were stored with the placeholders in them too.
    db = sqlite3.connect(home / "db.sqlite")
    try:
        responses = [row[0] for row in db.execute("SELECT response_body FROM request_bodies")]
        paths = [row[0] for row in db.execute("SELECT path FROM calls ORDER BY id")]
    finally:
        db.close()
    echoed = [text for text in responses if text and "[REDACTED:anthropic_key]" in text]
    assert len(echoed) == 2 and any("content_block_delta" in text for text in echoed)
    assert paths[0] == "/v1/messages?beta=true&key=REDACTED" and paths[3].endswith(":generateContent?key=REDACTED")
