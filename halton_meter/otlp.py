"""Opt-in export of ledger rows to an OpenTelemetry collector over OTLP/HTTP JSON.

One span (or log record) per call, shipped at least once, oldest first, by one daemon thread.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import math
import random
import socket
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from halton_meter.adapters.selftest import PROVIDER as SELFTEST_PROVIDER
from halton_meter.ledger import connect

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 500
MAX_BACKOFF_S = 3600.0
SIGNALS = {"traces": "/v1/traces", "logs": "/v1/logs"}
REJECTED = -1.0  # exported_at of a row the collector refused on its own (HTTP 400/413/422)
_STATE_NAME = "otlp"  # its export_state row
# Without AUTOINCREMENT SQLite gives a new row max(id) + 1, so deleting the newest rows (the
# selftest deletes its own) lets their ids come back below the mark: rescan this far under it.
_REUSED_ID_SLACK = 1000
_PENDING_RECOUNT_S = 60.0
_MAX_REPLY_BYTES = 64 << 10
# OTLP spec, "Retryable Response Codes"; every other 4xx/5xx must not be retried as is.
_RETRYABLE = frozenset({429, 502, 503, 504})
# "Bad Data" (400) and "Content Too Large" (413) are about the payload: halve it to find the row.
_PAYLOAD_REJECTED = frozenset({400, 413, 422})
_KEYS = ("endpoint", "signal", "headers", "timeout_s", "interval_s", "service_name")
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True, slots=True)
class OtlpSettings:
    endpoint: str  # base URL, e.g. http://127.0.0.1:4318; the signal path is appended
    signal: str = "traces"  # traces: a span per call; logs: a log record per call
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may hold an API key
    timeout_s: float = 10.0
    interval_s: float = 5.0  # how often to look for new rows when idle
    service_name: str = "halton-meter"

    @property
    def url(self) -> str:
        return self.endpoint + SIGNALS[self.signal]


def parse_otlp_settings(table: object, *, where: str = "config.toml") -> OtlpSettings | None:
    """`[export.otlp]` as tomllib read it; None (export off) when absent or without an endpoint."""
    from halton_meter.config import ConfigError  # here: config.py imports this module

    def fail(problem: str, fix: str) -> NoReturn:
        raise ConfigError(f"{where}: [export.otlp] {problem}. {fix}.")

    if table is None:
        return None
    if not isinstance(table, dict):
        fail("must be a table", 'Write it as a table with endpoint = "http://host:4318"')
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        fail(f"has unknown key(s) {', '.join(unknown)}", f"Use only {', '.join(_KEYS)}")
    if table.get("endpoint") in (None, ""):
        return None
    endpoint = _base_url(table["endpoint"], fail)
    signal = table.get("signal", "traces")
    if signal not in SIGNALS:
        fail(f"signal = {signal!r} is not supported", 'Use "traces" or "logs"')
    headers = table.get("headers", {})
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and set(k) <= _TOKEN_CHARS
            and v.isascii() and v.isprintable() for k, v in headers.items()):
        fail("headers must be a table of header names to printable ASCII strings",
             'Write it like headers = { Authorization = "Bearer …" }')
    if any(name.lower() in ("content-type", "content-length", "host") for name in headers):
        fail("headers may not set Content-Type, Content-Length or Host", "Remove it: halton-meter sets them")
    seconds, defaults = {}, OtlpSettings(endpoint)
    for key in ("timeout_s", "interval_s"):
        value = table.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            fail(f"{key} = {value!r} must be a positive number of seconds", f"Write it like {key} = 5")
        seconds[key] = float(value)
    service_name = table.get("service_name", "halton-meter")
    if not isinstance(service_name, str) or not service_name.strip():
        fail("service_name must be a non-empty string", 'Remove it to use "halton-meter"')
    return OtlpSettings(endpoint=endpoint, signal=signal, headers=dict(headers), service_name=service_name,
                        **seconds)


def _base_url(endpoint: object, fail) -> str:
    fix = 'Set it to the collector\'s base URL, like endpoint = "http://127.0.0.1:4318"'
    if not isinstance(endpoint, str):
        fail("endpoint must be a string", fix)
    try:
        parts = urllib.parse.urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        fail(f"endpoint {endpoint!r} is not a valid URL", fix)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"endpoint {endpoint!r} is not an http(s) URL", fix)
    if parts.username is not None or parts.password is not None:
        fail("endpoint must not carry credentials (it is logged)", "Put them in [export.otlp] headers")
    if parts.query or parts.fragment:
        fail("endpoint must not have a query or fragment", fix)
    base = endpoint.rstrip("/")
    if base.endswith(tuple(SIGNALS.values())):
        fail(f"endpoint {endpoint!r} already ends with a signal path", "Give the base URL: /v1/traces or "
             "/v1/logs is appended")
    return base


# ---- payload: OTLP spec "JSON Protobuf Encoding" (hex ids, integer enums, int64 as strings) -----

SPAN_KIND_CLIENT = 3
STATUS_CODE_ERROR = 2
SEVERITY_INFO, SEVERITY_ERROR = 9, 17
# `gen_ai.operation.name` well-known values; other endpoints keep their own name (a custom value).
_OPERATIONS = {
    "chat": "chat", "messages": "chat", "responses": "chat", "compact": "chat", "converse": "chat",
    "invoke": "chat", "completions": "text_completion", "complete": "text_completion", "fim": "text_completion",
    "generate_content": "generate_content", "embeddings": "embeddings", "embed_content": "embeddings",
    "batch_embed_contents": "embeddings",
}
# `gen_ai.provider.name` well-known values (semantic-conventions-genai, registry/attributes/gen-ai.md);
# `gen_ai.system`, which it replaced after v1.36.0, spelled xAI "xai".
_PROVIDER_NAMES = {
    "anthropic": "anthropic", "openai": "openai", "codex": "openai", "gemini": "gcp.gemini",
    "vertex": "gcp.vertex_ai", "code_assist": "gcp.gen_ai", "bedrock": "aws.bedrock", "xai": "x_ai",
    "grok_cli": "x_ai", "groq": "groq", "deepseek": "deepseek", "mistral": "mistral_ai",
}
_SYSTEMS = {**_PROVIDER_NAMES, "xai": "xai", "grok_cli": "xai"}
_CACHE_WRITES = ("cache_write_5m_tokens", "cache_write_1h_tokens", "cache_write_30m_tokens",
                 "cache_write_12h_tokens")


def build_payload(rows: list[dict], settings: OtlpSettings, *, host_name: str, version: str,
                  observed_at: float | None = None) -> dict:
    """The ExportTraceServiceRequest or ExportLogsServiceRequest body for `rows` (calls columns)."""
    resource = {"attributes": _attributes([
        ("service.name", settings.service_name), ("service.version", version), ("host.name", host_name)])}
    scope = {"name": "halton-meter", "version": version}
    if settings.signal == "logs":
        observed = _nanos(time.time() if observed_at is None else observed_at)
        records = [_log_record(row, observed) for row in rows]
        return {"resourceLogs": [{"resource": resource, "scopeLogs": [{"scope": scope, "logRecords": records}]}]}
    spans = [_span(row) for row in rows]
    return {"resourceSpans": [{"resource": resource, "scopeSpans": [{"scope": scope, "spans": spans}]}]}


def trace_ids(call_id: str) -> tuple[str, str]:
    """(traceId, spanId) from the call id: a row sent twice is the same span, so it can be deduped."""
    digest = hashlib.sha256(f"halton-meter:{call_id}".encode()).digest()
    trace_id, span_id = digest[:16], digest[16:24]
    # All-zero ids are invalid (W3C Trace Context): never send one, however unlikely.
    return (trace_id if any(trace_id) else b"\1" * 16).hex(), (span_id if any(span_id) else b"\1" * 8).hex()


def operation_name(endpoint: str | None) -> str:
    return _OPERATIONS.get(endpoint or "", endpoint or "unknown")


def _span(row: dict) -> dict:
    trace_id, span_id = trace_ids(row["call_id"])
    start = float(row["started_at"])
    span = {
        "traceId": trace_id, "spanId": span_id, "name": _title(row), "kind": SPAN_KIND_CLIENT,
        "startTimeUnixNano": _nanos(start), "endTimeUnixNano": _nanos(start + (row.get("duration_ms") or 0) / 1000),
        "attributes": call_attributes(row),
    }
    if row.get("outcome") != "ok":
        # Success stays UNSET: semconv "Recording errors" keeps OK for an explicit decision.
        span["status"] = {"code": STATUS_CODE_ERROR, "message": _error_type(row)}
    return span


def _log_record(row: dict, observed: str) -> dict:
    trace_id, span_id = trace_ids(row["call_id"])
    cost = row.get("cost_nanousd")
    failed = row.get("outcome") != "ok"
    return {
        "timeUnixNano": _nanos(float(row["started_at"])), "observedTimeUnixNano": observed,
        "severityNumber": SEVERITY_ERROR if failed else SEVERITY_INFO, "severityText": "ERROR" if failed else "INFO",
        "body": {"stringValue": f"{_title(row)} project={row.get('project') or 'default'} cost_usd="
                                + ("unpriced" if cost is None else f"{cost / 1e9:.6f}")},
        "eventName": "halton_meter.call", "attributes": call_attributes(row), "traceId": trace_id, "spanId": span_id,
    }


def call_attributes(row: dict) -> list[dict]:
    """GenAI semconv, HTTP and halton.* attributes of one call; NULL columns are left out."""
    provider, cost = row.get("provider"), row.get("cost_nanousd")
    stream = None if row.get("is_stream") is None else bool(row["is_stream"])
    pairs: list[tuple[str, object]] = [
        ("gen_ai.operation.name", operation_name(row.get("endpoint"))),
        ("gen_ai.provider.name", _PROVIDER_NAMES.get(provider, provider)),
        ("gen_ai.system", _SYSTEMS.get(provider, provider)),
        ("gen_ai.request.model", row.get("request_model")),
        ("gen_ai.response.model", row.get("response_model")),
        ("gen_ai.response.id", row.get("request_id")),
        ("gen_ai.request.stream", stream),
    ]
    if row.get("usage_status") != "unknown":  # unknown usage is not zero usage: say nothing
        uncached, cache_read = int(row.get("input_tokens") or 0), int(row.get("cache_read_tokens") or 0)
        cache_write = sum(int(row.get(name) or 0) for name in _CACHE_WRITES)
        pairs += [
            # The ledger's input_tokens is uncached input only, but semconv's "SHOULD include all
            # types of input tokens, including cached tokens", and cache reads and writes "SHOULD be
            # included in" it (semantic-conventions-genai, registry gen-ai.md notes [25], [26], [28]).
            ("gen_ai.usage.input_tokens", uncached + cache_read + cache_write),
            ("gen_ai.usage.output_tokens", int(row.get("output_tokens") or 0)),  # reasoning included
            ("gen_ai.usage.cache_read.input_tokens", cache_read),
            ("gen_ai.usage.cache_creation.input_tokens", cache_write),
            ("gen_ai.usage.reasoning.output_tokens", row.get("reasoning_tokens")),
            ("halton.uncached_input_tokens", uncached),
            *((f"halton.{name}", row.get(name) or None) for name in _CACHE_WRITES),  # the TTLs, when used
        ]
    failed = row.get("outcome") != "ok"
    pairs += [
        ("error.type", _error_type(row) if failed else None),
        ("http.request.method", row.get("method")),
        ("http.response.status_code", row.get("status")),
        ("server.address", row.get("host")),
        ("halton.call_id", row.get("call_id")),
        ("halton.project", row.get("project") or "default"),
        ("halton.project_source", row.get("project_source")),
        ("halton.provider", provider),
        ("halton.client", row.get("client")),
        ("halton.endpoint", row.get("endpoint")),
        ("halton.model", row.get("model")),
        ("halton.outcome", row.get("outcome")),
        ("halton.usage_status", row.get("usage_status")),
        ("halton.service_tier", row.get("service_tier")),
        ("halton.is_stream", stream),
        ("halton.priced", cost is not None),
        ("halton.cost_usd", None if cost is None else cost / 1e9),
        ("halton.cost_nanousd", cost),
        ("halton.unpriced_reason", row.get("unpriced_reason") if cost is None else None),
        ("halton.ttfb_ms", None if row.get("ttfb_ms") is None else float(row["ttfb_ms"])),
        ("halton.duration_ms", None if row.get("duration_ms") is None else float(row["duration_ms"])),
    ]
    return _attributes(pairs)


def _attributes(pairs: list[tuple[str, object]]) -> list[dict]:
    out = []
    for key, value in pairs:
        if isinstance(value, bool):  # before int: a bool is an int
            out.append({"key": key, "value": {"boolValue": value}})
        elif isinstance(value, int):
            out.append({"key": key, "value": {"intValue": str(value)}})
        elif isinstance(value, float) and math.isfinite(value):
            out.append({"key": key, "value": {"doubleValue": value}})
        elif isinstance(value, str):
            out.append({"key": key, "value": {"stringValue": value}})
    return out


def _title(row: dict) -> str:
    # GenAI semconv span name: "{gen_ai.operation.name} {gen_ai.request.model}".
    model = row.get("request_model") or row.get("model")
    operation = operation_name(row.get("endpoint"))
    return f"{operation} {model}" if model else operation


def _error_type(row: dict) -> str:
    return row.get("error_type") or row.get("outcome") or "error"


def _nanos(seconds: float) -> str:
    return str(round(seconds * 1_000_000) * 1000)  # a float of today's time holds microseconds, no more


def backoff_delay_s(failures: int, *, base_s: float = 1.0, retry_after_s: float | None = None) -> float:
    """Seconds before attempt `failures + 1`: Retry-After when given, else base doubling; at most 1 h."""
    if retry_after_s is not None:
        return min(max(retry_after_s, 0.0), MAX_BACKOFF_S)
    return min(base_s * 2.0 ** min(max(failures - 1, 0), 32), MAX_BACKOFF_S)


# ---- the exporter thread ---------------------------------------------------------------------

_COLUMNS = ("id", "call_id", "started_at", "duration_ms", "ttfb_ms", "host", "method", "status", "outcome",
            "error_type", "project", "project_source", "provider", "endpoint", "client", "request_id",
            "request_model", "response_model", "model", "service_tier", "is_stream", "usage_status",
            "input_tokens", "cache_read_tokens", *_CACHE_WRITES, "output_tokens", "reasoning_tokens",
            "cost_nanousd", "unpriced_reason")
# Walks the primary key from the mark: no index needed, however long the ledger.
_SELECT = (f"SELECT {', '.join(_COLUMNS)} FROM calls WHERE id > ? AND exported_at IS NULL "
           f"ORDER BY id LIMIT {MAX_BATCH_ROWS}")


class _Failure(Exception):
    """An attempt that left rows unshipped; `state` says whether the user must act (failing)."""

    def __init__(self, message: str, *, state: str = "backing_off", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.state, self.retry_after_s = state, retry_after_s


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirected POST becomes a GET, and could carry the Authorization header to another host.
    def redirect_request(self, *args, **kwargs):
        return None


class OtlpExporter:
    """A daemon thread shipping ledger rows at least once, in id order, in batches of at most 500.

    States: idle (caught up), shipping, backing_off (collector or ledger unavailable: retried),
    failing (the collector refuses us, e.g. 401/403/404: offered again at the same pace until fixed).
    """

    def __init__(self, db_path: Path, settings: OtlpSettings, *, version: str, backoff_base_s: float = 1.0,
                 host_name: str | None = None) -> None:
        self.db_path, self.settings, self.version = db_path, settings, version
        self.backoff_base_s = backoff_base_s
        self.host_name = host_name or socket.gethostname()
        # ProxyHandler({}): the daemon's own environment may point HTTPS_PROXY at halton-meter.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), _NoRedirects(),
            urllib.request.HTTPSHandler(context=ssl.create_default_context()))
        self._headers = {**settings.headers, "Content-Type": "application/json",
                         "User-Agent": f"halton-meter/{version}"}
        # Header values, and their words (the token after "Bearer"), never reach a log line or
        # status, even when a collector echoes them in an error message.
        words = {w for value in settings.headers.values() for w in (value, *value.split())}
        self._secrets = sorted((w for w in words if len(w) >= 4 and w.lower() not in ("bearer", "basic")),
                               key=len, reverse=True)
        self._stop, self._wake, self._lock = threading.Event(), threading.Event(), threading.Lock()
        self._mark = 0  # every row with id <= mark is shipped or rejected
        self._accepted = False  # has this collector ever taken a row? (see _ship)
        self._counted_at = -math.inf
        self._status = {
            "endpoint": settings.endpoint, "signal": settings.signal, "state": "idle", "shipped_rows": 0,
            "pending_rows": None, "rejected_rows": 0, "last_success_at": None, "last_attempt_at": None,
            "last_error": None, "consecutive_failures": 0, "next_attempt_at": None,
        }
        self._thread = threading.Thread(target=self._run, name="otlp-exporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop: any wait ends at once; a POST in flight is left to its socket timeout after `timeout`."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self, rows: object = None) -> None:
        """New rows were committed: look now (a backoff still runs its course)."""
        self._wake.set()

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def _update(self, **changes: object) -> None:
        with self._lock:
            self._status.update(changes)

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        while not self._stop.is_set():
            try:
                if db is None:
                    db = self._open()
                self._wake.wait(self._catch_up(db))
                self._wake.clear()
                continue
            except _Failure as failure:
                delay = self._failed(failure, db)
            except (sqlite3.Error, OSError) as exc:  # locked, disk full…: retried with the same backoff
                if db is not None:
                    db.close()
                db = None
                delay = self._failed(_Failure(f"ledger error: {exc}"), db)
            except Exception as exc:  # noqa: BLE001 - the thread must never die
                log.exception("otlp_exporter_error")
                delay = self._failed(_Failure(f"internal error: {exc!r}", state="failing"), db)
            self._stop.wait(delay)
        if db is not None:
            db.close()

    def _open(self) -> sqlite3.Connection:
        db = connect(self.db_path)
        db.row_factory = sqlite3.Row
        found = db.execute("SELECT state_json FROM export_state WHERE name = ?", (_STATE_NAME,)).fetchone()
        try:
            state = json.loads(found[0]) if found else {}
        except ValueError:
            log.warning("otlp_state_unreadable action=rescan")  # shipped rows keep their exported_at
            state = {}
        self._mark = int(state.get("mark", 0))
        previous = state.get("endpoint")
        self._accepted = previous == self.settings.endpoint and state.get("shipped_rows", 0) > 0
        if previous and previous != self.settings.endpoint:
            # exported_at is per row: what the old collector accepted is not sent to the new one.
            log.info("otlp_endpoint_changed previous=%s endpoint=%s resend=no", previous, self.settings.endpoint)
        self._update(shipped_rows=int(state.get("shipped_rows", 0)), rejected_rows=int(state.get("rejected_rows", 0)),
                     last_success_at=state.get("last_success_at"))
        log.info("otlp_exporter_ready endpoint=%s signal=%s mark=%d", self.settings.endpoint,
                 self.settings.signal, self._mark)
        return db

    def _catch_up(self, db: sqlite3.Connection) -> float:
        """Ship batches until none is left; returns the idle interval (raises _Failure)."""
        while not self._stop.is_set():
            rows = [dict(row) for row in db.execute(_SELECT, (max(0, self._mark - _REUSED_ID_SLACK),))]
            if not rows:
                break
            self._update(state="shipping", next_attempt_at=None)
            self._ship(db, rows)
            failures = self.status()["consecutive_failures"]
            if failures:
                log.info("otlp_export_recovered after_failures=%d", failures)
                self._update(consecutive_failures=0, last_error=None)
            self._count_pending(db, force=len(rows) < MAX_BATCH_ROWS)
        self._count_pending(db, force=True)
        self._update(state="idle", next_attempt_at=time.time() + self.settings.interval_s)
        return self.settings.interval_s

    def _ship(self, db: sqlite3.Connection, rows: list[dict]) -> None:
        """POST `rows`, halving any part refused for its content until each refused row is alone."""
        unresolved = {row["id"] for row in rows}
        parts, refused = deque([rows]), []
        while parts and not self._stop.is_set():
            part = parts.popleft()
            status, retry_after, body = self._post(part)
            if 200 <= status < 300:
                self._accepted = self._accepted or body is not None  # None: nothing was sent
                unresolved.difference_update(row["id"] for row in part)
                self._commit(db, [row["id"] for row in part], [], self._partial_rejections(body or b"{}"),
                             self._new_mark(rows, unresolved))
            elif status in _PAYLOAD_REJECTED and len(part) > 1:
                parts.extendleft([part[len(part) // 2:], part[:len(part) // 2]])  # left half first
            elif status in _PAYLOAD_REJECTED:
                refused.append((part[0], status, body))
            else:
                message = f"HTTP {status} from {self.settings.url}{self._collector_says(body)}"
                if status in _RETRYABLE:
                    raise _Failure(message, retry_after_s=_retry_after_s(retry_after))
                # 401/403/404, 500…: the spec says not to retry the request, but the rows are the
                # record: they stay, and are offered again at the backoff pace until it is fixed.
                raise _Failure(message, state="failing")
        if not refused or self._stop.is_set():
            return
        if not self._accepted:
            # A collector that has never taken a row refuses our encoding, not these rows.
            _, status, body = refused[0]
            raise _Failure(f"HTTP {status} from {self.settings.url}: every row refused{self._collector_says(body)}",
                           state="failing")
        for row, status, _ in refused:
            log.error("otlp_row_rejected call_id=%s status=%d", row["call_id"], status)
        unresolved.difference_update(row["id"] for row, _, _ in refused)
        self._commit(db, [], [row["id"] for row, _, _ in refused], 0, self._new_mark(rows, unresolved))

    def _post(self, rows: list[dict]) -> tuple[int, str | None, bytes | None]:
        # `init`/`doctor` self-test calls are deleted once checked: never the team's spend.
        rows = [row for row in rows if row["provider"] != SELFTEST_PROVIDER]
        if not rows:
            return 200, None, None
        payload = build_payload(rows, self.settings, host_name=self.host_name, version=self.version)
        request = urllib.request.Request(self.settings.url, data=json.dumps(payload, separators=(",", ":")).encode(),
                                         headers=self._headers, method="POST")
        self._update(last_attempt_at=time.time())
        try:
            with self._opener.open(request, timeout=self.settings.timeout_s) as response:
                return response.status, response.headers.get("Retry-After"), response.read(_MAX_REPLY_BYTES)
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    body = exc.read(_MAX_REPLY_BYTES)
                except (OSError, http.client.HTTPException):
                    body = b""
            return exc.code, exc.headers.get("Retry-After"), body
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS…
            reason = getattr(exc, "reason", None) or repr(exc)
            raise _Failure(self._redact(f"cannot reach {self.settings.url}: {reason}")) from None

    def _partial_rejections(self, body: bytes) -> int:
        """Items a 2xx reply says it dropped (OTLP spec, "Partial Success": never retried)."""
        try:
            partial = json.loads(body).get("partialSuccess") or {}
            rejected = int(partial.get("rejectedSpans" if self.settings.signal == "traces" else "rejectedLogRecords")
                           or 0)
            message = " ".join(str(partial.get("errorMessage") or "").split())[:200]
        except (ValueError, AttributeError, TypeError):
            return 0  # an empty body is a full success
        if rejected or message:
            log.warning("otlp_partial_success rejected=%d message=%s", rejected, self._redact(message))
        return max(rejected, 0)

    def _collector_says(self, body: bytes) -> str:
        try:
            reply = json.loads(body)
            text = reply.get("message") if isinstance(reply, dict) else None  # a google.rpc.Status
        except ValueError:
            text = body.decode("utf-8", "replace")
        text = " ".join(str(text or "").split())[:200]
        return self._redact(f": {text}") if text else ""

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _new_mark(self, rows: list[dict], unresolved: set[int]) -> int:
        # Ids between the old mark and this batch's that are not in it were shipped before.
        return max(self._mark, min(unresolved) - 1 if unresolved else max(row["id"] for row in rows))

    def _commit(self, db: sqlite3.Connection, shipped: list[int], rejected: list[int], partial: int,
                mark: int) -> None:
        """Mark rows and advance the mark in one transaction. A crash before it commits re-sends
        the batch on the next start: delivery is at least once (OTLP spec, "Duplicate Data")."""
        now, status = time.time(), self.status()
        counts = {"shipped_rows": status["shipped_rows"] + len(shipped),
                  "rejected_rows": status["rejected_rows"] + len(rejected) + partial,
                  "last_success_at": now if shipped else status["last_success_at"]}
        state = json.dumps({"mark": mark, "endpoint": self.settings.endpoint, **counts}, sort_keys=True)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE calls SET exported_at = ? WHERE id = ?",
                           [(now, i) for i in shipped] + [(REJECTED, i) for i in rejected])
            db.execute("INSERT INTO export_state (name, state_json, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) "
                       "DO UPDATE SET state_json = excluded.state_json, updated_at = excluded.updated_at",
                       (_STATE_NAME, state, now))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._mark = mark
        with self._lock:
            self._status.update(counts)
            if self._status["pending_rows"] is not None:
                self._status["pending_rows"] = max(0, self._status["pending_rows"] - len(shipped) - len(rejected))
        log.debug("otlp_batch_committed shipped=%d rejected=%d mark=%d", len(shipped), len(rejected), mark)

    def _count_pending(self, db: sqlite3.Connection | None, *, force: bool) -> None:
        # Walks the primary key above the mark: short once caught up. During a long catch-up it is
        # recounted once a minute and decremented per batch in between.
        if db is None or not (force or time.monotonic() - self._counted_at >= _PENDING_RECOUNT_S):
            return
        count = db.execute("SELECT COUNT(*) FROM calls WHERE id > ? AND exported_at IS NULL",
                           (max(0, self._mark - _REUSED_ID_SLACK),)).fetchone()[0]
        self._counted_at = time.monotonic()
        self._update(pending_rows=count)

    def _failed(self, failure: _Failure, db: sqlite3.Connection | None) -> float:
        """Record a failed attempt; returns the backoff before the next one."""
        message = str(failure)
        with self._lock:
            failures = self._status["consecutive_failures"] + 1
            repeated = self._status["last_error"] == message
        delay = backoff_delay_s(failures, base_s=self.backoff_base_s, retry_after_s=failure.retry_after_s)
        if failure.retry_after_s is None:
            # "The interval between retries must have a random jitter" (OTLP spec, "OTLP/HTTP
            # Connection"): a team's meters do not all return to a recovered collector at once.
            delay = min(delay * random.uniform(1.0, 1.1), MAX_BACKOFF_S)
        self._update(state=failure.state, last_error=message, consecutive_failures=failures,
                     next_attempt_at=time.time() + delay)
        (log.debug if repeated else log.warning)(
            "otlp_export_failed state=%s failures=%d retry_in_s=%.1f error=%s", failure.state, failures, delay, message)
        try:
            self._count_pending(db, force=True)
        except sqlite3.Error:
            pass  # only a status nicety; the next attempt reports the ledger's error
        return delay


def _retry_after_s(value: str | None) -> float | None:
    """RFC 9110 section 10.2.3 Retry-After: delay-seconds or an HTTP-date."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None
