"""`halton-meter demo`: the whole product, offline, in seconds, in a throwaway home.

It starts the loopback fake provider and a real proxy (the same `serve` code, on a free port),
sends streaming and non-streaming calls for two projects to three providers through it, prints
the report those rows make, and checks every row is priced as expected. Nothing touches the
user's own home, and nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import shutil
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from halton_meter.config import load_settings
from halton_meter.fakeprovider import FakeProvider
from halton_meter.report import run_report
from halton_meter.serve import serve

DEMO_HOSTS = ("api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com")


@dataclass(frozen=True)
class DemoCall:
    project: str
    host: str
    path: str
    body: dict
    label: str


CALLS = (
    DemoCall("web-app", "api.anthropic.com", "/v1/messages",
             {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
              "messages": [{"role": "user", "content": "Summarise this diff"}]},
             "Anthropic Messages, streaming"),
    DemoCall("web-app", "api.openai.com", "/v1/chat/completions",
             {"model": "gpt-4.1", "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": "Name three test cases"}]},
             "OpenAI Chat Completions, streaming"),
    DemoCall("data-pipeline", "api.openai.com", "/v1/responses",
             {"model": "gpt-5.5", "input": "Classify these rows"}, "OpenAI Responses"),
    DemoCall("data-pipeline", "generativelanguage.googleapis.com",
             "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
             {"contents": [{"parts": [{"text": "Extract the dates"}]}]}, "Gemini, streaming"),
    DemoCall("data-pipeline", "api.anthropic.com", "/v1/messages",
             {"model": "claude-haiku-4-5", "max_tokens": 64,
              "messages": [{"role": "user", "content": "Label this ticket"}]},
             "Anthropic Messages"),
)


def run_demo(out: TextIO | None = None, *, keep: bool = False) -> int:
    """0 when every demo call came back and was recorded and priced; 1 otherwise."""
    out = out or sys.stdout
    home = Path(tempfile.mkdtemp(prefix="halton-meter-demo-"))
    print(f"halton-meter demo: a throwaway proxy and a loopback fake provider in {home}", file=out)
    print("(nothing here touches your own ~/.halton-meter or the internet)\n", file=out)
    try:
        ok = asyncio.run(_run(home, out))
        print(file=out)
        run_report(home / "db.sqlite", out=out)
        if keep:
            print(f"\nKept {home}: try `halton-meter --home {home} tail`.", file=out)
        else:
            print("\nNext: `halton-meter serve`, then point your tools at it (see the README).", file=out)
        return 0 if ok else 1
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


async def _run(home: Path, out: TextIO) -> bool:
    fake = FakeProvider(home / "fake-ca", hosts=DEMO_HOSTS)
    fake_port = await fake.start()
    settings = load_settings(home, port=0, api_port=0, upstreams=[f"{host}=127.0.0.1:{fake_port}" for host in DEMO_HOSTS],
                             upstream_ca_files=[str(fake.ca_path)])
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    proxy = asyncio.create_task(serve(settings, out=io.StringIO(), stop=stop, on_ready=ready.set_result))
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 60)
        statuses = await asyncio.to_thread(_send_all, port, settings.bundle_path, out)
    finally:
        stop.set()
        code = await proxy
        await fake.close()
    return code == 0 and all(status == 200 for status in statuses) and _all_priced(settings.db_path, len(CALLS))


def _send_all(port: int, bundle: Path, out: TextIO) -> list[int]:
    context = ssl.create_default_context(cafile=str(bundle))
    statuses = []
    for call in CALLS:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        conn.set_tunnel(call.host, 443)
        try:
            conn.request("POST", call.path, body=json.dumps(call.body).encode(),
                         headers={"Content-Type": "application/json", "X-Halton-Project": call.project,
                                  "User-Agent": "halton-meter-demo/1"})
            response = conn.getresponse()
            size = len(response.read())
            statuses.append(response.status)
            print(f"  {call.project:<14} {call.label:<36} HTTP {response.status}, {size:,} bytes", file=out)
        finally:
            conn.close()
    return statuses


def _all_priced(db_path: Path, expected: int) -> bool:
    import sqlite3

    db = sqlite3.connect(db_path)
    try:
        count, priced = db.execute("SELECT COUNT(*), COUNT(cost_nanousd) FROM calls "
                                   "WHERE usage_status = 'exact'").fetchone()
    finally:
        db.close()
    return count == expected and priced == expected
