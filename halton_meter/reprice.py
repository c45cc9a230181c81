"""`halton-meter reprice`: recompute stored costs with today's rate table, deliberately.

Rows keep the cost and the exact rates they were priced with; nothing changes them silently.
Repricing rewrites cost, rate key, rates and unpriced reason of the chosen rows in batches, and
records one audit event with the counts and the total before and after.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from halton_meter.ledger import _COLUMNS, CallRow, write_audit, _pricing_id, connect, price_row

BATCH_ROWS = 5000


@dataclass(slots=True)
class RepriceSummary:
    examined: int = 0
    changed: int = 0
    before_nanousd: int = 0
    after_nanousd: int = 0
    unpriced_before: int = 0
    unpriced_after: int = 0


def reprice(db_path: Path, prices, *, since: float | None = None, until: float | None = None,
            dry_run: bool = False) -> RepriceSummary:
    """Reprice every row with something to price in [since, until); returns what changed."""
    db = connect(db_path)
    summary = RepriceSummary()
    try:
        where, params = ["billing != 'none'", "usage_status IN ('exact', 'partial')"], []
        if since is not None:
            where.append("started_at >= ?")
            params.append(since)
        if until is not None:
            where.append("started_at < ?")
            params.append(until)
        query = (f"SELECT id, {', '.join(_COLUMNS)} FROM calls WHERE {' AND '.join(where)} "
                 "AND id > ? ORDER BY id LIMIT ?")
        known = dict(db.execute("SELECT rates_json, id FROM pricing_rates"))
        last_id = 0
        while True:
            batch = db.execute(query, (*params, last_id, BATCH_ROWS)).fetchall()
            if not batch:
                break
            last_id = batch[-1][0]
            if dry_run:
                _reprice_batch(db, batch, prices, summary, known, dry_run=True)
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                updates = _reprice_batch(db, batch, prices, summary, known, dry_run=False)
                db.executemany("UPDATE calls SET cost_nanousd = ?, price_model = ?, pricing_id = ?, "
                               "unpriced_reason = ? WHERE id = ?", updates)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if not dry_run:
            write_audit(db, "reprice", {"since": since, "until": until, "examined": summary.examined,
                                   "changed": summary.changed, "before_nanousd": summary.before_nanousd,
                                   "after_nanousd": summary.after_nanousd})
    finally:
        db.close()
    return summary


def _reprice_batch(db: sqlite3.Connection, batch: list[tuple], prices, summary: RepriceSummary,
                   known: dict[str, int], *, dry_run: bool) -> list[tuple]:
    """Quote each row; the UPDATE parameters of those whose cost or rates changed."""
    updates = []
    for values in batch:
        row = CallRow(*values[1:])
        quote = price_row(prices, row)
        summary.examined += 1
        summary.before_nanousd += row.cost_nanousd or 0
        summary.after_nanousd += quote.cost_nanousd or 0
        summary.unpriced_before += row.unpriced_reason is not None
        summary.unpriced_after += quote.unpriced_reason is not None
        pricing_id = known.get(quote.rates_json) if quote.rates_json is not None else None
        if quote.rates_json is not None and pricing_id is None and not dry_run:
            pricing_id = known[quote.rates_json] = _pricing_id(db, quote.model_key, quote.rates_json,
                                                               row.started_at)
        if (quote.cost_nanousd, quote.model_key, quote.unpriced_reason) == (
                row.cost_nanousd, row.price_model, row.unpriced_reason) and pricing_id == row.pricing_id:
            continue
        summary.changed += 1
        updates.append((quote.cost_nanousd, quote.model_key, pricing_id, quote.unpriced_reason, values[0]))
    return updates
