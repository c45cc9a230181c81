"""`halton-meter report` and `halton-meter tail`: ledger queries rendered as tables, JSON or CSV.

Time: `--since`/`--until` take a duration back from now (`30m`, `24h`, `7d`, `2w`) or a local
date or date-time (`2026-11-01`, `2026-11-01T12:00`; an explicit offset such as `Z` or `+02:00`
is honoured). The window is half-open, [since, until). A date alone as `--until` includes that
whole day, so `--since 2026-11-01 --until 2026-11-30` is all of November. Default: the last 30
days. Day, week (ISO, Monday first, keyed `2026-W45`) and month (`2026-11`) buckets are local.

Money: the ledger stores integer nano-dollars (1e-9 USD). Tables round for reading: $1 and above
to the cent with thousands separators ($12.35, $1,234.57); below $1 to three significant digits
with at least two decimals ($0.50, $0.0123, $0.000464). JSON and CSV carry the exact integer
`cost_nanousd` and `cost_usd`, a decimal string with nine places ("0.000464000"); never floats.
A cost counts priced calls only; `unpriced_calls` says how many calls have no price (tables mark
such a group's cost with `*`, or show `n/a*` when nothing in it was priced).

`report --json` prints one object:
    {"schema": "halton-meter.report/1",
     "window": {"since": ISO-8601 local with offset, "until": ...},
     "filters": {"project": [...], "provider": [...], "model": [...]},
     "totals": {"calls", "projects", "models", "input_tokens", "cache_read_tokens",
                "cache_write_tokens", "output_tokens", "cost_nanousd", "cost_usd",
                "unpriced_calls", "avg_duration_ms", "duplicate_calls"},
     "groups": {<grouping>: [{"key", "calls", "input_tokens", "cache_read_tokens",
                "cache_write_tokens", "output_tokens", "cost_nanousd", "cost_usd",
                "unpriced_calls", "avg_duration_ms", "cost_share_pct"}, ...], ...},
     "unpriced": {"calls", "input_tokens", "cache_read_tokens", "cache_write_tokens",
                  "output_tokens", "models": [{"model", "reason", "calls", ...tokens}], "fix"},
     "usage_unknown": calls whose usage is unknown or partial,
     "usage_unknown_by_status": {"unknown": n, "partial": n},
     "provider_errors": {"calls": n, "by_error_type": {error_type: n}},
     "provider_cost": {"calls", "provider_cost_nanousd", "provider_cost_usd",
                       "computed_cost_nanousd", "computed_cost_usd", "computed_calls"}}
Groupings appear in the order asked for (default project, then model). Tokens: input is
uncached input; cache write sums every TTL; output includes reasoning. Keys: a NULL project is
"default"; another NULL key is null. Groups sort by cost, then calls (both descending), then key;
day, week and month groups sort by time. `avg_duration_ms` and `cost_share_pct` are numbers
rounded to 0.1 and 0.01, or null. An empty ledger gives zero totals and empty groups.

`report --csv` prints a header row, then one row per (grouping, key), in the JSON's order:
    grouping,key,calls,input_tokens,cache_read_tokens,cache_write_tokens,output_tokens,
    cost_nanousd,cost_usd,unpriced_calls,avg_duration_ms,cost_share_pct
(one line; `\\n` line ends; empty fields for null).

`tail` (tail.py) shows the latest recorded calls (ledger id order: a call is recorded when it ends), one
line each; its cost column reads `unpriced`, `usage unknown`, `duplicate` or `-` when no cost
applies. `tail --json` prints one object per line: id, call_id, started_at (ISO-8601 local), project,
provider, model, endpoint, client, status, outcome, error_type, usage_status, input_tokens,
cache_read_tokens, cache_write_tokens, output_tokens, cost_nanousd, cost_usd, unpriced_reason,
duration_ms.

Speed: the per-group scan runs one range query per (project, model) pair on an index led by
(project, model, started_at) that covers every summed column, so no query sorts the window
(ledger.REPORT_INDEXES; tools/bench_ledger.py measures it).
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Iterable, TextIO

SCHEMA = "halton-meter.report/1"
DEFAULT_SINCE = "30d"
DEFAULT_GROUPINGS = ("project", "model")
TIME_GROUPINGS = ("day", "week", "month")
COLUMN_GROUPINGS = ("project", "model", "provider", "client", "endpoint")
UNPRICED_FIX = ("add prices under [pricing.models] in config.toml "
                "or `halton-meter pricing import FILE`")
NO_CAPTURES = (
    "No captures yet.\n"
    "Start the proxy with `halton-meter serve`, then send a call through it "
    "(the README's quick start shows one), and run this again.\n"
)
CSV_FIELDS = ("grouping", "key", "calls", "input_tokens", "cache_read_tokens", "cache_write_tokens",
              "output_tokens", "cost_nanousd", "cost_usd", "unpriced_calls", "avg_duration_ms",
              "cost_share_pct")

NANO = 1_000_000_000
_DURATION = re.compile(r"(\d+)([mhdw])")
_DATE_ONLY = re.compile(r"\d{4}-?\d{2}-?\d{2}")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# calls, input, cache read, cache write, output, cost, duration sum, durations, unpriced calls
_MEASURES = (
    "COUNT(*), SUM(input_tokens), SUM(cache_read_tokens), "
    "SUM(cache_write_5m_tokens + cache_write_1h_tokens + cache_write_30m_tokens + cache_write_12h_tokens), "
    "SUM(output_tokens), SUM(cost_nanousd), SUM(duration_ms), COUNT(duration_ms), COUNT(unpriced_reason)"
)


class TimeError(ValueError):
    """A --since/--until value that is neither a duration nor a date."""


@dataclass(frozen=True)
class Query:
    since: float
    until: float
    groupings: tuple[str, ...] = DEFAULT_GROUPINGS
    projects: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()


def run_report(db_path: Path, *, since: str | None = None, until: str | None = None,
               by: Iterable[str] | None = None, projects: Iterable[str] = (),
               providers: Iterable[str] = (), models: Iterable[str] = (), fmt: str = "text",
               out: TextIO | None = None, err: TextIO | None = None, now: float | None = None) -> int:
    """The `report` command: 0 ok (an empty ledger included), 1 unreadable ledger, 2 bad time."""
    out, err = out or sys.stdout, err or sys.stderr
    now = time.time() if now is None else now
    try:
        start = parse_time(since or DEFAULT_SINCE, now, flag="--since")
        end = parse_time(until, now, flag="--until", end=True) if until else now
    except TimeError as exc:
        print(f"halton-meter report: {exc}", file=err)
        return 2
    if start >= end:
        print(f"halton-meter report: --since ({_local(start)}) is not before --until ({_local(end)}). "
              "Pick a --since earlier than --until.", file=err)
        return 2
    query = Query(start, end, tuple(dict.fromkeys(by or DEFAULT_GROUPINGS)),
                  tuple(projects), tuple(providers), tuple(models))
    try:
        db = open_ledger(db_path)
        try:
            if db is not None:
                db.execute("BEGIN")  # one snapshot: tables and call-outs agree while the proxy writes
            data = build_report(db, query)
            captured = db is not None and db.execute("SELECT 1 FROM calls LIMIT 1").fetchone() is not None
        finally:
            if db is not None:
                db.close()  # ends the read transaction
    except sqlite3.Error as exc:
        print(f"halton-meter report: cannot read the ledger {db_path}: {exc}", file=err)
        return 1
    if fmt == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    elif fmt == "csv":
        write_csv(data, out)
    elif not captured:
        out.write(NO_CAPTURES)
    else:
        out.write(render_text(data))
    return 0


def parse_time(text: str, now: float, *, flag: str = "--since", end: bool = False) -> float:
    """A duration back from `now` (7d, 24h, 30m, 2w) or an ISO date/date-time, local unless it
    carries an offset; with `end`, a date alone means the end of that day."""
    value = text.strip()
    try:
        match = _DURATION.fullmatch(value)
        if match:
            result = now - int(match[1]) * _UNIT_S[match[2]]
        else:
            moment = datetime.fromisoformat(value)
            if end and _DATE_ONLY.fullmatch(value):
                moment += timedelta(days=1)
            result = moment.timestamp()  # naive: local time
        datetime.fromtimestamp(result)  # in the range the rest of the report can show
    except (ValueError, OverflowError, OSError):
        raise TimeError(f"{flag} {text!r} is not a time. Use a duration like 7d, 24h, 30m or 2w, "
                        "or a local date or time like 2026-11-01 or 2026-11-01T12:00.") from None
    return result


def open_ledger(db_path: Path) -> sqlite3.Connection | None:
    """The ledger (migrated to this version first, like every opener), queried read-only; None when
    there is no file yet."""
    from halton_meter.ledger import connect

    if not db_path.exists():
        return None
    db = connect(db_path)
    db.execute("PRAGMA query_only = ON")
    return db


# --- queries -------------------------------------------------------------------------------


def build_report(db: sqlite3.Connection | None, query: Query) -> dict:
    """The whole report as the documented JSON object; `db` None reads as an empty ledger."""
    extras = tuple(g for g in query.groupings if g in COLUMN_GROUPINGS[2:])
    cube = list(cube_rows(db, query, extras)) if db is not None else []
    totals = _Measures()
    for row in cube:
        totals.add(row[2 + len(extras):])
    groups: dict[str, list[dict]] = {}
    days = _days(db, query) if db is not None and any(g in TIME_GROUPINGS for g in query.groupings) else []
    for grouping in query.groupings:
        if grouping in TIME_GROUPINGS:
            buckets: dict = {}
            for day, measures in days:
                buckets.setdefault(_bucket(grouping, day), _Measures()).add(measures)
            rows = [_group_row(key, m, totals.cost) for key, m in buckets.items()]
        else:
            position = 0 if grouping == "project" else 1 if grouping == "model" else 2 + extras.index(grouping)
            rows = _rollup(cube, position, grouping, totals.cost, len(extras))
            rows.sort(key=lambda r: (-r["cost_nanousd"], -r["calls"], r["key"] is None, r["key"] or ""))
        groups[grouping] = rows
    projects = {row[0] if row[0] is not None else "default" for row in cube}
    models = {row[1] for row in cube if row[1] is not None}
    usage = _usage_gaps(db, query) if db is not None else {}
    totals_out = _measures_out(totals)
    totals_out.update(projects=len(projects), models=len(models), duplicate_calls=usage.get("duplicate", 0))
    return {
        "schema": SCHEMA,
        "window": {"since": iso_local(query.since), "until": iso_local(query.until)},
        "filters": {"project": list(query.projects), "provider": list(query.providers),
                    "model": list(query.models)},
        "totals": _order_totals(totals_out),
        "groups": groups,
        "unpriced": _unpriced(db, query),
        "usage_unknown": usage.get("unknown", 0) + usage.get("partial", 0),
        "usage_unknown_by_status": {"unknown": usage.get("unknown", 0), "partial": usage.get("partial", 0)},
        "provider_errors": _provider_errors(db, query),
        "provider_cost": _provider_cost(db, query),
    }


class _Measures:
    __slots__ = ("calls", "input", "cache_read", "cache_write", "output", "cost", "duration_sum",
                 "durations", "unpriced")

    def __init__(self) -> None:
        self.calls = self.input = self.cache_read = self.cache_write = self.output = 0
        self.cost = self.durations = self.unpriced = 0
        self.duration_sum = 0.0

    def add(self, values: tuple) -> None:
        """Add one row of the _MEASURES columns (a NULL sum counts as 0)."""
        calls, inp, read, write, out, cost, dur_sum, durs, unpriced = values
        self.calls += calls
        self.input += inp or 0
        self.cache_read += read or 0
        self.cache_write += write or 0
        self.output += out or 0
        self.cost += cost or 0
        self.duration_sum += dur_sum or 0.0
        self.durations += durs
        self.unpriced += unpriced


def _measures_out(m: _Measures) -> dict:
    return {
        "calls": m.calls, "input_tokens": m.input, "cache_read_tokens": m.cache_read,
        "cache_write_tokens": m.cache_write, "output_tokens": m.output, "cost_nanousd": m.cost,
        "cost_usd": usd_string(m.cost), "unpriced_calls": m.unpriced,
        "avg_duration_ms": round(m.duration_sum / m.durations, 1) if m.durations else None,
    }


def _order_totals(totals: dict) -> dict:
    order = ("calls", "projects", "models", "input_tokens", "cache_read_tokens", "cache_write_tokens",
             "output_tokens", "cost_nanousd", "cost_usd", "unpriced_calls", "avg_duration_ms",
             "duplicate_calls")
    return {name: totals[name] for name in order}


def _group_row(key, m: _Measures, total_cost: int) -> dict:
    row = {"key": key}
    row.update(_measures_out(m))
    row["cost_share_pct"] = round(100 * m.cost / total_cost, 2) if total_cost else None
    return row


def _rollup(cube: list[tuple], position: int, grouping: str, total_cost: int, n_extras: int) -> list[dict]:
    merged: dict = {}
    for row in cube:
        key = row[position]
        if key is None and grouping == "project":
            key = "default"
        merged.setdefault(key, _Measures()).add(row[2 + n_extras:])
    return [_group_row(key, m, total_cost) for key, m in merged.items()]


def _filters(query: Query, *, pairs_filtered: bool = False) -> tuple[str, list]:
    """SQL terms (each starting with AND) and parameters for the --project/--provider/--model filters."""
    terms, params = [], []
    for column, values in (("COALESCE(project, 'default')", query.projects), ("provider", query.providers),
                           ("model", query.models)):
        if values and not (pairs_filtered and column != "provider"):
            terms.append(f" AND {column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
    return "".join(terms), params


def cube_rows(db: sqlite3.Connection, query: Query, extras: tuple[str, ...]):
    """Rows of (project, model, *extras, *_MEASURES) over the window: the finest grouping asked for."""
    extra_cols = "".join(f"{name}, " for name in extras)
    group_extras = f" GROUP BY {', '.join(extras)}" if extras else ""
    where, params = _filters(query, pairs_filtered=True)
    sql = (f"SELECT {extra_cols}{_MEASURES} FROM calls WHERE project IS ? AND model IS ? "
           f"AND started_at >= ? AND started_at < ?{where}{group_extras}")
    for project, model in pairs(db):
        if query.projects and (project if project is not None else "default") not in query.projects:
            continue
        if query.models and model not in query.models:
            continue
        for row in db.execute(sql, (project, model, query.since, query.until, *params)):
            if row[len(extras)]:
                yield (project, model, *row)


def pairs(db: sqlite3.Connection) -> list[tuple[str | None, str | None]]:
    """Every (project, model) ever recorded, by skipping along the index: one seek per pair."""
    pairs = []
    project_row = db.execute("SELECT project FROM calls ORDER BY project, model LIMIT 1").fetchone()
    while project_row is not None:
        project = project_row[0]
        model_row = db.execute("SELECT model FROM calls WHERE project IS ? ORDER BY model LIMIT 1",
                               (project,)).fetchone()
        while model_row is not None:
            model = model_row[0]
            pairs.append((project, model))
            # NULL sorts first, and `model > NULL` matches nothing.
            model_row = db.execute(
                "SELECT model FROM calls WHERE project IS ? AND model > ? ORDER BY model LIMIT 1"
                if model is not None else
                "SELECT model FROM calls WHERE project IS ? AND model IS NOT NULL ORDER BY model LIMIT 1",
                (project, model) if model is not None else (project,)).fetchone()
        project_row = db.execute(
            "SELECT project FROM calls WHERE project > ? ORDER BY project LIMIT 1"
            if project is not None else
            "SELECT project FROM calls WHERE project IS NOT NULL ORDER BY project LIMIT 1",
            (project,) if project is not None else ()).fetchone()
    return pairs


def _days(db: sqlite3.Connection, query: Query) -> list[tuple[date, tuple]]:
    """One range query per local day of the window (DST-proof, and no sort of the window)."""
    where, params = _filters(query)
    sql = f"SELECT {_MEASURES} FROM calls WHERE started_at >= ? AND started_at < ?{where}"
    day = datetime.fromtimestamp(query.since).date()
    last = datetime.fromtimestamp(query.until).date()
    out = []
    while day <= last:
        start = max(query.since, local_midnight(day))
        end = min(query.until, local_midnight(day + timedelta(days=1)))
        if start < end:
            measures = db.execute(sql, (start, end, *params)).fetchone()
            if measures[0]:
                out.append((day, measures))
        day += timedelta(days=1)
    return out


def local_midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day).timestamp()


def _bucket(grouping: str, day: date) -> str:
    if grouping == "day":
        return day.isoformat()
    if grouping == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{day.year}-{day.month:02d}"


def _unpriced(db: sqlite3.Connection | None, query: Query) -> dict:
    out = {"calls": 0, "input_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0,
           "output_tokens": 0, "models": [], "fix": UNPRICED_FIX}
    if db is None:
        return out
    where, params = _filters(query)
    rows = db.execute(
        "SELECT model, unpriced_reason, COUNT(*), SUM(input_tokens), SUM(cache_read_tokens), "
        "SUM(cache_write_5m_tokens + cache_write_1h_tokens + cache_write_30m_tokens + cache_write_12h_tokens), "
        "SUM(output_tokens) FROM calls WHERE unpriced_reason IS NOT NULL "
        f"AND started_at >= ? AND started_at < ?{where} GROUP BY model, unpriced_reason",
        (query.since, query.until, *params)).fetchall()
    rows.sort(key=lambda r: (-r[2], r[0] is None, r[0] or "", r[1]))
    names = ("calls", "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens")
    for model, reason, *counts in rows:
        out["models"].append({"model": model, "reason": reason, **dict(zip(names, counts))})
        for name, value in zip(names, counts):
            out[name] += value
    return out


def _usage_gaps(db: sqlite3.Connection, query: Query) -> dict[str, int]:
    where, params = _filters(query)
    # The IN list matches the partial index calls_usage_gaps word for word (sqlite needs that).
    return dict(db.execute(
        "SELECT usage_status, COUNT(*) FROM calls WHERE usage_status IN ('unknown', 'partial', 'duplicate') "
        f"AND started_at >= ? AND started_at < ?{where} GROUP BY usage_status",
        (query.since, query.until, *params)).fetchall())


def _provider_errors(db: sqlite3.Connection | None, query: Query) -> dict:
    if db is None:
        return {"calls": 0, "by_error_type": {}}
    where, params = _filters(query)
    rows = db.execute(
        "SELECT error_type, COUNT(*) FROM calls WHERE outcome = 'provider_error' "
        f"AND started_at >= ? AND started_at < ?{where} GROUP BY error_type",
        (query.since, query.until, *params)).fetchall()
    rows.sort(key=lambda r: (-r[1], r[0] or ""))
    return {"calls": sum(n for _, n in rows), "by_error_type": {kind or "unknown": n for kind, n in rows}}


def _provider_cost(db: sqlite3.Connection | None, query: Query) -> dict:
    calls = provider = computed = computed_calls = 0
    if db is not None:
        where, params = _filters(query)
        calls, provider, computed, computed_calls = db.execute(
            "SELECT COUNT(*), SUM(provider_cost_nanousd), SUM(cost_nanousd), COUNT(cost_nanousd) FROM calls "
            f"WHERE provider_cost_nanousd IS NOT NULL AND started_at >= ? AND started_at < ?{where}",
            (query.since, query.until, *params)).fetchone()
    return {"calls": calls, "provider_cost_nanousd": provider or 0, "provider_cost_usd": usd_string(provider or 0),
            "computed_cost_nanousd": computed or 0, "computed_cost_usd": usd_string(computed or 0),
            "computed_calls": computed_calls}


# --- rendering ------------------------------------------------------------------------------


def usd_string(nanousd: int) -> str:
    """Exact dollars as a decimal string with nine places: 464000 -> '0.000464000'."""
    sign = "-" if nanousd < 0 else ""
    whole, frac = divmod(abs(nanousd), NANO)
    return f"{sign}{whole}.{frac:09d}"


def format_usd(nanousd: int) -> str:
    """Dollars for reading: cents from $1 up, else three significant digits (module docstring)."""
    sign = "-" if nanousd < 0 else ""
    n = abs(nanousd)
    if n >= NANO:
        cents = (n + 5_000_000) // 10_000_000
        return f"{sign}${cents // 100:,}.{cents % 100:02d}"
    if n == 0:
        return "$0.00"
    step = 10 ** max(0, len(str(n)) - 3)
    n = (n + step // 2) // step * step
    if n >= NANO:
        return f"{sign}$1.00"
    decimals = f"{n:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}$0.{decimals}"


def render_text(data: dict) -> str:
    totals = data["totals"]
    lines = [f"Window   {_short(data['window']['since'])} to {_short(data['window']['until'])} (local time)"]
    filters = "  ".join(f"{name}={','.join(values)}" for name, values in data["filters"].items() if values)
    if filters:
        lines.append(f"Filters  {filters}")
    if not totals["calls"]:
        lines.append("Calls    none in this window. Widen it with --since (e.g. --since 90d) or drop filters.")
        return "\n".join(lines) + "\n"
    lines += [
        f"Calls    {totals['calls']:,} across {_plural(totals['projects'], 'project')} "
        f"and {_plural(totals['models'], 'model')}",
        f"Tokens   in {totals['input_tokens']:,} (uncached)  cache read {totals['cache_read_tokens']:,}  "
        f"cache write {totals['cache_write_tokens']:,}  out {totals['output_tokens']:,}",
        f"Cost     {format_usd(totals['cost_nanousd'])}"
        + (f"  (without {_plural(totals['unpriced_calls'], 'unpriced call')}, see below)"
           if totals["unpriced_calls"] else ""),
    ]
    for grouping, rows in data["groups"].items():
        lines += ["", *_table(grouping, rows)]
    if any(row["unpriced_calls"] for rows in data["groups"].values() for row in rows):
        lines += ["", "* includes unpriced calls, whose cost is not counted."]
    lines += _callouts(data)
    return "\n".join(lines) + "\n"


def _table(grouping: str, rows: list[dict]) -> list[str]:
    header = (grouping, "calls", "input", "cache read", "cache write", "output", "cost", "avg ms", "share")
    body = []
    for row in rows:
        cost = format_usd(row["cost_nanousd"])
        if row["unpriced_calls"]:
            cost = cost + "*" if row["cost_nanousd"] else "n/a*"
        body.append((
            _key_text(grouping, row["key"]), f"{row['calls']:,}", f"{row['input_tokens']:,}",
            f"{row['cache_read_tokens']:,}", f"{row['cache_write_tokens']:,}", f"{row['output_tokens']:,}",
            cost, f"{round(row['avg_duration_ms']):,}" if row["avg_duration_ms"] is not None else "-",
            f"{row['cost_share_pct']:.1f}%" if row["cost_share_pct"] is not None else "-",
        ))
    widths = [max(len(cells[i]) for cells in (header, *body)) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

    return [f"By {grouping}", line(header), line(["-" * w for w in widths]), *map(line, body)]


def _key_text(grouping: str, key) -> str:
    if key is None:
        return "default" if grouping == "project" else "(none)"
    return str(key)


def _callouts(data: dict) -> list[str]:
    lines = []
    unpriced = data["unpriced"]
    if unpriced["calls"]:
        lines += ["", f"Unpriced calls: {unpriced['calls']:,} ({unpriced['input_tokens']:,} in, "
                      f"{unpriced['cache_read_tokens']:,} cache read, {unpriced['cache_write_tokens']:,} cache write, "
                      f"{unpriced['output_tokens']:,} out), not in the cost above:"]
        shown = unpriced["models"][:5]
        width = max(len(_key_text("model", m["model"])) for m in shown)
        for item in shown:
            lines.append(f"  {_key_text('model', item['model']).ljust(width)}  "
                         f"{_plural(item['calls'], 'call')}  {item['reason']}")
        if len(unpriced["models"]) > len(shown):
            rest = unpriced["models"][len(shown):]
            lines.append(f"  and {_plural(len(rest), 'more model')} ({_plural(sum(m['calls'] for m in rest), 'call')})")
        lines.append(f"  Fix: {UNPRICED_FIX}.")
    if data["usage_unknown"]:
        status = data["usage_unknown_by_status"]
        lines += ["", f"Usage unknown: {_plural(data['usage_unknown'], 'call')} ({status['unknown']:,} unknown, "
                      f"{status['partial']:,} partial) without complete usage from the provider; "
                      "their tokens and cost are missing or low."]
    errors = data["provider_errors"]
    if errors["calls"]:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in errors["by_error_type"].items())
        lines += ["", f"Provider errors: {_plural(errors['calls'], 'call')} ({kinds})."]
    reported = data["provider_cost"]
    if reported["calls"]:
        computed = format_usd(reported["computed_cost_nanousd"])
        if reported["computed_calls"] < reported["calls"]:
            computed += f" for the {reported['computed_calls']:,} of them that are priced"
        lines += ["", f"Provider-reported cost: {format_usd(reported['provider_cost_nanousd'])} on "
                      f"{_plural(reported['calls'], 'call')} (computed here: {computed})."]
    duplicates = data["totals"]["duplicate_calls"]
    if duplicates:
        lines += ["", f"Batch duplicates: {_plural(duplicates, 'call')} re-downloaded results already "
                      "counted; each counts as a call, with no tokens and no cost."]
    return lines


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def write_csv(data: dict, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for grouping, rows in data["groups"].items():
        for row in rows:
            writer.writerow([grouping] + ["" if row[f] is None else row[f] for f in CSV_FIELDS[1:]])


def iso_local(ts: float, timespec: str = "seconds") -> str:
    """Unix seconds as local ISO-8601 with its offset: the time format of every JSON output."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec=timespec)


def _local(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _short(iso: str) -> str:
    return iso[:16].replace("T", " ")
