"""The soak (tools/soak.py), shortened for CI: 200 concurrent streams and 1,000 small calls
through a real `serve` for 28 s after a 6 s warm-up; every call matched to its row, and the
proxy's descriptors and memory back to the baseline afterwards.

The soak's verdicts are also tested on made-up calls and rows, so that a soak that passes does
not pass because one of its checks cannot fail.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import start_serve, stop_serve

sys.path.append(str(Path(__file__).resolve().parent.parent / "tools"))

import soak  # noqa: E402  (tools/ is not a package; its client workers import it by this name)

SHORT = soak.Plan(duration_s=28.0, streams=200, small=1000, warmup_s=6.0)


def test_short_soak_meters_every_call_and_leaks_nothing():
    report = soak.run_soak(SHORT)
    figures = report["figures"]
    failed = [f"{check['name']}: {check['detail']}" for check in report["checks"] if not check["pass"]]
    assert not failed, "\n".join(failed) + f"\n{figures}"
    assert figures["small"] == 1000
    assert figures["streams"] > 2 * SHORT.streams  # each slot went through several streams
    assert figures["rows"] == figures["calls"] == figures["streams"] + figures["small"]
    assert figures["streams_in_flight_mean"] >= 0.9 * SHORT.streams
    assert figures["fds"]["peak"] > figures["fds"]["baseline"] + SHORT.streams  # the load was really there
    assert figures["fds"]["end"] <= figures["fds"]["baseline"] + soak.FD_SLACK
    # Streams last 1.6-6 s; a proxy that buffered them would show their length as first byte.
    assert figures["stream_ttfb_ms"]["p50"] < 1500


def handshake_then_close(port: int, context: ssl.SSLContext) -> None:
    """CONNECT, TLS handshake, then the client's Finished and its close_notify in one write: what
    a client that opens a connection and drops it at once (a pool trimming itself) sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="api.anthropic.com")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        with pytest.raises(ssl.SSLWantReadError):
            tls.unwrap()  # our close_notify is out; the proxy's is not read
        sock.sendall(outgoing.read())
        sock.recv(65536)  # until the proxy closes too


def test_connection_closed_right_after_its_handshake_logs_no_warning(fake, tmp_path):
    proxy = start_serve(tmp_path / "home", "--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}",
                        "--upstream-ca", str(fake.ca_path))
    try:
        for _ in range(5):
            handshake_then_close(proxy.port, proxy.client_context())
        time.sleep(0.5)
    finally:
        assert stop_serve(proxy) == 0
    assert " WARNING " not in proxy.log, proxy.log


# --- the verdicts ------------------------------------------------------------------------------


def call(request_id: str, kind: str = "stream", tokens: tuple[int, int] = (20, 9)) -> soak.Call:
    return soak.Call(kind, "anthropic", request_id, *tokens, ttfb_ms=5.0, total_ms=3000.0, paced_ms=2900)


def row(request_id: str, **changes) -> dict:
    fields = {"request_id": request_id, "outcome": "ok", "is_stream": 1, "usage_status": "exact",
              "input_tokens": 20, "output_tokens": 9, "cost_nanousd": 195000}
    return {**fields, **changes}


def test_verify_rows_names_missing_extra_doubled_and_wrong_rows():
    calls = [call("req_1"), call("req_2"), call("req_3"), call("req_4"), call("req_5", "small", (12, 9))]
    rows = [row("req_1"), row("req_2"), row("req_2"), row("req_4", usage_status="partial", output_tokens=3),
            row("req_5", cost_nanousd=None), row("req_9", outcome="client_cancelled")]
    problems = soak.verify_rows(calls, rows)
    assert problems["missing"] == ["stream req_3"]
    assert problems["duplicate"] == ["req_2 x2"]
    assert problems["extra"] == ["req_9 client_cancelled"]
    wrong = "\n".join(problems["wrong"])
    assert len(problems["wrong"]) == 2
    assert "req_4" in wrong and "'usage_status': 'partial'" in wrong and "'output_tokens': 3" in wrong
    # req_5 is a small call: its row says stream, and it has no cost.
    assert "req_5" in wrong and "'is_stream': 1" in wrong and "'cost_nanousd': None" in wrong


def test_verify_rows_passes_exact_rows():
    assert soak.verify_rows([call("req_1"), call("req_2")], [row("req_2"), row("req_1")]) == {
        "missing": [], "extra": [], "duplicate": [], "wrong": []}


def passing_inputs() -> dict:
    """Inputs to `judge` for a soak where everything went right."""
    calls = [call(f"req_{n}") for n in range(3)] + [call("req_s", "small", (12, 9))]
    run = {"project": "soak", "calls": calls, "rows": [row(c.request_id) for c in calls[:3]]
           + [row("req_s", is_stream=0, input_tokens=12)], "errors": [], "in_flight_mean": 10.0}
    log = "2026-11-23 17:08:34,578 INFO halton_meter.tls.ca leaf_minted host=api.openai.com\n"
    return {"plan": soak.Plan(duration_s=1, streams=10, small=1), "results": (run,),
            "baseline": {"fds": 12, "rss_kib": 80_000}, "end": {"fds": 12, "rss_kib": 81_000, "open_connections": 0},
            "proxy_errors": 0, "health": {"rows_lost": 0}, "serve_log": log, "serve_exit": 0}


def failed_checks(inputs: dict) -> list[str]:
    return [check["name"] for check in soak.judge(**inputs) if not check["pass"]]


def test_judge_passes_a_clean_soak():
    assert failed_checks(passing_inputs()) == []


@pytest.mark.parametrize(("change", "failing"), [
    (lambda i: i["results"][0]["errors"].append(("stream", "IncompleteReadError: 0 bytes read")),
     "every client call succeeded"),
    (lambda i: i["results"][0]["rows"].pop(), "one row per call (soak)"),
    (lambda i: i["results"][0]["rows"][0].update(usage_status="unknown"),
     "exact usage, tokens and a cost on every row (soak)"),
    (lambda i: i.update(proxy_errors=1), "no proxy_error rows"),
    (lambda i: i.update(health={"rows_lost": 2}), "no rows lost (/health)"),
    (lambda i: i["results"][0].update(in_flight_mean=8.9), "streams kept in flight"),
    (lambda i: i["end"].update(open_connections=1), "every connection closed at the end"),
    (lambda i: i["end"].update(fds=12 + soak.FD_SLACK + 1), f"descriptors back to baseline (+{soak.FD_SLACK})"),
    (lambda i: i["end"].update(rss_kib=round(80_000 * (1 + soak.RSS_GROWTH_LIMIT_SHARE)) + 1),
     f"RSS growth at most {soak.RSS_GROWTH_LIMIT_SHARE:.0%} of the baseline"),
    (lambda i: i.update(serve_log="Traceback (most recent call last):\n"), "serve log clean"),
    (lambda i: i.update(serve_log="2026-11-23 17:08:34,539 WARNING halton_meter.intercept client_tls_failed\n"),
     "serve log clean"),
    (lambda i: i.update(serve_exit=1), "serve exited 0"),
])
def test_judge_fails_exactly_the_check_that_saw_the_fault(change, failing):
    inputs = passing_inputs()
    change(inputs)
    assert failed_checks(inputs) == [failing]


def test_trend_per_min_is_the_least_squares_slope():
    rising = [{"t_s": 5.0 * n, "rss_kib": 80_000 + 100 * n + (7 if n % 2 else -7)} for n in range(20)]
    assert soak.trend_per_min(rising, "rss_kib") == pytest.approx(1200, rel=0.01)  # 100 KiB every 5 s
    assert soak.trend_per_min([{"t_s": t, "rss_kib": 5} for t in (0, 5, 10)], "rss_kib") == 0
    assert soak.trend_per_min(rising[:1], "rss_kib") == 0
