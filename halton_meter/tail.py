"""`halton-meter tail`: the latest calls, one line (or one JSON object) each; `-f` follows new ones.

Budget and model-rule events (budgets.py: warnings, refused calls) are shown among the calls, in
time order, as lines starting with `!!` (JSON: objects with `"type": "policy_event"`).

Formats are documented with the report's in report.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Iterable, TextIO

from halton_meter.report import NO_CAPTURES, _local, iso_local, format_usd, open_ledger, usd_string

FOLLOW_POLL_S = 0.5
_TAIL_COLUMNS = (
    "id, call_id, started_at, project, provider, model, endpoint, client, status, outcome, error_type, "
    "usage_status, input_tokens, cache_read_tokens, "
    "cache_write_5m_tokens + cache_write_1h_tokens + cache_write_30m_tokens + cache_write_12h_tokens, "
    "output_tokens, cost_nanousd, unpriced_reason, duration_ms"
)


def run_tail(db_path: Path, *, lines: int = 20, follow: bool = False, projects: Iterable[str] = (),
             as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The `tail` command: the last `lines` calls, oldest first; with `follow`, new ones until Ctrl-C."""
    out, err = out or sys.stdout, err or sys.stderr
    projects = tuple(projects)
    where, params = "", []
    if projects:
        where = f" AND COALESCE(project, 'default') IN ({', '.join('?' * len(projects))})"
        params = list(projects)
    db = None
    try:
        db = open_ledger(db_path)
        last_id = last_event = 0
        if db is not None:
            last_id, last_event = _newest_id(db), _newest_event(db)
            rows = db.execute(
                f"SELECT * FROM (SELECT {_TAIL_COLUMNS} FROM calls WHERE id <= ?{where} "
                "ORDER BY id DESC LIMIT ?) ORDER BY id", (last_id, *params, lines)).fetchall()
            events = _events(db, projects, 0, last_event, lines)
            if rows and len(rows) == lines:  # only the events among the calls shown
                events = [event for event in events if event[1] >= rows[0][2]]
            _emit(rows, events, as_json, out)
        if not last_id and not as_json and not follow:
            out.write(NO_CAPTURES)
        out.flush()
        if not follow:
            return 0
        if not last_id and not as_json:
            print("No captures yet; waiting for the first call (Ctrl-C to stop).", file=err, flush=True)
        while True:
            time.sleep(FOLLOW_POLL_S)
            if db is None:
                db = open_ledger(db_path)
                continue
            # Seeks on the rowid: each poll reads only the rows added since the last one, and
            # advances past rows the --project filter skips, so a quiet project costs nothing.
            newest, newest_event = _newest_id(db), _newest_event(db)
            if newest > last_id or newest_event > last_event:
                rows = db.execute(f"SELECT {_TAIL_COLUMNS} FROM calls WHERE id > ? AND id <= ?{where} "
                                  "ORDER BY id", (last_id, newest, *params)).fetchall()
                _emit(rows, _events(db, projects, last_event, newest_event), as_json, out)
                out.flush()
                last_id, last_event = newest, newest_event
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `tail -f | head`: the reader left; exit quietly
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except sqlite3.Error as exc:
        print(f"halton-meter tail: cannot read the ledger {db_path}: {exc}", file=err)
        return 1
    finally:
        if db is not None:
            db.close()


def _newest_id(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COALESCE(MAX(id), 0) FROM calls").fetchone()[0]


def _newest_event(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COALESCE(MAX(id), 0) FROM policy_events").fetchone()[0]


def _events(db: sqlite3.Connection, projects: tuple[str, ...], after: int, upto: int,
            limit: int = -1) -> list[tuple]:
    """Policy events after id `after`, oldest first; with --project, theirs and every-project ones."""
    where = ""
    if projects:
        where = f" AND (project IS NULL OR project IN ({', '.join('?' * len(projects))}))"
    return db.execute(
        f"SELECT * FROM (SELECT id, at, kind, project, provider, model, message FROM policy_events "
        f"WHERE id > ? AND id <= ?{where} ORDER BY id DESC LIMIT ?) ORDER BY id",
        (after, upto, *projects, limit)).fetchall()


def _emit(rows: list[tuple], events: list[tuple], as_json: bool, out: TextIO) -> None:
    """Calls in ledger order, each event placed before the first call that started after it."""
    pending = iter(events)
    event = next(pending, None)
    for row in rows:
        while event is not None and event[1] <= row[2]:
            out.write((json.dumps(_event_record(event)) if as_json else _event_line(event)) + "\n")
            event = next(pending, None)
        out.write((json.dumps(_tail_record(row)) if as_json else _tail_line(row)) + "\n")
    while event is not None:
        out.write((json.dumps(_event_record(event)) if as_json else _event_line(event)) + "\n")
        event = next(pending, None)


def _event_record(event: tuple) -> dict:
    id_, at, kind, project, provider, model, message = event
    return {"type": "policy_event", "id": id_, "at": iso_local(at), "kind": kind, "project": project,
            "provider": provider, "model": model, "message": message}


def _event_line(event: tuple) -> str:
    _, at, kind, project, _, _, message = event
    label = {"call_blocked": "REFUSED", "model_blocked": "REFUSED"}.get(kind, "BUDGET")
    return f"{_local(at)}  {project or '(all)':<16} !! {label} {message.removeprefix('halton-meter: ')}"


def _tail_record(row: tuple) -> dict:
    (id_, call_id, started_at, project, provider, model, endpoint, client, status, outcome, error_type,
     usage_status, inp, read, write, output, cost, unpriced_reason, duration_ms) = row
    return {
        "id": id_, "call_id": call_id, "started_at": iso_local(started_at),
        "project": project if project is not None else "default", "provider": provider, "model": model,
        "endpoint": endpoint, "client": client, "status": status, "outcome": outcome,
        "error_type": error_type, "usage_status": usage_status, "input_tokens": inp,
        "cache_read_tokens": read, "cache_write_tokens": write, "output_tokens": output,
        "cost_nanousd": cost, "cost_usd": usd_string(cost) if cost is not None else None,
        "unpriced_reason": unpriced_reason, "duration_ms": duration_ms,
    }


def _tail_line(row: tuple) -> str:
    r = _tail_record(row)
    status = f"{r['status'] if r['status'] is not None else '-'} {r['outcome']}"
    tokens = f"in {r['input_tokens']:,} out {r['output_tokens']:,}"
    if r["cache_read_tokens"]:
        tokens += f" cache read {r['cache_read_tokens']:,}"
    if r["usage_status"] == "duplicate":
        cost = "duplicate"
    elif r["cost_nanousd"] is not None:
        cost = format_usd(r["cost_nanousd"])
    elif r["unpriced_reason"]:
        cost = "unpriced"
    elif r["usage_status"] == "unknown":
        cost = "usage unknown"
    else:
        cost = "-"
    duration = f"{round(r['duration_ms']):,} ms" if r["duration_ms"] is not None else "-"
    return (f"{_local(row[2])}  {r['project']:<16} {r['provider'] or '-':<10} {r['model'] or '-':<26} "
            f"{status:<20} {tokens:<36} {cost:>13} {duration:>10}  {r['client'] or '-'}").rstrip()
