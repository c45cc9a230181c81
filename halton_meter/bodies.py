"""Request and response bodies: captured beside the relay, redacted and stored by the ledger
writer, and the `bodies show|purge|stats` commands.

The relay only keeps references to the chunks it already forwarded (bounded per body); joining,
decoding, redaction and truncation happen in the writer thread, never on the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import TextIO

from halton_meter.config import BodySettings
from halton_meter.redaction import CATEGORIES, merge_counts, redact_headers, redact_text

SWEEP_INTERVAL_S = 86400.0
# Kept beyond the limit so a secret straddling the cut is still whole when redaction runs (the
# largest shape, a PEM private key, is matched up to 16 KiB; redaction.py).
REDACTION_MARGIN_BYTES = 16 * 1024
# Never stored from the end of a cut capture: longer than any key shape but a PEM block, which
# redaction.py redacts even when its END line is missing.
_CUT_TAIL_BYTES = 1024
# Bodies of these types are not text: their size is recorded, their bytes are not.
_BINARY_TYPES = ("image/", "audio/", "video/", "application/octet-stream", "application/pdf",
                 "application/zip", "application/grpc", "application/x-protobuf", "application/protobuf")
STORED_COLUMNS = ("call_id", "captured_at", "request_headers", "request_body", "request_bytes",
                  "request_truncated", "response_headers", "response_body", "response_bytes",
                  "response_truncated", "redactions")
INSERT_BODIES = (f"INSERT OR REPLACE INTO request_bodies ({', '.join(STORED_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(STORED_COLUMNS))})")


class BodyCapture:
    """One call's bodies as forwarded: chunk references up to a bound, plus the full sizes."""

    __slots__ = ("limit", "request_headers", "request_parts", "request_kept", "request_bytes",
                 "response_headers", "response_parts", "response_kept", "response_bytes")

    def __init__(self, request_headers: list[tuple[str, str]], max_body_bytes: int) -> None:
        self.limit = max_body_bytes + REDACTION_MARGIN_BYTES
        self.request_headers = request_headers
        self.request_parts: list[bytes] = []
        self.request_kept = self.request_bytes = 0
        self.response_headers: list[tuple[str, str]] = []
        self.response_parts: list[bytes] = []
        self.response_kept = self.response_bytes = 0

    def add_request(self, data: bytes) -> None:
        self.request_bytes += len(data)
        if self.request_kept < self.limit:
            self.request_parts.append(data)
            self.request_kept += len(data)

    def add_response(self, data: bytes) -> None:
        """The decoded (content-coding removed) response body, piece by piece."""
        self.response_bytes += len(data)
        if self.response_kept < self.limit:
            self.response_parts.append(data)
            self.response_kept += len(data)


def stored_values(call_id: str, at: float, capture: BodyCapture, max_body_bytes: int) -> tuple:
    """The request_bodies row for a capture: redacted, then cut to `max_body_bytes` per body."""
    request_headers, header_counts = redact_headers(capture.request_headers)
    response_headers, response_header_counts = redact_headers(capture.response_headers)
    # The relay forwards a compressed upload as it is; responses are captured decoded.
    request_body, request_cut, request_counts = _body_text(
        capture.request_parts, capture.request_bytes, request_headers, max_body_bytes, check_coding=True)
    response_body, response_cut, response_counts = _body_text(
        capture.response_parts, capture.response_bytes, response_headers, max_body_bytes)
    counts = merge_counts(header_counts, response_header_counts, request_counts, response_counts)
    return (call_id, at, json.dumps(request_headers), request_body, capture.request_bytes, int(request_cut),
            json.dumps(response_headers), response_body, capture.response_bytes, int(response_cut),
            json.dumps(counts, sort_keys=True))


def _body_text(parts: list[bytes], total_bytes: int, headers: list[tuple[str, str]], max_body_bytes: int, *,
               check_coding: bool = False) -> tuple[str | None, bool, dict[str, int]]:
    """(stored text or None, whether it was cut, redaction counts)."""
    if not parts:
        return None, False, {}
    fields = {name.lower(): value.lower().strip() for name, value in headers}
    if fields.get("content-type", "").startswith(_BINARY_TYPES):
        return None, False, {}
    if check_coding and fields.get("content-encoding", "identity") != "identity":
        return None, False, {}
    kept = b"".join(parts)
    text, counts = redact_text(kept.decode("utf-8", errors="replace"))
    encoded = text.encode("utf-8")
    limit = max_body_bytes
    if len(kept) < total_bytes:
        # The capture itself was cut, mid-secret perhaps: redaction may have shortened the text
        # enough to bring that tail inside the limit, so never store its last bytes.
        limit = min(limit, len(encoded) - _CUT_TAIL_BYTES)
    if len(encoded) <= limit:
        return text, False, counts
    return encoded[:max(0, limit)].decode("utf-8", errors="ignore"), True, counts


# --- commands -------------------------------------------------------------------------------


def show(db: sqlite3.Connection, call_id: str, *, as_json: bool, out: TextIO) -> int:
    """`bodies show CALL_ID` (a unique prefix is enough): the call, its headers and bodies."""
    matches = db.execute(
        "SELECT b.call_id, b.captured_at, b.request_headers, b.request_body, b.request_bytes, "
        "b.request_truncated, b.response_headers, b.response_body, b.response_bytes, b.response_truncated, "
        "b.redactions, c.method, c.host, c.path, c.status, COALESCE(c.project, 'default'), c.model "
        "FROM request_bodies b LEFT JOIN calls c ON c.call_id = b.call_id "
        "WHERE b.call_id >= ? AND b.call_id < ? ORDER BY b.call_id LIMIT 2",
        (call_id, call_id + "\U0010ffff")).fetchall()
    if not matches:
        print(f"halton-meter bodies: no stored bodies for call {call_id!r}. Calls made while body "
              "capture was off, or older than the retention period, have none; "
              "`halton-meter tail` lists call ids.", file=sys.stderr)
        return 1
    if len(matches) > 1:
        print(f"halton-meter bodies: {call_id!r} matches more than one call; give more of the id.",
              file=sys.stderr)
        return 2
    row = dict(zip(STORED_COLUMNS + ("method", "host", "path", "status", "project", "model"), matches[0]))
    for name in ("request_headers", "response_headers", "redactions"):
        row[name] = json.loads(row[name])
    for name in ("request_truncated", "response_truncated"):
        row[name] = bool(row[name])
    if as_json:
        out.write(json.dumps(row, indent=2, ensure_ascii=False) + "\n")
        return 0
    out.write(f"call      {row['call_id']}\n")
    out.write(f"          {row['method']} https://{row['host']}{row['path']} -> {row['status']}  "
              f"project {row['project']}  model {row['model']}\n")
    redacted = ", ".join(f"{name} {n}" for name, n in row["redactions"].items()) or "none"
    out.write(f"redacted  {redacted}\n")
    for side in ("request", "response"):
        out.write(f"\n--- {side} ({_size(row[f'{side}_bytes'])}"
                  f"{', truncated' if row[f'{side}_truncated'] else ''}) ---\n")
        for name, value in row[f"{side}_headers"]:
            out.write(f"{name}: {value}\n")
        out.write("\n" + _pretty(row[f"{side}_body"], row[f"{side}_bytes"]) + "\n")
    return 0


def purge(db: sqlite3.Connection, older_than_s: float, *, vacuum: bool, out: TextIO, now: float) -> int:
    """`bodies purge --older-than 30d [--vacuum]`: delete stored bodies captured before then."""
    cutoff = now - older_than_s
    deleted = db.execute("DELETE FROM request_bodies WHERE captured_at < ?", (cutoff,)).rowcount
    out.write(f"Deleted the stored bodies of {deleted} call(s) captured before "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(cutoff))}.\n")
    if vacuum:
        db.execute("VACUUM")
        out.write("Compacted the ledger (VACUUM): the freed space is back on disk.\n")
    elif deleted:
        out.write("The space is reused by new rows; add --vacuum to give it back to the disk now.\n")
    return 0


def sweep(db: sqlite3.Connection, retention_days: int, now: float) -> int:
    """Delete bodies older than the retention period (the daemon's daily sweep)."""
    return db.execute("DELETE FROM request_bodies WHERE captured_at < ?",
                      (now - retention_days * 86400,)).rowcount


def stats(db: sqlite3.Connection | None, settings: BodySettings, *, as_json: bool, out: TextIO) -> int:
    """`bodies stats`: how much is stored, how much was cut, what redaction removed (`db` None:
    no ledger yet, so nothing)."""
    calls, stored, truncated, oldest, newest = 0, 0, 0, None, None
    counts: dict[str, int] = {}
    overrides: dict[str, int] = {}
    if db is not None:
        calls, stored, truncated, oldest, newest = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(COALESCE(LENGTH(CAST(request_body AS BLOB)), 0) + "
            "COALESCE(LENGTH(CAST(response_body AS BLOB)), 0) + LENGTH(request_headers) + "
            "LENGTH(response_headers)), 0), COALESCE(SUM(request_truncated + response_truncated), 0), "
            "MIN(captured_at), MAX(captured_at) FROM request_bodies").fetchone()
        counts = dict(db.execute("SELECT e.key, SUM(e.value) FROM request_bodies, "
                                 "json_each(request_bodies.redactions) e GROUP BY e.key"))
        overrides = dict(db.execute("SELECT name, body_capture FROM projects WHERE body_capture IS NOT NULL"))
    redactions = {name: counts.get(name, 0) for name in CATEGORIES}
    result = {
        "enabled": settings.enabled, "max_body_bytes": settings.max_body_bytes,
        "retention_days": settings.retention_days, "calls_with_bodies": calls, "stored_bytes": stored,
        "truncated_bodies": truncated, "oldest": oldest, "newest": newest,
        "redactions": redactions, "redactions_total": sum(redactions.values()),
        "project_overrides": {name: bool(value) for name, value in sorted(overrides.items())},
    }
    if as_json:
        out.write(json.dumps(result, indent=2) + "\n")
        return 0
    state = "on" if settings.enabled else "off"
    out.write(f"Body capture {state} by default; {_size(settings.max_body_bytes)} per body; "
              f"kept {settings.retention_days} days.\n")
    for name, value in result["project_overrides"].items():
        out.write(f"  project {name}: {'on' if value else 'off'}\n")
    span = ""
    if oldest is not None:
        span = (f", {time.strftime('%Y-%m-%d', time.localtime(oldest))} to "
                f"{time.strftime('%Y-%m-%d', time.localtime(newest))}")
    out.write(f"{calls} call(s) with stored bodies, {_size(stored)}{span}; {truncated} body(ies) truncated.\n")
    out.write(f"Secrets redacted before storing: {result['redactions_total']}\n")
    for name, value in redactions.items():
        if value:
            out.write(f"  {name:<22}{value:>8}\n")
    return 0


def _pretty(body: str | None, size: int) -> str:
    if body is None:
        return "(empty)" if size == 0 else f"(binary body, {_size(size)}, not stored)"
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        return body


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def open_for_commands(db_path: Path) -> sqlite3.Connection | None:
    """The ledger for the bodies commands (migrated like every opener); None when absent."""
    from halton_meter.ledger import connect

    return connect(db_path) if db_path.exists() else None
