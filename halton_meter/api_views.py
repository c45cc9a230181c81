"""What the local API serves: JSON views of the ledger, Prometheus metrics and the dashboard page.

Every handler opens its own read-only connection (handlers run in the API's worker threads), reads
one snapshot, and answers 400 with a one-line reason for a bad parameter. The README's "Local API"
table documents each document's shape; the dashboard (dashboard.html) is their first client.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Callable

from halton_meter.api import Document, Handler
from halton_meter.projects import attribution_sources
from halton_meter.report import (
    COLUMN_GROUPINGS,
    Query,
    TimeError,
    build_report,
    cube_rows,
    iso_local,
    local_midnight,
    open_ledger,
    pairs,
    parse_time,
    usd_string,
)

DEFAULT_SINCE = "24h"
DEFAULT_CALLS_LIMIT = 50
MAX_CALLS_LIMIT = 500
MAX_SERIES = 8  # past this many keys, the smallest are summed into "other"
# Bucket sizes (a day is a local calendar day, 23 to 25 hours); `auto` picks the first whose
# limit covers the window, so a chart has 12 to ~90 bars.
BUCKET_S = {"5m": 300, "15m": 900, "hour": 3600, "day": 86400}
_AUTO_BUCKETS = (("5m", 2 * 3600), ("15m", 12 * 3600), ("hour", 48 * 3600), ("day", float("inf")))
MAX_BUCKETS = 24 * 31
MAX_DAY_BUCKETS = 3660  # ten years of days
# Prometheus histogram bounds, in seconds: LLM calls run from a fraction of a second to minutes.
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PAGE_HEADERS = (
    # One self-contained page: no script, style or request may come from anywhere but itself.
    ("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
     "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)
CALL_COLUMNS = (
    "id", "call_id", "started_at", "project", "project_source", "provider", "model", "client", "endpoint",
    "method", "path", "status", "outcome", "error_type", "is_stream", "usage_status", "input_tokens",
    "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens", "cost_nanousd",
    "unpriced_reason", "ttfb_ms", "duration_ms", "has_body",
)
_CALL_SELECT = (
    "SELECT id, call_id, started_at, COALESCE(project, 'default'), project_source, provider, model, client, "
    "endpoint, method, path, status, outcome, error_type, is_stream, usage_status, input_tokens, "
    "cache_read_tokens, cache_write_5m_tokens + cache_write_1h_tokens + cache_write_30m_tokens + "
    "cache_write_12h_tokens, output_tokens, reasoning_tokens, cost_nanousd, unpriced_reason, ttfb_ms, "
    "duration_ms, EXISTS (SELECT 1 FROM request_bodies b WHERE b.call_id = calls.call_id) FROM calls"
)


class BadRequest(ValueError):
    """A query parameter the API cannot use; the message says which and what it accepts."""


def routes(db_path: Path, gauges: Callable[[], dict[str, float]],
           health: Handler) -> dict[str, Handler]:
    """Every path the daemon's API answers. `gauges` gives the live process figures for /metrics."""
    metrics = LedgerMetrics(db_path)
    page = resources.files("halton_meter").joinpath("dashboard.html").read_bytes()

    def read(view: Callable[[sqlite3.Connection | None, dict, float], object]) -> Handler:
        def handler(params: dict[str, list[str]]) -> tuple[int, object]:
            try:
                db = open_ledger(db_path)
            except sqlite3.Error as exc:
                return 503, {"error": f"the ledger cannot be read ({exc})."}
            try:
                if db is not None:
                    db.execute("BEGIN")  # one snapshot for the whole document
                return 200, view(db, params, time.time())
            except BadRequest as exc:
                return 400, {"error": str(exc)}
            finally:
                if db is not None:
                    db.close()
        return handler

    return {
        "/": lambda params: (200, Document("text/html; charset=utf-8", page, _PAGE_HEADERS)),
        "/health": health,
        "/metrics": lambda params: (200, Document(
            "text/plain; version=0.0.4; charset=utf-8", metrics.render(gauges()).encode())),
        "/api/summary": read(summary_view),
        "/api/calls": read(calls_view),
        "/api/projects": read(projects_view),
        "/api/models": read(models_view),
        "/api/timeseries": read(timeseries_view),
    }


# --- parameters -----------------------------------------------------------------------------


def _one(params: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = params.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise BadRequest(f"give {name} once.")
    return values[0]


def _many(params: dict[str, list[str]], name: str) -> tuple[str, ...]:
    """Repeated or comma-separated values: project=a&project=b or project=a,b."""
    return tuple(dict.fromkeys(v.strip() for value in params.get(name, ()) for v in value.split(",")
                               if v.strip()))


def _time(text: str, now: float, name: str, *, end: bool = False) -> float:
    try:
        if text.isascii() and text.replace(".", "", 1).isdigit():
            seconds = float(text)
            datetime.fromtimestamp(seconds)  # in the range dates can show
            return seconds
        return parse_time(text, now, flag=name, end=end)
    except (TimeError, ValueError, OverflowError, OSError):
        raise BadRequest(f"{name} {text[:40]!r} is not a time. Use a duration like 7d, 24h, 30m or 2w, "
                         "a local date or time like 2026-11-01, or unix seconds.") from None


def window(params: dict[str, list[str]], now: float) -> Query:
    """The time window and filters shared by the ledger views."""
    since = _time(_one(params, "since", DEFAULT_SINCE), now, "since")
    until_text = _one(params, "until")
    until = _time(until_text, now, "until", end=True) if until_text else now
    if since >= until:
        raise BadRequest("since is not before until; pick an earlier since.")
    return Query(since, until, projects=_many(params, "project"), providers=_many(params, "provider"),
                 models=_many(params, "model"))


def _int(params: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    text = _one(params, name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}.")
    return int(text)


# --- JSON views -----------------------------------------------------------------------------


def summary_view(db: sqlite3.Connection | None, params: dict, now: float) -> dict:
    """`report --json` for the window, grouped by project, model, provider and client."""
    query = window(params, now)
    groupings = tuple(_many(params, "by")) or ("project", "model", "provider", "client")
    unknown = [g for g in groupings if g not in COLUMN_GROUPINGS]
    if unknown:
        raise BadRequest(f"by={unknown[0]} is not a grouping; use {', '.join(COLUMN_GROUPINGS)}.")
    return build_report(db, Query(query.since, query.until, groupings, query.projects, query.providers,
                                  query.models))


def calls_view(db: sqlite3.Connection | None, params: dict, now: float) -> dict:
    """The latest calls first (ledger order); page back with `before`, poll forward with `after`."""
    query = window(params, now)
    limit = _int(params, "limit", DEFAULT_CALLS_LIMIT, 1, MAX_CALLS_LIMIT)
    terms, args = ["started_at >= ?", "started_at < ?"], [query.since, query.until]
    for column, values in (("COALESCE(project, 'default')", query.projects), ("provider", query.providers),
                           ("model", query.models), ("client", _many(params, "client")),
                           ("outcome", _many(params, "outcome"))):
        if values:
            terms.append(f"{column} IN ({', '.join('?' * len(values))})")
            args.extend(values)
    if _one(params, "unpriced") in ("1", "true"):
        terms.append("unpriced_reason IS NOT NULL")
    for name, operator in (("before", "<"), ("after", ">")):
        if _one(params, name) is not None:
            terms.append(f"id {operator} ?")
            args.append(_int(params, name, 0, 0, 2**62))
    if db is None:
        return {"calls": [], "next_before": None, "latest_id": None}
    # `after` polls for new calls: oldest first so a client can append them in order.
    order = "ASC" if _one(params, "after") is not None else "DESC"
    rows = db.execute(f"{_CALL_SELECT} WHERE {' AND '.join(terms)} ORDER BY id {order} LIMIT ?",
                      (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    calls = [_call(row) for row in rows[:limit]]
    latest = db.execute("SELECT MAX(id) FROM calls").fetchone()[0]
    return {"calls": calls, "next_before": calls[-1]["id"] if more and order == "DESC" else None,
            "latest_id": latest}


def _call(row: tuple) -> dict:
    call = dict(zip(CALL_COLUMNS, row))
    call["is_stream"], call["has_body"] = bool(call["is_stream"]), bool(call["has_body"])
    call["started_at_iso"] = iso_local(call["started_at"])
    cost = call["cost_nanousd"]
    call["cost_usd"] = usd_string(cost) if cost is not None else None
    call["priced"] = cost is not None or call["unpriced_reason"] is None
    return call


def projects_view(db: sqlite3.Connection | None, params: dict, now: float) -> dict:
    """Every project ever seen, with its body-capture setting and its spend in the window."""
    query = window(params, now)
    report = build_report(db, Query(query.since, query.until, ("project",), query.projects))
    spend = {row["key"]: row for row in report["groups"]["project"]}
    out = []
    if db is not None:
        sources = attribution_sources(db, query.since, query.until)
        last_seen = dict(db.execute("SELECT COALESCE(project, 'default'), MAX(started_at) FROM calls GROUP BY 1"))
        for name, created_at, body_capture in db.execute(
                "SELECT name, created_at, body_capture FROM projects ORDER BY name"):
            if query.projects and name not in query.projects:
                continue
            row = spend.get(name) or {"calls": 0, "cost_nanousd": 0, "cost_usd": usd_string(0), "unpriced_calls": 0}
            out.append({
                "project": name, "created_at": created_at, "last_call_at": last_seen.get(name),
                "body_capture": None if body_capture is None else bool(body_capture),
                "calls": row["calls"], "cost_nanousd": row["cost_nanousd"], "cost_usd": row["cost_usd"],
                "unpriced_calls": row["unpriced_calls"], "sources": sources.get(name, {}),
            })
    out.sort(key=lambda p: (-p["cost_nanousd"], -p["calls"], p["project"]))
    return {"window": report["window"], "projects": out}


def models_view(db: sqlite3.Connection | None, params: dict, now: float) -> dict:
    """Spend per (provider, model) in the window; unpriced models carry the reason."""
    query = window(params, now)
    merged: dict[tuple, list] = {}
    for _project, model, provider, *measures in (cube_rows(db, query, ("provider",)) if db is not None else ()):
        merged.setdefault((provider, model), []).append(measures)
    reasons: dict[str, str] = {}
    for entry in build_report(db, Query(query.since, query.until, ("model",), query.projects, query.providers,
                                        query.models))["unpriced"]["models"]:
        reasons.setdefault(entry["model"], entry["reason"])
    models = []
    for (provider, model), parts in merged.items():
        calls, inp, read, write, out, cost, _dur_sum, _durs, unpriced = (
            sum(part[i] or 0 for part in parts) for i in range(9))
        models.append({
            "provider": provider, "model": model, "calls": calls, "input_tokens": inp,
            "cache_read_tokens": read, "cache_write_tokens": write, "output_tokens": out,
            "cost_nanousd": cost, "cost_usd": usd_string(cost), "unpriced_calls": unpriced,
            "unpriced_reason": reasons.get(model) if unpriced else None,
        })
    models.sort(key=lambda m: (-m["cost_nanousd"], -m["calls"], m["provider"] or "", m["model"] or ""))
    return {"window": {"since": iso_local(query.since), "until": iso_local(query.until)}, "models": models}


def timeseries_view(db: sqlite3.Connection | None, params: dict, now: float) -> dict:
    """Spend per time bucket, one series per project, model or provider (the largest few)."""
    query = window(params, now)
    by = _one(params, "by", "project")
    if by not in ("project", "model", "provider", "none"):
        raise BadRequest("by must be project, model, provider or none.")
    bucket = _one(params, "bucket", "auto")
    if bucket not in ("auto", *BUCKET_S):
        raise BadRequest("bucket must be auto, 5m, 15m, hour or day.")
    span_s = query.until - query.since
    if bucket == "auto":
        bucket = next(name for name, limit_s in _AUTO_BUCKETS if span_s <= limit_s)
    if bucket != "day" and span_s / BUCKET_S[bucket] > MAX_BUCKETS:
        raise BadRequest(f"{bucket} buckets cover at most {MAX_BUCKETS * BUCKET_S[bucket] // 3600:,} hours; "
                         "use a longer bucket, or bucket=day.")
    if span_s / 86400 > MAX_DAY_BUCKETS:
        raise BadRequest(f"a time series covers at most {MAX_DAY_BUCKETS:,} days; pick a later since.")
    starts = _bucket_starts(bucket, query.since, query.until)
    index = {start: i for i, start in enumerate(starts)}
    totals: dict[str, list[list[int]]] = {}  # key -> [cost, calls, tokens, unpriced] per bucket
    for key, start, calls, cost, tokens, unpriced in _bucketed(db, query, bucket, by):
        series = totals.setdefault(key, [[0] * len(starts) for _ in range(4)])
        i = index[start]
        series[0][i] += cost or 0
        series[1][i] += calls
        series[2][i] += tokens or 0
        series[3][i] += unpriced
    ranked = sorted(totals.items(), key=lambda item: (-sum(item[1][0]), -sum(item[1][1]), item[0]))
    if len(ranked) > MAX_SERIES:
        other = [[sum(values) for values in zip(*(s[k] for _, s in ranked[MAX_SERIES - 1:]))] for k in range(4)]
        ranked = ranked[:MAX_SERIES - 1] + [("other", other)]
    return {
        "bucket": bucket, "bucket_s": BUCKET_S[bucket], "by": by, "since": query.since, "until": query.until, "buckets": starts,
        "series": [{"key": key, "cost_nanousd": s[0], "cost_usd": [c / 1e9 for c in s[0]], "calls": s[1],
                    "tokens": s[2], "unpriced_calls": s[3]} for key, s in ranked],
    }


def _bucket_starts(bucket: str, since: float, until: float) -> list[float]:
    if bucket != "day":
        size = BUCKET_S[bucket]
        first = int(since // size) * size
        return [float(t) for t in range(first, int(until) + 1, size) if t < until]
    day, last, starts = datetime.fromtimestamp(since).date(), datetime.fromtimestamp(until).date(), []
    while day <= last:
        start = local_midnight(day)
        if start < until:
            starts.append(start)
        day += timedelta(days=1)
    return starts


def _bucketed(db: sqlite3.Connection | None, query: Query, bucket: str, by: str):
    """(key, bucket start, calls, cost, tokens, unpriced) rows: one indexed range query per
    (project, model) pair, like the report, so no query sorts the window."""
    if db is None:
        return
    # Sub-day buckets are whole multiples of their size since the epoch; days are local days.
    start = (f"CAST(started_at / {BUCKET_S[bucket]} AS INTEGER) * {BUCKET_S[bucket]}" if bucket != "day"
             else "date(started_at, 'unixepoch', 'localtime')")
    key_column = {"provider": ", COALESCE(provider, 'unknown')"}.get(by, "")
    providers = ""
    if query.providers:
        providers = f" AND provider IN ({', '.join('?' * len(query.providers))})"
    sql = (f"SELECT {start}{key_column}, COUNT(*), SUM(cost_nanousd), SUM(input_tokens + cache_read_tokens + "
           "cache_write_5m_tokens + cache_write_1h_tokens + cache_write_30m_tokens + cache_write_12h_tokens + "
           "output_tokens), COUNT(unpriced_reason) FROM calls WHERE project IS ? AND model IS ? "
           f"AND started_at >= ? AND started_at < ?{providers} GROUP BY 1{', 2' if key_column else ''}")
    for project, model in pairs(db):
        name = project if project is not None else "default"
        if (query.projects and name not in query.projects) or (query.models and model not in query.models):
            continue
        for row in db.execute(sql, (project, model, query.since, query.until, *query.providers)):
            when = float(row[0]) if bucket != "day" else local_midnight(date.fromisoformat(row[0]))
            if key_column:
                key, measures = row[1], row[2:]
            else:
                key, measures = {"project": name, "model": model or "unknown", "none": "all"}[by], row[1:]
            yield (key, when, *measures)


# --- Prometheus -----------------------------------------------------------------------------


class LedgerMetrics:
    """Ledger totals as Prometheus counters, kept incrementally: the first scrape reads the whole
    ledger (about 3 s for a million rows), each later one only the rows recorded since (a
    primary-key range). Self-test rows are left out.

    Totals are lifetime totals of the ledger as it was when each row was first read: a later
    `reprice`, `project rename` or `merge` shows from the next daemon start.
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._lock = threading.Lock()
        self._last_id = 0
        self._last_call_id: str | None = None
        # (provider, model, project, outcome) -> calls, input, cache read, cache write, output,
        # reasoning, cost, unpriced
        self._totals: dict[tuple[str, str, str, str], list[int]] = {}
        # provider -> cumulative bucket counts + [sum, count], for duration and for TTFB
        self._durations: dict[str, list[float]] = {}
        self._ttfbs: dict[str, list[float]] = {}

    def render(self, gauges: dict[str, float]) -> str:
        with self._lock:
            self._catch_up()
            return _exposition(self._totals, self._durations, self._ttfbs, gauges)

    def _catch_up(self) -> None:
        db = open_ledger(self.db_path)
        if db is None:
            return
        try:
            db.execute("BEGIN")
            last = db.execute("SELECT call_id FROM calls WHERE id = ?", (self._last_id,)).fetchone()
            if self._last_id and (last is None or last[0] != self._last_call_id):
                # The newest row was deleted (the self-test removes its own) and its id may be
                # reused by a new call: read again from the row before it.
                self._last_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM calls WHERE id < ?",
                                           (self._last_id,)).fetchone()[0]
            top, top_call_id = db.execute("SELECT id, call_id FROM calls ORDER BY id DESC LIMIT 1").fetchone() or (0, None)
            if top <= self._last_id:
                return
            bounds = (self._last_id, top)
            for *key, calls, inp, read, write, out, reasoning, cost, unpriced in db.execute(
                    "SELECT COALESCE(provider, 'unknown'), COALESCE(model, ''), COALESCE(project, 'default'), "
                    "outcome, COUNT(*), SUM(input_tokens), SUM(cache_read_tokens), SUM(cache_write_5m_tokens + "
                    "cache_write_1h_tokens + cache_write_30m_tokens + cache_write_12h_tokens), SUM(output_tokens), "
                    "SUM(COALESCE(reasoning_tokens, 0)), SUM(COALESCE(cost_nanousd, 0)), COUNT(unpriced_reason) "
                    "FROM calls WHERE id > ? AND id <= ? AND provider IS NOT 'selftest' GROUP BY 1, 2, 3, 4", bounds):
                totals = self._totals.setdefault(tuple(key), [0] * 8)
                for i, value in enumerate((calls, inp, read, write, out, reasoning, cost, unpriced)):
                    totals[i] += value or 0
            for column, bounds_s, store in (("duration_ms", DURATION_BUCKETS_S, self._durations),
                                            ("ttfb_ms", TTFB_BUCKETS_S, self._ttfbs)):
                counts = ", ".join(f"SUM({column} <= {b * 1000})" for b in bounds_s)
                for provider, *values in db.execute(
                        f"SELECT COALESCE(provider, 'unknown'), {counts}, SUM({column}), COUNT({column}) "
                        f"FROM calls WHERE id > ? AND id <= ? AND {column} IS NOT NULL "
                        "AND provider IS NOT 'selftest' GROUP BY 1", bounds):
                    histogram = store.setdefault(provider, [0.0] * (len(bounds_s) + 2))
                    for i, value in enumerate(values):
                        histogram[i] += value or 0
            self._last_id, self._last_call_id = top, top_call_id
        finally:
            db.close()


_TOKEN_TYPES = (("input", 1), ("cache_read", 2), ("cache_write", 3), ("output", 4), ("reasoning", 5))
_GAUGES = {
    "halton_meter_up": ("gauge", "1 while the metering daemon answers."),
    "halton_meter_start_time_seconds": ("gauge", "When this daemon started (unix seconds)."),
    "halton_meter_open_connections": ("gauge", "Intercepted client connections open now."),
    "halton_meter_ledger_rows_written_total": ("counter", "Rows this daemon wrote since it started."),
    "halton_meter_ledger_rows_lost_total": ("counter", "Rows this daemon could not write since it started."),
    "halton_meter_unmetered_connections_total": ("counter", "Provider connections tunnelled without metering."),
    "halton_meter_ledger_rows_waiting": ("gauge", "Rows held in memory while the database refuses writes."),
    "halton_meter_ledger_rows_spooled_total": ("counter", "Rows moved to the spool since the daemon started."),
    "halton_meter_policy_refusals_total": ("counter", "Calls refused by a budget or model rule since start."),
    "halton_meter_export_pending_rows": ("gauge", "Ledger rows not yet shipped to the OTLP collector."),
    "halton_meter_export_consecutive_failures": ("gauge", "Failed OTLP shipments in a row (0: healthy)."),
}


def _exposition(totals: dict, durations: dict, ttfbs: dict, gauges: dict[str, float]) -> str:
    """Prometheus text format 0.0.4: HELP and TYPE once per family, escaped label values."""
    series: dict[str, list[int]] = {}  # (provider, model, project) labels -> summed over outcomes
    calls = []
    for (provider, model, project, outcome), values in sorted(totals.items()):
        labels = f'provider="{_escape(provider)}",model="{_escape(model)}",project="{_escape(project)}"'
        calls.append(f'halton_meter_calls_total{{{labels},outcome="{_escape(outcome)}"}} {values[0]}')
        summed = series.setdefault(labels, [0] * len(values))
        for i, value in enumerate(values):
            summed[i] += value
    lines = _family("halton_meter_calls_total", "counter", "Calls recorded in the ledger.", calls)
    lines += _family("halton_meter_tokens_total", "counter",
                     "Tokens recorded, by type (input is uncached input; output includes reasoning).",
                     [f'halton_meter_tokens_total{{{labels},type="{kind}"}} {values[i]}'
                      for labels, values in series.items() for kind, i in _TOKEN_TYPES])
    lines += _family("halton_meter_cost_usd_total", "counter", "Cost of priced calls in US dollars.",
                     [f"halton_meter_cost_usd_total{{{labels}}} {usd_string(values[6])}" for labels, values in series.items()])
    lines += _family("halton_meter_unpriced_calls_total", "counter",
                     "Calls with usage but no price (unknown model or rate).",
                     [f"halton_meter_unpriced_calls_total{{{labels}}} {values[7]}" for labels, values in series.items()])
    for name, help_text, bounds, store in (
            ("halton_meter_request_duration_seconds", "Call duration, request sent to response end.",
             DURATION_BUCKETS_S, durations),
            ("halton_meter_time_to_first_byte_seconds", "Time to the response head.", TTFB_BUCKETS_S, ttfbs)):
        samples = []
        for provider, values in sorted(store.items()):
            label = f'provider="{_escape(provider)}"'
            count = int(values[-1])
            samples += [f'{name}_bucket{{{label},le="{b:g}"}} {int(v)}' for b, v in zip(bounds, values)]
            samples += [f'{name}_bucket{{{label},le="+Inf"}} {count}',
                        f"{name}_sum{{{label}}} {values[-2] / 1000:.6f}", f"{name}_count{{{label}}} {count}"]
        lines += _family(name, "histogram", help_text, samples)
    for name, value in gauges.items():
        kind, help_text = _GAUGES[name]
        lines += _family(name, kind, help_text, [f"{name} {_number(value)}"])
    return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.9f}".rstrip("0")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
