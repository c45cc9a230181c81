"""The edge in front of the daemon: sockets handed off while the daemon is healthy, traffic going
straight to the provider while it is down (SIGKILL), metering back once it restarts."""

from __future__ import annotations

import http.client
import json
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, subprocess_env, wait_for


def launch(home, command, *args, ready="listening on http://127.0.0.1:"):
    process = subprocess.Popen([sys.executable, "-m", "halton_meter", command, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env(home), cwd=str(REPO))
    lines = []
    deadline = time.monotonic() + 30
    port = None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if ready in line:
            port = int(line.split(ready)[1].split()[0])
        if port and (command == "edge" and "hand-off" in line or "use it:" in line):
            break
    if port is None:
        process.kill()
        raise AssertionError("".join(lines) + process.stderr.read())
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, port, log


@pytest.fixture
def stack(tmp_path, fake):
    upstream = ["--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}", "--upstream-ca", str(fake.ca_path)]
    daemon = launch(tmp_path, "daemon", "--api-port", "0", *upstream)
    edge = launch(tmp_path, "edge", "--port", "0", *upstream)
    state = {"daemon": daemon, "edge": edge, "upstream": upstream, "home": tmp_path}
    yield state
    for process, _, _ in (state["edge"], state["daemon"]):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(15)


def client_context(home, fake) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(home / "ca-bundle.pem"))
    context.load_verify_locations(cafile=str(fake.ca_path))  # when the edge tunnels straight through
    return context


def call(port, context, project, stream=False):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=15)
    conn.set_tunnel("api.anthropic.com", 443)
    conn.request("POST", "/v1/messages", body=json.dumps(
        {"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": stream, "messages": []}).encode(),
        headers={"Content-Type": "application/json", "X-Halton-Project": project})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def rows(home, project):
    db = sqlite3.connect(home / "db.sqlite")
    try:
        return db.execute("SELECT usage_status, cost_nanousd FROM calls WHERE project = ?", (project,)).fetchall()
    finally:
        db.close()


def test_edge_hands_off_then_fails_open_then_meters_again(stack, fake):
    home, (_, edge_port, edge_log) = stack["home"], stack["edge"]
    context = client_context(home, fake)

    assert call(edge_port, context, "before", stream=True)[0] == 200
    assert wait_for(lambda: rows(home, "before") == [("exact", 20 * 3000 + 6 * 15000)])

    daemon, _, _ = stack["daemon"]
    daemon.kill()  # SIGKILL: no goodbye on the hand-off channel
    daemon.wait(10)
    for n in range(5):  # every call works, straight to the provider, while metering is down
        status, body = call(edge_port, context, "during")
        assert status == 200 and json.loads(body)["usage"]["output_tokens"] == 9
    assert rows(home, "during") == []  # unmetered: the gap is logged, not invented
    assert wait_for(lambda: any("metering_gap" in line for line in edge_log))

    stack["daemon"] = launch(home, "daemon", "--api-port", "0", *stack["upstream"])
    assert wait_for(lambda: call(edge_port, context, "after")[0] == 200 and rows(home, "after") != [], timeout=15)
    assert rows(home, "after")[-1] == ("exact", 12 * 3000 + 9 * 15000)


def test_edge_keeps_other_hosts_working_without_any_daemon(tmp_path, fake):
    edge, port, _ = launch(tmp_path, "edge", "--port", "0", "--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}")
    try:
        context = ssl.create_default_context(cafile=str(fake.ca_path))
        status, body = call(port, context, "no-daemon")
        assert status == 200 and b"msg_fake" in body
    finally:
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(15) == 0


def test_second_daemon_on_the_same_home_is_refused(stack):
    result = subprocess.run([sys.executable, "-m", "halton_meter", "daemon"], capture_output=True, text=True,
                            env=subprocess_env(stack["home"]), cwd=str(REPO), timeout=30)
    assert result.returncode == 1 and "Another metering daemon" in result.stderr
