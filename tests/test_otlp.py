"""OTLP export: payload shape, and the exporter against a real local OTLP/HTTP receiver and ledger."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

from halton_meter.config import ConfigError
from halton_meter.ledger import CallRow, Ledger, connect
from halton_meter.otlp import (
    MAX_BACKOFF_S, OtlpExporter, OtlpSettings, backoff_delay_s, build_payload, parse_otlp_settings,
    trace_ids,
)

SECRET = "s3cret-token-value"
STATUS_KEYS = {"endpoint", "signal", "state", "shipped_rows", "pending_rows", "rejected_rows",
               "last_success_at", "last_attempt_at", "last_error", "consecutive_failures", "next_attempt_at"}


# ---- a real OTLP/HTTP receiver ---------------------------------------------------------------

@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: dict
    at: float

    @property
    def call_ids(self) -> list[str]:
        return [_attrs(item)["halton.call_id"] for item in _items(self.body)]


Reply = tuple[int, dict[str, str], bytes]


class Receiver:
    """ThreadingHTTPServer on 127.0.0.1:0 recording every POST; `respond(post)` scripts replies."""

    def __init__(self, respond: Callable[[Post], Reply] | None = None) -> None:
        self.posts: list[Post] = []
        self.respond = respond or (lambda post: (200, {}, b"{}"))
        self.release = threading.Event()  # for handlers told to hang
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                post = Post(self.path, dict(self.headers), json.loads(raw), time.monotonic())
                receiver.posts.append(post)
                status, headers, body = receiver.respond(post)
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(respond=None) -> Receiver:
        made.append(Receiver(respond))
        return made[-1]
    yield make
    for item in made:
        item.close()


@pytest.fixture
def exporters():
    made: list[OtlpExporter] = []

    def make(db: Path, endpoint: str, **kwargs) -> OtlpExporter:
        settings = OtlpSettings(endpoint=endpoint, signal=kwargs.pop("signal", "traces"), interval_s=0.05,
                                timeout_s=kwargs.pop("timeout_s", 2.0), headers=kwargs.pop("headers", {}))
        exporter = OtlpExporter(db, settings, version="9.9.9", host_name="test-host",
                                backoff_base_s=kwargs.pop("backoff_base_s", 0.01), **kwargs)
        made.append(exporter)
        exporter.start()
        return exporter
    yield make
    for exporter in made:
        exporter.close(1.0)


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"condition not met in {timeout}s")


def seed(db: Path, count: int, *, first: int = 0, **overrides) -> None:
    ledger = Ledger(db)
    ledger.start()
    for n in range(first, first + count):
        ledger.record(CallRow(
            call_id=overrides.get("call_id", f"call-{n}"), started_at=1_700_000_000.0 + n, host="api.anthropic.com",
            method="POST", path="/v1/messages", status=200, provider=overrides.get("provider", "anthropic"),
            endpoint="messages",
            request_model="claude-sonnet-4-5", model="claude-sonnet-4-5", usage_status="exact",
            input_tokens=10, output_tokens=5, cost_nanousd=1000 + n, duration_ms=120.0, project="alpha"))
    ledger.close()


def exported(db: Path) -> dict[str, float | None]:
    conn = connect(db)
    try:
        return dict(conn.execute("SELECT call_id, exported_at FROM calls ORDER BY id"))
    finally:
        conn.close()


def shipped_call_ids(rec: Receiver) -> list[str]:
    return [call_id for post in rec.posts for call_id in post.call_ids]


def _items(body: dict) -> list[dict]:
    if "resourceSpans" in body:
        return body["resourceSpans"][0]["scopeSpans"][0]["spans"]
    return body["resourceLogs"][0]["scopeLogs"][0]["logRecords"]


def _attrs(item: dict) -> dict[str, object]:
    out = {}
    for attr in item["attributes"]:
        (kind, value), = attr["value"].items()
        out[attr["key"]] = (kind, value) if kind != "stringValue" else value
    return out


# ---- payload ---------------------------------------------------------------------------------

PRICED = {
    "id": 1, "call_id": "c-priced", "started_at": 1_700_000_000.25, "duration_ms": 1500.0, "ttfb_ms": 200.5,
    "host": "api.anthropic.com", "method": "POST", "status": 200, "outcome": "ok", "error_type": None,
    "project": "alpha", "project_source": "header", "provider": "anthropic", "endpoint": "messages",
    "client": "claude-code", "request_id": "req_123", "request_model": "claude-sonnet-4-5",
    "response_model": "claude-sonnet-4-5-20250929", "model": "claude-sonnet-4-5-20250929", "service_tier": None,
    "is_stream": 1, "usage_status": "exact", "input_tokens": 100, "cache_read_tokens": 1000,
    "cache_write_5m_tokens": 50, "cache_write_1h_tokens": 7, "cache_write_30m_tokens": 0,
    "cache_write_12h_tokens": 0, "output_tokens": 300, "reasoning_tokens": 120, "cost_nanousd": 1_234_000,
    "unpriced_reason": None,
}
UNPRICED_ERROR = {
    **PRICED, "id": 2, "call_id": "c-failed", "status": 429, "outcome": "provider_error",
    "error_type": "rate_limit_error", "project": None, "provider": "xai", "endpoint": "completions",
    "request_model": None, "response_model": None, "model": "grok-4", "request_id": None, "is_stream": 0,
    "usage_status": "unknown", "reasoning_tokens": None, "cost_nanousd": None, "unpriced_reason": "no usage",
    "ttfb_ms": None,
}
SETTINGS = OtlpSettings(endpoint="http://collector:4318", service_name="meter-test")


def test_trace_payload_shape_and_types():
    body = build_payload([PRICED, UNPRICED_ERROR], SETTINGS, host_name="box", version="1.2.3")
    assert list(body) == ["resourceSpans"]
    resource_spans = body["resourceSpans"]
    assert len(resource_spans) == 1
    assert resource_spans[0]["resource"]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "meter-test"}},
        {"key": "service.version", "value": {"stringValue": "1.2.3"}},
        {"key": "host.name", "value": {"stringValue": "box"}},
    ]
    scope_spans = resource_spans[0]["scopeSpans"]
    assert len(scope_spans) == 1 and scope_spans[0]["scope"] == {"name": "halton-meter", "version": "1.2.3"}
    ok, failed = scope_spans[0]["spans"]

    assert len(ok["traceId"]) == 32 and int(ok["traceId"], 16) and len(ok["spanId"]) == 16 and int(ok["spanId"], 16)
    assert (ok["traceId"], ok["spanId"]) == trace_ids("c-priced") != trace_ids("c-failed")
    assert ok["name"] == "chat claude-sonnet-4-5" and ok["kind"] == 3
    assert ok["startTimeUnixNano"] == "1700000000250000000"
    assert ok["endTimeUnixNano"] == "1700000001750000000"
    assert "status" not in ok  # UNSET on success

    attrs = _attrs(ok)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "anthropic" and attrs["gen_ai.system"] == "anthropic"
    assert attrs["gen_ai.request.model"] == "claude-sonnet-4-5"
    assert attrs["gen_ai.response.model"] == "claude-sonnet-4-5-20250929"
    assert attrs["gen_ai.response.id"] == "req_123"
    # semconv input_tokens includes cached reads and cache writes; the ledger's is uncached only
    assert attrs["gen_ai.usage.input_tokens"] == ("intValue", "1157")
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == ("intValue", "1000")
    assert attrs["gen_ai.usage.cache_creation.input_tokens"] == ("intValue", "57")
    assert attrs["gen_ai.usage.output_tokens"] == ("intValue", "300")
    assert attrs["gen_ai.usage.reasoning.output_tokens"] == ("intValue", "120")
    assert attrs["halton.uncached_input_tokens"] == ("intValue", "100")
    assert attrs["halton.cache_write_5m_tokens"] == ("intValue", "50")
    assert "halton.cache_write_30m_tokens" not in attrs
    assert attrs["http.request.method"] == "POST" and attrs["server.address"] == "api.anthropic.com"
    assert attrs["http.response.status_code"] == ("intValue", "200")
    assert attrs["halton.is_stream"] == ("boolValue", True) and attrs["gen_ai.request.stream"] == ("boolValue", True)
    assert attrs["halton.priced"] == ("boolValue", True)
    assert attrs["halton.cost_usd"] == ("doubleValue", 0.001234)
    assert attrs["halton.cost_nanousd"] == ("intValue", "1234000")
    assert attrs["halton.ttfb_ms"] == ("doubleValue", 200.5)
    assert attrs["halton.duration_ms"] == ("doubleValue", 1500.0)
    assert attrs["halton.project"] == "alpha" and attrs["halton.project_source"] == "header"
    assert attrs["halton.call_id"] == "c-priced" and attrs["halton.client"] == "claude-code"
    assert attrs["halton.endpoint"] == "messages" and attrs["halton.outcome"] == "ok"
    assert "error.type" not in attrs and "halton.unpriced_reason" not in attrs and "halton.service_tier" not in attrs

    assert failed["status"] == {"code": 2, "message": "rate_limit_error"}
    assert failed["name"] == "text_completion grok-4"
    attrs = _attrs(failed)
    assert attrs["gen_ai.provider.name"] == "x_ai" and attrs["gen_ai.system"] == "xai"
    assert attrs["error.type"] == "rate_limit_error" and attrs["halton.project"] == "default"
    assert attrs["halton.priced"] == ("boolValue", False) and attrs["halton.unpriced_reason"] == "no usage"
    assert attrs["halton.is_stream"] == ("boolValue", False)
    for absent in ("halton.cost_usd", "halton.cost_nanousd", "gen_ai.request.model", "gen_ai.response.id",
                   "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "halton.ttfb_ms"):
        assert absent not in attrs  # NULL, or usage unknown (not zero)
    json.dumps(body, allow_nan=False)


def test_log_payload_shape():
    settings = OtlpSettings(endpoint="http://collector:4318", signal="logs")
    body = build_payload([PRICED, UNPRICED_ERROR], settings, host_name="box", version="1.2.3",
                         observed_at=1_800_000_000.5)
    assert list(body) == ["resourceLogs"]
    scope_logs = body["resourceLogs"][0]["scopeLogs"]
    assert scope_logs[0]["scope"] == {"name": "halton-meter", "version": "1.2.3"}
    ok, failed = scope_logs[0]["logRecords"]
    assert ok["timeUnixNano"] == "1700000000250000000" and ok["observedTimeUnixNano"] == "1800000000500000000"
    assert (ok["severityNumber"], ok["severityText"]) == (9, "INFO")
    assert (failed["severityNumber"], failed["severityText"]) == (17, "ERROR")
    assert ok["body"] == {"stringValue": "chat claude-sonnet-4-5 project=alpha cost_usd=0.001234"}
    assert failed["body"] == {"stringValue": "text_completion grok-4 project=default cost_usd=unpriced"}
    assert ok["eventName"] == "halton_meter.call"
    assert (ok["traceId"], ok["spanId"]) == trace_ids("c-priced")
    assert _attrs(ok)["halton.cost_nanousd"] == ("intValue", "1234000")


@pytest.mark.parametrize("endpoint, operation", [
    ("messages", "chat"), ("chat", "chat"), ("responses", "chat"), ("converse", "chat"),
    ("generate_content", "generate_content"), ("embeddings", "embeddings"), ("embed_content", "embeddings"),
    ("fim", "text_completion"), ("count_tokens", "count_tokens"), (None, "unknown"),
])
def test_operation_names(endpoint, operation):
    row = {**PRICED, "endpoint": endpoint, "request_model": None, "model": None}
    span = build_payload([row], SETTINGS, host_name="h", version="v")["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["name"] == operation and _attrs(span)["gen_ai.operation.name"] == operation


def test_backoff_delays_double_from_the_base_and_cap_at_an_hour():
    assert [backoff_delay_s(n, base_s=1.0) for n in range(1, 6)] == [1, 2, 4, 8, 16]
    assert backoff_delay_s(12, base_s=1.0) == 2048 and backoff_delay_s(13, base_s=1.0) == MAX_BACKOFF_S == 3600
    assert backoff_delay_s(500, base_s=1.0) == 3600
    assert backoff_delay_s(3, base_s=0.5, retry_after_s=7.0) == 7.0  # Retry-After wins
    assert backoff_delay_s(1, retry_after_s=99999.0) == 3600 and backoff_delay_s(1, retry_after_s=0.0) == 0


# ---- settings --------------------------------------------------------------------------------

def test_parse_settings_absent_or_without_endpoint_is_off():
    assert parse_otlp_settings(None) is None
    assert parse_otlp_settings({}) is None
    assert parse_otlp_settings({"endpoint": ""}) is None


def test_parse_settings_full():
    settings = parse_otlp_settings({
        "endpoint": "https://otlp.example.com/otlp/", "signal": "logs",
        "headers": {"Authorization": f"Bearer {SECRET}"}, "timeout_s": 3, "interval_s": 0.5,
        "service_name": "team-meter"})
    assert settings == OtlpSettings(endpoint="https://otlp.example.com/otlp", signal="logs",
                                    headers={"Authorization": f"Bearer {SECRET}"}, timeout_s=3.0, interval_s=0.5,
                                    service_name="team-meter")
    assert settings.url == "https://otlp.example.com/otlp/v1/logs"
    assert SECRET not in repr(settings)
    assert parse_otlp_settings({"endpoint": "http://127.0.0.1:4318"}).url == "http://127.0.0.1:4318/v1/traces"


@pytest.mark.parametrize("table, words", [
    ("http://x", "must be a table"),
    ({"endpoint": "ftp://collector:4318"}, "not an http(s) URL"),
    ({"endpoint": "collector:4318"}, "not an http(s) URL"),
    ({"endpoint": 4318}, "must be a string"),
    ({"endpoint": "http://collector:99999"}, "not a valid URL"),
    ({"endpoint": "https://user:pw@collector"}, "must not carry credentials"),
    ({"endpoint": "http://collector:4318?x=1"}, "query"),
    ({"endpoint": "http://collector:4318/v1/traces"}, "already ends with a signal path"),
    ({"endpoint": "http://c:4318", "signal": "metrics"}, "signal = 'metrics' is not supported"),
    ({"endpoint": "http://c:4318", "headers": "Bearer x"}, "headers must be a table"),
    ({"endpoint": "http://c:4318", "headers": {"Authorization": 5}}, "headers must be a table"),
    ({"endpoint": "http://c:4318", "headers": {"X-A": "a\r\nInjected: 1"}}, "headers must be a table"),
    ({"endpoint": "http://c:4318", "headers": {"Bad Name": "v"}}, "headers must be a table"),
    ({"endpoint": "http://c:4318", "headers": {"content-type": "text/plain"}}, "may not set Content-Type"),
    ({"endpoint": "http://c:4318", "timeout_s": 0}, "timeout_s = 0 must be a positive"),
    ({"endpoint": "http://c:4318", "timeout_s": -1.5}, "timeout_s = -1.5 must be a positive"),
    ({"endpoint": "http://c:4318", "interval_s": "5"}, "interval_s = '5' must be a positive"),
    ({"endpoint": "http://c:4318", "interval_s": True}, "interval_s = True must be a positive"),
    ({"endpoint": "http://c:4318", "service_name": ""}, "service_name must be a non-empty string"),
    ({"endpont": "http://c:4318"}, "unknown key(s) endpont"),
])
def test_parse_settings_errors(table, words):
    with pytest.raises(ConfigError) as caught:
        parse_otlp_settings(table, where="/home/me/.halton-meter/config.toml")
    message = str(caught.value)
    assert words in message and message.startswith("/home/me/.halton-meter/config.toml: ")
    assert message.count(". ") >= 1  # what is wrong, then how to fix it


# ---- the exporter against a real receiver ----------------------------------------------------

def test_ships_everything_in_batches_of_500_in_id_order(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 1234)
    rec = receiver()
    exporter = exporters(db, rec.endpoint)
    wait_for(lambda: exporter.status()["shipped_rows"] == 1234 and exporter.status()["state"] == "idle")
    assert [len(post.call_ids) for post in rec.posts] == [500, 500, 234]
    assert shipped_call_ids(rec) == [f"call-{n}" for n in range(1234)]
    assert {post.path for post in rec.posts} == {"/v1/traces"}
    assert rec.posts[0].headers["Content-Type"] == "application/json"
    assert all(at is not None and at > 0 for at in exported(db).values())
    status = exporter.status()
    assert set(status) == STATUS_KEYS
    assert status["pending_rows"] == 0 and status["rejected_rows"] == 0 and status["last_error"] is None
    assert status["endpoint"] == rec.endpoint and status["signal"] == "traces"
    json.dumps(status)
    conn = connect(db)
    state = json.loads(conn.execute("SELECT state_json FROM export_state WHERE name = 'otlp'").fetchone()[0])
    assert state["mark"] == conn.execute("SELECT MAX(id) FROM calls").fetchone()[0]
    assert state["shipped_rows"] == 1234 and state["endpoint"] == rec.endpoint
    conn.close()


def test_retryable_503_honours_retry_after_then_ships_once(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 3)
    replies = iter([(503, {"Retry-After": "0"}, b'{"message":"overloaded"}')] * 2)
    rec = receiver(lambda post: next(replies, (200, {}, b"{}")))
    # A 60 s backoff base: only Retry-After: 0 lets this finish in time.
    exporter = exporters(db, rec.endpoint, backoff_base_s=60.0)
    wait_for(lambda: exporter.status()["shipped_rows"] == 3)
    assert len(rec.posts) == 3 and all(post.call_ids == ["call-0", "call-1", "call-2"] for post in rec.posts)
    assert rec.posts[0].body == rec.posts[2].body  # the same spans re-sent, ids and all
    status = exporter.status()
    assert status["consecutive_failures"] == 0 and status["last_error"] is None and status["last_success_at"]
    time.sleep(0.15)
    assert len(rec.posts) == 3  # nothing is sent again once accepted


def test_backoff_doubles_between_attempts(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 2)
    replies = iter([(503, {}, b"")] * 3)
    rec = receiver(lambda post: next(replies, (200, {}, b"{}")))
    exporter = exporters(db, rec.endpoint, backoff_base_s=0.08)
    wait_for(lambda: exporter.status()["shipped_rows"] == 2)
    gaps = [later.at - earlier.at for earlier, later in zip(rec.posts, rec.posts[1:])]
    assert len(gaps) == 3
    for gap, expected in zip(gaps, (0.08, 0.16, 0.32)):
        assert expected <= gap < expected * 1.1 + 0.1


def test_a_refused_row_is_found_by_halving_and_marked_rejected(tmp_path, receiver, exporters, caplog):
    caplog.set_level(logging.INFO, logger="halton_meter.otlp")
    db = tmp_path / "db.sqlite"
    seed(db, 40)
    rec = receiver(lambda post: (400, {}, b'{"message":"bad span"}') if "call-13" in post.call_ids
                   else (200, {}, b"{}"))
    exporter = exporters(db, rec.endpoint)
    wait_for(lambda: exporter.status()["rejected_rows"] == 1 and exporter.status()["state"] == "idle")
    marks = exported(db)
    assert marks.pop("call-13") == -1
    assert all(at > 0 for at in marks.values())
    status = exporter.status()
    assert status["shipped_rows"] == 39 and status["pending_rows"] == 0
    accepted = [cid for post in rec.posts if "call-13" not in post.call_ids for cid in post.call_ids]
    assert accepted == [f"call-{n}" for n in range(40) if n != 13]  # each good row once, in id order
    assert len(rec.posts) <= 2 * 6 + 1  # halving: about two POSTs per level, not one per row
    rejected_logs = [r for r in caplog.records if "otlp_row_rejected" in r.getMessage()]
    assert len(rejected_logs) == 1 and rejected_logs[0].levelno == logging.ERROR
    assert "call_id=call-13" in rejected_logs[0].getMessage() and "status=400" in rejected_logs[0].getMessage()


def test_a_collector_refusing_every_row_rejects_none(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 4)
    rec = receiver(lambda post: (400, {}, b'{"message":"cannot decode JSON"}'))
    exporter = exporters(db, rec.endpoint, backoff_base_s=30.0)
    wait_for(lambda: exporter.status()["state"] == "failing")
    status = exporter.status()
    assert "HTTP 400" in status["last_error"] and "cannot decode JSON" in status["last_error"]
    assert status["rejected_rows"] == 0 and status["pending_rows"] == 4
    assert set(exported(db).values()) == {None}


def test_partial_success_counts_rejected_and_ships_the_batch(tmp_path, receiver, exporters, caplog):
    caplog.set_level(logging.INFO, logger="halton_meter.otlp")
    db = tmp_path / "db.sqlite"
    seed(db, 5)
    reply = {"partialSuccess": {"rejectedSpans": "2", "errorMessage": "span attribute too long"}}
    rec = receiver(lambda post: (200, {}, json.dumps(reply).encode()))
    exporter = exporters(db, rec.endpoint)
    wait_for(lambda: exporter.status()["shipped_rows"] == 5)
    assert exporter.status()["rejected_rows"] == 2
    assert len(rec.posts) == 1 and all(at > 0 for at in exported(db).values())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "otlp_partial_success" in r.getMessage()]
    assert len(warnings) == 1 and "span attribute too long" in warnings[0].getMessage()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_collector_backs_off_keeps_rows_and_closes_promptly(tmp_path, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 3)
    exporter = exporters(db, f"http://127.0.0.1:{_closed_port()}", backoff_base_s=30.0)
    wait_for(lambda: exporter.status()["consecutive_failures"] >= 1)
    status = exporter.status()
    assert status["state"] == "backing_off" and "cannot reach" in status["last_error"]
    assert status["next_attempt_at"] >= status["last_attempt_at"] + 29 and status["pending_rows"] == 3
    assert set(exported(db).values()) == {None}
    started = time.monotonic()
    exporter.close()
    assert time.monotonic() - started < 0.5 and not exporter._thread.is_alive()


def test_close_does_not_wait_for_a_hanging_collector(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 1)
    rec = receiver(lambda post: (rec.release.wait(10), (200, {}, b"{}"))[1])
    exporter = exporters(db, rec.endpoint, timeout_s=30.0)
    wait_for(lambda: rec.posts)
    started = time.monotonic()
    exporter.close(timeout=0.3)
    assert time.monotonic() - started < 0.6
    rec.release.set()


def test_restart_resumes_from_the_mark_without_resending(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 10)
    rec = receiver()
    first = exporters(db, rec.endpoint)
    wait_for(lambda: first.status()["shipped_rows"] == 10)
    first.close()
    seed(db, 5, first=10)
    second = exporters(db, rec.endpoint)
    wait_for(lambda: second.status()["shipped_rows"] == 15)  # the total is persisted
    assert shipped_call_ids(rec) == [f"call-{n}" for n in range(15)]  # each exactly once


def test_a_new_endpoint_does_not_get_rows_the_old_one_accepted(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 3)
    old, new = receiver(), receiver()
    first = exporters(db, old.endpoint)
    wait_for(lambda: first.status()["shipped_rows"] == 3)
    first.close()
    seed(db, 2, first=3)
    second = exporters(db, new.endpoint)
    wait_for(lambda: second.status()["shipped_rows"] == 5)
    assert shipped_call_ids(new) == ["call-3", "call-4"]


def test_rows_recorded_while_running_are_shipped(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 2)
    rec = receiver()
    exporter = exporters(db, rec.endpoint)
    wait_for(lambda: exporter.status()["shipped_rows"] == 2)
    ledger = Ledger(db)
    ledger.start()
    for n in range(2, 30):
        ledger.record(CallRow(call_id=f"call-{n}", started_at=1_700_000_000.0 + n, host="api.openai.com",
                              method="POST", path="/v1/chat/completions", endpoint="chat", provider="openai"))
        if n % 7 == 0:
            exporter.wake()
    ledger.close()
    exporter.wake()
    wait_for(lambda: exporter.status()["shipped_rows"] == 30)
    assert shipped_call_ids(rec) == [f"call-{n}" for n in range(30)]


def test_a_row_reusing_a_deleted_id_is_still_shipped(tmp_path, receiver, exporters):
    # The selftest deletes its own row; without AUTOINCREMENT the next row takes the same id.
    db = tmp_path / "db.sqlite"
    seed(db, 3)
    rec = receiver()
    first = exporters(db, rec.endpoint)
    wait_for(lambda: first.status()["shipped_rows"] == 3)
    first.close()
    conn = connect(db)
    top = conn.execute("SELECT MAX(id) FROM calls").fetchone()[0]
    conn.execute("DELETE FROM calls WHERE id = ?", (top,))
    conn.close()
    seed(db, 1, first=3)
    conn = connect(db)
    assert conn.execute("SELECT id FROM calls WHERE call_id = 'call-3'").fetchone()[0] == top
    conn.close()
    exporters(db, rec.endpoint)
    wait_for(lambda: "call-3" in shipped_call_ids(rec))


def test_logs_signal_posts_log_records(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 3)
    rec = receiver()
    exporter = exporters(db, rec.endpoint, signal="logs")
    wait_for(lambda: exporter.status()["shipped_rows"] == 3)
    (post,) = rec.posts
    assert post.path == "/v1/logs" and list(post.body) == ["resourceLogs"]
    assert [record["eventName"] for record in _items(post.body)] == ["halton_meter.call"] * 3
    assert _items(post.body)[0]["body"]["stringValue"] == "chat claude-sonnet-4-5 project=alpha cost_usd=0.000001"


def test_headers_arrive_and_their_values_are_never_logged(tmp_path, receiver, exporters, caplog):
    caplog.set_level(logging.DEBUG, logger="halton_meter.otlp")
    db = tmp_path / "db.sqlite"
    seed(db, 2)
    replies = iter([(401, {}, json.dumps({"message": f"bad token Bearer {SECRET}"}).encode())])
    rec = receiver(lambda post: next(replies, (200, {}, b"{}")))
    headers = {"Authorization": f"Bearer {SECRET}", "X-Team": "platform"}
    exporter = exporters(db, rec.endpoint, headers=headers, backoff_base_s=0.05)
    wait_for(lambda: exporter.status()["consecutive_failures"] == 1)
    failing = exporter.status()
    assert failing["state"] == "failing" and "HTTP 401" in failing["last_error"]
    assert "bad token" in failing["last_error"] and SECRET not in failing["last_error"]
    assert set(exported(db).values()) == {None}  # kept for when the key is fixed
    wait_for(lambda: exporter.status()["shipped_rows"] == 2)
    assert rec.posts[-1].headers["Authorization"] == f"Bearer {SECRET}"
    assert rec.posts[-1].headers["X-Team"] == "platform"
    assert rec.posts[-1].headers["User-Agent"] == "halton-meter/9.9.9"
    assert caplog.records and SECRET not in caplog.text
    assert SECRET not in json.dumps(exporter.status())


def test_proxy_environment_is_ignored(tmp_path, receiver, exporters, monkeypatch):
    # The daemon's environment may point at halton-meter itself; the exporter must go direct.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    db = tmp_path / "db.sqlite"
    seed(db, 1)
    rec = receiver()
    exporter = exporters(db, rec.endpoint)
    wait_for(lambda: exporter.status()["shipped_rows"] == 1)


# ---- the daemon ships its own calls; status shows the exporter -------------------------------

def test_self_test_rows_are_marked_but_never_sent(tmp_path, receiver, exporters):
    db = tmp_path / "db.sqlite"
    seed(db, 2)
    seed(db, 1, first=2, provider="selftest")
    seed(db, 1, first=3)
    rec = receiver()
    exporters(db, rec.endpoint)
    wait_for(lambda: all(at is not None for at in exported(db).values()))
    assert shipped_call_ids(rec) == ["call-0", "call-1", "call-3"]


def test_serve_ships_real_calls_and_reports_export_health(tmp_path, fake, receiver):
    from halton_meter.api import get_json
    from halton_meter.config import load_settings
    from halton_meter.lifecycle.status import OFF, OK, WARN, _export_row
    from tests.conftest import messages_body, start_serve, stop_serve

    collector = receiver()
    (tmp_path / "config.toml").write_text(
        f'[export.otlp]\nendpoint = "{collector.endpoint}"\ninterval_s = 0.2\n'
        f'headers = {{ Authorization = "Bearer {SECRET}" }}\n')
    proxy = start_serve(tmp_path, "--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}",
                        "--upstream-ca", str(fake.ca_path))
    try:
        assert f"OTLP export     {collector.endpoint}/v1/traces" in proxy.banner
        for stream in (False, True):
            conn = proxy.connection()
            conn.request("POST", "/v1/messages", body=messages_body(stream=stream),
                         headers={"content-type": "application/json", "x-halton-project": "team-a"})
            response = conn.getresponse()
            assert response.status == 200 and response.read()  # the whole stream, so the call is complete
            conn.close()
        wait_for(lambda: sum(len(p.call_ids) for p in collector.posts) >= 2, timeout=20)
        spans = [span for post in collector.posts for span in _items(post.body)]
        attrs = [_attrs(span) for span in spans]
        assert {a["halton.project"] for a in attrs} == {"team-a"}
        assert {a["gen_ai.request.model"] for a in attrs} == {"claude-sonnet-4-5"}
        assert {a["halton.outcome"] for a in attrs} == {"ok"}
        assert ("intValue", "9") in [a["gen_ai.usage.output_tokens"] for a in attrs]  # the fake's usage
        assert all(a["halton.cost_usd"][0] == "doubleValue" for a in attrs)
        assert collector.posts[0].headers["Authorization"] == f"Bearer {SECRET}"
        port = int((tmp_path / "run" / "api.port").read_text())
        health = wait_for(lambda: (h := get_json(port, "/health", timeout=5)[1])["export"]["shipped_rows"] >= 2
                          and h["export"]["pending_rows"] == 0 and h, timeout=20)
        assert health["export"]["state"] in ("idle", "shipping")
        settings = load_settings(tmp_path)
        row = _export_row(settings, health)
        assert row.state == OK and "2 row(s) shipped" in row.detail
        failing = dict(health, export=dict(health["export"], state="backing_off", last_error="connection refused",
                                           next_attempt_at=time.time() + 30, pending_rows=5))
        row = _export_row(settings, failing)
        assert row.state == WARN and "connection refused" in row.detail and "5 row(s) waiting" in row.detail
        assert SECRET not in proxy.log
    finally:
        assert stop_serve(proxy) == 0
    (tmp_path / "config.toml").write_text("")
    assert _export_row(load_settings(tmp_path), None).state == OFF
