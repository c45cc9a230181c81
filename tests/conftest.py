"""Shared fixtures: fake providers on a background event loop, `serve` as a real subprocess.

Everything is real: TLS with certificates minted by halton-meter's own CA code, sockets on
127.0.0.1, the SQLite file the proxy writes. Tests tell their calls apart by project name.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from halton_meter.fakeprovider import FakeProvider

REPO = Path(__file__).resolve().parent.parent


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for servers the synchronous tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Proxy:
    process: subprocess.Popen
    port: int
    home: Path
    banner: str
    log_lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    @property
    def bundle(self) -> Path:
        return self.home / "ca-bundle.pem"

    @property
    def db(self) -> Path:
        return self.home / "db.sqlite"

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.bundle))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context

    def connection(self, host: str = "api.anthropic.com", timeout: float = 15.0) -> http.client.HTTPSConnection:
        """An http.client connection that reaches `host` through the proxy with CONNECT."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.client_context(),
                                           timeout=timeout)
        conn.set_tunnel(host, 443)
        return conn

    def rows(self, project: str) -> list[dict]:
        db = sqlite3.connect(self.db)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM calls WHERE project = ? ORDER BY id", (project,))]
        finally:
            db.close()

    def wait_rows(self, project: str, count: int = 1, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(project)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not found")


def subprocess_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HALTON_METER_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_serve(home: Path, *args: str, timeout: float = 30.0) -> Proxy:
    """Start `python -m halton_meter serve --port 0 …` and wait for its listening line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "halton_meter", "serve", "--port", "0", "--api-port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(home),
        cwd=str(REPO),
    )
    banner = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner.append(line)
        if "use it:" in line:
            break
    text = "".join(banner)
    if "listening on http://127.0.0.1:" not in text:
        process.kill()
        raise AssertionError(f"serve did not start:\n{text}\n{process.stderr.read()}")
    port = int(text.split("listening on http://127.0.0.1:")[1].split()[0])
    proxy = Proxy(process, port, home, text)
    # Drain both pipes in the background so a chatty log can never block the proxy; keep the log.
    threading.Thread(target=_collect, args=(process.stderr, proxy.log_lines), daemon=True).start()
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return proxy


def _collect(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def stop_serve(proxy: Proxy, timeout: float = 15.0) -> int:
    if proxy.process.poll() is None:
        proxy.process.send_signal(signal.SIGTERM)
    return proxy.process.wait(timeout)


def wait_for(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def background_loop():
    loop = BackgroundLoop()
    yield loop
    loop.stop()


def _running_fake(background_loop, directory):
    provider = FakeProvider(directory / "ca")
    background_loop.run(provider.start())
    return provider


@pytest.fixture(scope="session")
def fake(background_loop, tmp_path_factory) -> FakeProvider:
    """The trusted fake provider (its CA is passed to the proxy with --upstream-ca)."""
    provider = _running_fake(background_loop, tmp_path_factory.mktemp("fake"))
    yield provider
    background_loop.run(provider.close())


@pytest.fixture(scope="session")
def untrusted_fake(background_loop, tmp_path_factory) -> FakeProvider:
    """A fake provider whose CA the proxy does not trust: a bad upstream certificate."""
    provider = _running_fake(background_loop, tmp_path_factory.mktemp("untrusted"))
    yield provider
    background_loop.run(provider.close())


@pytest.fixture(scope="session")
def proxy(fake, untrusted_fake, tmp_path_factory) -> Proxy:
    """One `serve` for the session: anthropic -> fake, openai -> untrusted cert, groq -> refused."""
    home = tmp_path_factory.mktemp("home")
    running = start_serve(
        home,
        "--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}",
        "--upstream", f"api.x.ai=127.0.0.1:{fake.port}",
        "--upstream", f"api.openai.com=127.0.0.1:{untrusted_fake.port}",
        "--upstream", f"api.groq.com=127.0.0.1:{closed_port()}",
        "--upstream-ca", str(fake.ca_path),
    )
    yield running
    assert stop_serve(running) == 0
    time.sleep(0.2)
    # Whatever the tests threw at it, the proxy never logged a crash of its own.
    for marker in ("Traceback", "never retrieved", "proxy_error", "connection_failed"):
        assert marker not in running.log, f"{marker!r} in the proxy log:\n{running.log[-4000:]}"


def messages_body(stream: bool = False, model: str = "claude-sonnet-4-5") -> bytes:
    return json.dumps({"model": model, "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "Say hi"}]}).encode()
