"""`halton-meter serve` driven as a user would: real subprocesses, real signals, a temp home."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

from halton_meter.adapters import PROVIDER_HOSTS
from halton_meter.tls.ca import CertificateAuthority
from tests.conftest import messages_body, start_serve, stop_serve, subprocess_env


def run_cli(home, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "halton_meter", *args], capture_output=True,
                          text=True, env=subprocess_env(home), timeout=timeout)


def open_held_stream(proxy, project: str):
    """A streaming call whose provider sends the first event, then holds the rest for 30 s."""
    held = proxy.connection()
    held.request("POST", "/v1/messages", body=messages_body(stream=True),
                 headers={"content-type": "application/json", "x-halton-project": project,
                          "x-fake-hold-s": "30"})
    held.getresponse().read1(1024)
    return held


def upstream_args(fake):
    return ("--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}", "--upstream-ca", str(fake.ca_path))


def test_version_and_help(tmp_path):
    from halton_meter import __version__

    assert run_cli(tmp_path, "--version").stdout.strip() == f"halton-meter {__version__}"
    result = run_cli(tmp_path, "serve", "--help")
    assert result.returncode == 0 and "--upstream HOST=ADDR:PORT" in result.stdout
    assert run_cli(tmp_path).returncode == 2


def test_refuses_a_non_loopback_listen_address(tmp_path):
    result = run_cli(tmp_path, "serve", "--listen", "0.0.0.0", "--port", "0")
    assert result.returncode == 1
    assert "binds loopback only" in result.stderr and "127.0.0.1" in result.stderr


def test_malformed_upstream_is_a_usage_error(tmp_path):
    result = run_cli(tmp_path, "serve", "--upstream", "api.anthropic.com")
    assert result.returncode == 2 and "HOST=ADDR:PORT" in result.stderr


def test_busy_port_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(tmp_path, "serve", "--port", str(port))
    assert result.returncode == 1
    assert f"Port {port} on 127.0.0.1 is already in use" in result.stderr and "--port" in result.stderr


def test_refuses_to_start_when_the_ca_key_is_readable_by_others(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca", PROVIDER_HOSTS)
    ca.ensure()
    os.chmod(ca.ca_key_path, 0o644)
    result = run_cli(tmp_path, "serve", "--port", "0")
    assert result.returncode == 1
    assert f"chmod 600 {ca.ca_key_path}" in result.stderr


def test_banner_state_files_and_clean_stop(tmp_path, fake):
    proxy = start_serve(tmp_path, *upstream_args(fake))
    ca = CertificateAuthority(tmp_path / "ca", PROVIDER_HOSTS)
    assert ca.fingerprint_sha256 in proxy.banner
    assert str(tmp_path / "ca-bundle.pem") in proxy.banner
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ca.ca_key_path).st_mode) == 0o600
    bundle = (tmp_path / "ca-bundle.pem").read_text()
    assert bundle.rstrip().endswith(ca.ca_cert_path.read_text().rstrip())
    assert stop_serve(proxy) == 0


def test_sigterm_flushes_every_row_and_interrupts_held_streams(tmp_path, fake):
    proxy = start_serve(tmp_path, *upstream_args(fake))
    for n in range(20):
        conn = proxy.connection()
        conn.request("POST", "/v1/messages", body=messages_body(),
                     headers={"content-type": "application/json", "x-halton-project": "flush"})
        conn.getresponse().read()
        conn.close()
    held = open_held_stream(proxy, "held")
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(15) == 0
    assert time.monotonic() - started < 10  # the grace period, not the provider's 30 s pause
    db = sqlite3.connect(proxy.db)
    counts = dict(db.execute("SELECT outcome, COUNT(*) FROM calls GROUP BY outcome"))
    assert counts == {"ok": 20, "interrupted": 1}


def test_upstreams_from_config_file(tmp_path, fake):
    (tmp_path / "config.toml").write_text(
        "[proxy]\n"
        f'upstream_ca = ["{fake.ca_path}"]\n'
        "[proxy.upstreams]\n"
        f'"api.anthropic.com" = "127.0.0.1:{fake.port}"\n'
    )
    proxy = start_serve(tmp_path)
    conn = proxy.connection()
    conn.request("POST", "/v1/messages", body=messages_body(),
                 headers={"content-type": "application/json", "x-halton-project": "cfg"})
    assert conn.getresponse().status == 200
    conn.close()
    assert proxy.wait_rows("cfg")[0]["outcome"] == "ok"
    assert stop_serve(proxy) == 0


def test_invalid_config_file_is_a_clear_error(tmp_path):
    (tmp_path / "config.toml").write_text("[proxy\nport = 1")
    result = run_cli(tmp_path, "serve")
    assert result.returncode == 1 and "config.toml is not valid TOML" in result.stderr


def test_home_flag_relocates_all_state(tmp_path):
    home = tmp_path / "elsewhere"
    env_home = tmp_path / "env-home"
    process = subprocess.Popen([sys.executable, "-m", "halton_meter", "--home", str(home), "serve", "--port", "0", "--api-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=subprocess_env(env_home))
    line = process.stdout.readline()
    threading.Thread(target=process.stdout.read, daemon=True).start()
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert "listening on" in line
    assert (home / "db.sqlite").exists() and (home / "ca" / "ca.pem").exists()
    assert not env_home.exists()


def test_silent_upstream_times_out_with_504(tmp_path, fake):
    # Accepts TCP (the kernel's backlog does) but never answers the TLS handshake.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        (tmp_path / "config.toml").write_text(
            f'[proxy]\nconnect_timeout_s = 0.5\n[proxy.upstreams]\n"api.anthropic.com" = "127.0.0.1:{silent.getsockname()[1]}"\n')
        proxy = start_serve(tmp_path)
        conn = proxy.connection()
        started = time.monotonic()
        conn.request("POST", "/v1/messages", body=messages_body(),
                     headers={"content-type": "application/json", "x-halton-project": "slow"})
        response = conn.getresponse()
        body = response.read()
        elapsed = time.monotonic() - started
        conn.close()
    assert response.status == 504 and b"timed out connecting to api.anthropic.com" in body
    assert 0.4 < elapsed < 5
    [row] = proxy.wait_rows("slow")
    assert row["outcome"] == "upstream_error" and "timed out" in row["error"]
    assert stop_serve(proxy) == 0


def test_second_signal_skips_the_grace_period_but_keeps_the_rows(tmp_path, fake):
    (tmp_path / "config.toml").write_text("[proxy]\nshutdown_grace_s = 20\n")
    proxy = start_serve(tmp_path, *upstream_args(fake))
    held = open_held_stream(proxy, "held")
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(15) == 0
    assert time.monotonic() - started < 10  # the 20 s grace period was cut short
    db = sqlite3.connect(proxy.db)
    assert db.execute("SELECT outcome FROM calls WHERE project = 'held'").fetchall() == [("interrupted",)]


def test_idle_kept_alive_connections_do_not_delay_shutdown(tmp_path, fake):
    (tmp_path / "config.toml").write_text("[proxy]\nshutdown_grace_s = 20\n")
    proxy = start_serve(tmp_path, *upstream_args(fake))
    idle = proxy.connection()
    idle.request("POST", "/v1/messages", body=messages_body(), headers={"content-type": "application/json"})
    idle.getresponse().read()  # the connection stays open, idle
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(15) == 0
    assert time.monotonic() - started < 10  # not the 20 s grace: nothing was in flight
    idle.close()


def test_client_leaving_during_the_grace_period_is_a_cancel_not_an_interrupt(tmp_path, fake):
    (tmp_path / "config.toml").write_text("[proxy]\nshutdown_grace_s = 20\n")
    proxy = start_serve(tmp_path, *upstream_args(fake))
    held = open_held_stream(proxy, "leaver")
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    held.sock.close()
    held.close()
    assert proxy.process.wait(15) == 0
    assert time.monotonic() - started < 10  # nothing left in flight once it left
    db = sqlite3.connect(proxy.db)
    assert db.execute("SELECT outcome FROM calls WHERE project = 'leaver'").fetchall() == [("client_cancelled",)]


def test_websocket_keeps_working_through_the_grace_period(tmp_path, fake):
    from tests.test_proxy import raw_tunnel, read_until

    (tmp_path / "config.toml").write_text("[proxy]\nshutdown_grace_s = 20\n")
    proxy = start_serve(tmp_path, *upstream_args(fake))
    sock = raw_tunnel(proxy)
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: api.anthropic.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"x-halton-project: ws\r\n\r\n")
    assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101")
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    sock.sendall(b"still-here")
    assert read_until(sock, b"still-here").endswith(b"still-here")
    sock.close()
    assert proxy.process.wait(15) == 0
    db = sqlite3.connect(proxy.db)
    assert db.execute("SELECT outcome FROM calls WHERE project = 'ws'").fetchall() == [("ok",)]


def test_unreadable_ledger_is_a_clear_error(tmp_path):
    (tmp_path / "db.sqlite").write_bytes(b"this is not a database" * 100)
    result = run_cli(tmp_path, "serve", "--port", "0")
    assert result.returncode == 1
    assert "Cannot open the ledger" in result.stderr and "Traceback" not in result.stderr


def test_upstream_ca_that_is_not_pem_is_a_clear_error(tmp_path):
    bogus = tmp_path / "gateway-ca.pem"
    bogus.write_text("not a certificate\n")
    result = run_cli(tmp_path, "serve", "--port", "0", "--upstream-ca", str(bogus))
    assert result.returncode == 1
    assert "not a valid PEM certificate" in result.stderr and "Traceback" not in result.stderr


def test_debug_log_has_one_line_per_call_without_secrets(tmp_path, fake):
    proxy = start_serve(tmp_path, *upstream_args(fake), "--log-level", "DEBUG")
    conn = proxy.connection()
    conn.request("POST", "/v1/messages?key=AIzaTOPSECRET", body=messages_body(),
                 headers={"content-type": "application/json", "x-api-key": "sk-ant-api03-TOPSECRET"})
    conn.getresponse().read()
    conn.close()
    assert stop_serve(proxy) == 0
    time.sleep(0.2)
    lines = [line for line in proxy.log_lines if " call call_id=" in line]
    assert len(lines) == 1 and "path=/v1/messages?key=REDACTED" in lines[0] and "outcome=ok" in lines[0]
    assert "TOPSECRET" not in proxy.log


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_ipv6_loopback_listen_prints_a_usable_url(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "halton_meter", "serve", "--listen", "::1", "--port", "0", "--api-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=subprocess_env(tmp_path))
    line = process.stdout.readline()
    threading.Thread(target=process.stdout.read, daemon=True).start()
    port = int(line.rsplit(":", 1)[1])
    with socket.create_connection(("::1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert line.startswith("halton-meter listening on http://[::1]:")


def test_a_finished_call_is_on_disk_within_a_second_and_survives_sigkill(tmp_path, fake):
    proxy = start_serve(tmp_path, *upstream_args(fake))
    for n in range(5):
        conn = proxy.connection()
        conn.request("POST", "/v1/messages", body=messages_body(),
                     headers={"content-type": "application/json", "x-halton-project": "durable"})
        conn.getresponse().read()
        conn.close()
    finished = time.monotonic()
    rows = proxy.wait_rows("durable", 5, timeout=1.0)
    assert len(rows) == 5 and time.monotonic() - finished < 1.0
    proxy.process.kill()  # a crash: no flush, no shutdown
    proxy.process.wait(10)
    db = sqlite3.connect(proxy.db)
    assert db.execute("SELECT COUNT(*), SUM(cost_nanousd) FROM calls WHERE project = 'durable'").fetchone() == (
        5, 5 * (12 * 3000 + 9 * 15000))
