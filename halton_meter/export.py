"""`halton-meter export --format csv|jsonl`: every recorded call, one row or line each, streamed.

Columns are the ledger's own, in a fixed documented order (EXPORT_COLUMNS), plus `started_at_iso`
and `cost_usd` (an exact decimal string). Money is never a float; a NULL is an empty CSV field or
a JSON null. Rows stream from one read snapshot, so memory stays flat on any ledger.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from typing import TextIO

from halton_meter.report import iso_local, usd_string

EXPORT_COLUMNS = (
    "id", "call_id", "started_at", "started_at_iso", "project", "project_source", "provider", "model",
    "request_model", "response_model", "endpoint", "client", "method", "host", "path", "status", "outcome",
    "error_type", "error", "is_stream", "usage_status", "billing", "input_tokens", "cache_read_tokens",
    "cache_write_5m_tokens", "cache_write_1h_tokens", "cache_write_30m_tokens", "cache_write_12h_tokens",
    "output_tokens", "reasoning_tokens", "billed_items", "cost_nanousd", "cost_usd", "price_model",
    "unpriced_reason", "provider_cost_nanousd", "service_tier", "request_id", "ttfb_ms", "duration_ms",
    "request_bytes", "response_bytes", "user_agent",
)
_DERIVED = {"started_at_iso", "cost_usd"}
_SELECT = ", ".join("COALESCE(project, 'default')" if name == "project" else name
                    for name in EXPORT_COLUMNS if name not in _DERIVED)


def export(db: sqlite3.Connection | None, fmt: str, out: TextIO, *, since: float | None = None,
           until: float | None = None, projects: tuple[str, ...] = ()) -> int:
    """Write the calls in [since, until) (all of them by default), oldest first; the row count."""
    terms, params = [], []
    if since is not None:
        terms.append("started_at >= ?")
        params.append(since)
    if until is not None:
        terms.append("started_at < ?")
        params.append(until)
    if projects:
        terms.append(f"COALESCE(project, 'default') IN ({', '.join('?' * len(projects))})")
        params.extend(projects)
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(EXPORT_COLUMNS)
    if db is None:
        return 0
    stored = [name for name in EXPORT_COLUMNS if name not in _DERIVED]
    count = 0
    for values in db.execute(f"SELECT {_SELECT} FROM calls{where} ORDER BY started_at, id", params):
        row = dict(zip(stored, values))
        row["started_at_iso"] = iso_local(row["started_at"], "milliseconds")
        row["cost_usd"] = usd_string(row["cost_nanousd"]) if row["cost_nanousd"] is not None else None
        row["is_stream"] = bool(row["is_stream"])
        if writer is not None:
            writer.writerow(["" if row[name] is None else int(row[name]) if name == "is_stream" else row[name]
                             for name in EXPORT_COLUMNS])
        else:
            out.write(json.dumps({name: row[name] for name in EXPORT_COLUMNS}, ensure_ascii=False) + "\n")
        count += 1
    return count
