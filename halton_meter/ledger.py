"""The SQLite ledger: schema migrations and the single batching writer.

The event loop hands finished calls to `Ledger.record`, which only enqueues; one writer thread owns
the connection and commits up to 32 rows per transaction, so disk latency never reaches traffic.
"""

from __future__ import annotations

import json
import logging
import operator
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from halton_meter.bodies import INSERT_BODIES, stored_values, sweep
from halton_meter.config import BodySettings

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 32
RETRY_PAUSE_S = 0.2  # between attempts at a failed commit (a locked or briefly full disk)
# When idle, how often the writer looks for `project` command changes (aliases, body capture).
SETTINGS_POLL_S = 0.25
# Captured bodies waiting for the writer; past this, new calls are recorded without theirs.
MAX_QUEUED_BODY_BYTES = 64 * 1024 * 1024
_STOP = object()


@dataclass(slots=True)
class CallRow:
    """One call through the proxy: what the relay saw, what the adapter read, what it cost."""

    call_id: str
    started_at: float  # unix seconds
    host: str
    method: str
    path: str
    status: int | None = None
    outcome: str = "ok"  # ok | provider_error | client_cancelled | upstream_error | unparsed | …
    error: str | None = None
    is_stream: bool = False
    request_bytes: int = 0  # bytes relayed to the provider, head and body, as on the wire
    response_bytes: int = 0  # bytes relayed to the client, head and body, as on the wire
    ttfb_ms: float | None = None
    duration_ms: float | None = None
    project: str | None = None
    model: str | None = None  # the model the call ran on: returned by the provider, else requested
    user_agent: str | None = None
    parse_error: str | None = None
    # schema 2: what the adapter read
    provider: str | None = None
    endpoint: str | None = None
    client: str | None = None  # client family from User-Agent (claude-code, openai-python, curl…)
    request_id: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    service_tier: str | None = None
    error_type: str | None = None
    billing: str = "none"  # tokens | free | none (adapters/base.py)
    usage_status: str = "none"  # exact | partial | unknown | none | duplicate
    input_tokens: int = 0  # uncached input
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_write_30m_tokens: int = 0
    cache_write_12h_tokens: int = 0
    output_tokens: int = 0  # billed output, reasoning included
    reasoning_tokens: int | None = None  # subset of output_tokens
    billed_items: str | None = None  # JSON object, e.g. {"web_search_requests": 2}
    usage_json: str | None = None  # the provider's usage, verbatim
    provider_cost_nanousd: int | None = None  # what the provider says it charged (OpenRouter, xAI)
    # Rows summing several requests (batch results): their smallest and largest prompt, for tiers.
    smallest_prompt_tokens: int | None = None
    largest_prompt_tokens: int | None = None
    # priced by the writer thread
    cost_nanousd: int | None = None  # NULL: unpriced (see unpriced_reason) or nothing to price
    price_model: str | None = None  # the rate-table key used
    pricing_id: int | None = None  # pricing_rates row holding the exact rates applied
    unpriced_reason: str | None = None
    # schema 3: where `project` came from (attribution.py): header | proxy_auth | process_env |
    # git_repo | rule_cwd | rule_process | default
    project_source: str | None = None
    # not a column: the call's captured bodies (bodies.BodyCapture), stored by the writer if the
    # project's body capture is on
    bodies: object | None = field(default=None, repr=False, compare=False)


_COLUMNS = tuple(f.name for f in fields(CallRow) if f.name != "bodies")
# Not dataclasses.astuple: it deep-copies every field, which was 75% of the writer's time.
_row_values = operator.attrgetter(*_COLUMNS)
_INSERT = f"INSERT INTO calls ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def _migrate_to_1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE calls (
            id INTEGER PRIMARY KEY,
            call_id TEXT NOT NULL UNIQUE,
            started_at REAL NOT NULL,
            host TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            status INTEGER,
            outcome TEXT NOT NULL,
            error TEXT,
            is_stream INTEGER NOT NULL,
            request_bytes INTEGER NOT NULL,
            response_bytes INTEGER NOT NULL,
            ttfb_ms REAL,
            duration_ms REAL,
            project TEXT,
            model TEXT,
            user_agent TEXT,
            parse_error TEXT
        )"""
    )
    db.execute("CREATE INDEX calls_started_at ON calls (started_at)")


_V2_CALL_COLUMNS = (
    "provider TEXT", "endpoint TEXT", "client TEXT", "request_id TEXT", "request_model TEXT",
    "response_model TEXT", "service_tier TEXT", "error_type TEXT",
    "billing TEXT NOT NULL DEFAULT 'none'", "usage_status TEXT NOT NULL DEFAULT 'none'",
    "input_tokens INTEGER NOT NULL DEFAULT 0", "cache_read_tokens INTEGER NOT NULL DEFAULT 0",
    "cache_write_5m_tokens INTEGER NOT NULL DEFAULT 0", "cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0",
    "cache_write_30m_tokens INTEGER NOT NULL DEFAULT 0", "cache_write_12h_tokens INTEGER NOT NULL DEFAULT 0",
    "output_tokens INTEGER NOT NULL DEFAULT 0", "reasoning_tokens INTEGER", "billed_items TEXT",
    "usage_json TEXT", "provider_cost_nanousd INTEGER", "smallest_prompt_tokens INTEGER",
    "largest_prompt_tokens INTEGER", "cost_nanousd INTEGER", "price_model TEXT",
    "pricing_id INTEGER REFERENCES pricing_rates (id)", "unpriced_reason TEXT",
)


def _migrate_to_2(db: sqlite3.Connection) -> None:
    """Usage, cost and attribution: the full call row, plus projects, rates used, audit events."""
    db.execute(
        """CREATE TABLE pricing_rates (
            id INTEGER PRIMARY KEY,
            model_key TEXT NOT NULL,
            rates_json TEXT NOT NULL UNIQUE,
            first_used_at REAL NOT NULL
        )"""
    )
    for column in _V2_CALL_COLUMNS:
        db.execute(f"ALTER TABLE calls ADD COLUMN {column}")
    # v1 rows were written before hosts were mapped to providers.
    db.execute("UPDATE calls SET provider = CASE host "
               + " ".join(f"WHEN '{host}' THEN '{name}'" for host, name in _V1_PROVIDERS)
               + " ELSE 'unknown' END")
    db.execute(
        """CREATE TABLE projects (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL
        )"""
    )
    db.execute("INSERT OR IGNORE INTO projects (name, created_at) "
               "SELECT COALESCE(project, 'default'), MIN(started_at) FROM calls GROUP BY 1")
    db.execute(
        """CREATE TABLE audit_events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX calls_batch_id ON calls (request_id) WHERE endpoint = 'batch_results'")
    for ddl in REPORT_INDEXES:
        db.execute(ddl)
    write_audit(db, "schema_migrated", {"to_version": 2})


_V1_PROVIDERS = (
    ("api.anthropic.com", "anthropic"), ("api.openai.com", "openai"),
    ("generativelanguage.googleapis.com", "gemini"), ("cloudcode-pa.googleapis.com", "code_assist"),
    ("chatgpt.com", "codex"), ("api.x.ai", "xai"), ("cli-chat-proxy.grok.com", "grok_cli"),
    ("api.groq.com", "groq"), ("api.deepseek.com", "deepseek"), ("api.mistral.ai", "mistral"),
    ("openrouter.ai", "openrouter"),
)


# What `report` reads (report.py, tools/bench_ledger.py): the pair index lets it find every
# (project, model) by skipping along the index and sum one time range per pair with no sort, so a
# report over a million rows stays well under a second; it covers every column summed. The partial
# ones keep each call-out to the few rows it is about (their WHERE must match report.py's exactly).
REPORT_INDEXES = (
    "CREATE INDEX calls_report_pairs ON calls (project, model, started_at, input_tokens, "
    "cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_write_30m_tokens, "
    "cache_write_12h_tokens, output_tokens, cost_nanousd, duration_ms, unpriced_reason, provider, "
    "client, endpoint)",
    "CREATE INDEX calls_provider_errors ON calls (started_at, error_type) WHERE outcome = 'provider_error'",
    "CREATE INDEX calls_usage_gaps ON calls (started_at, usage_status) "
    "WHERE usage_status IN ('unknown', 'partial', 'duplicate')",
    "CREATE INDEX calls_provider_cost ON calls (started_at, provider_cost_nanousd, cost_nanousd) "
    "WHERE provider_cost_nanousd IS NOT NULL",
    "CREATE INDEX calls_unpriced ON calls (started_at, model, unpriced_reason, input_tokens, "
    "cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_write_30m_tokens, "
    "cache_write_12h_tokens, output_tokens) WHERE unpriced_reason IS NOT NULL",
)


def write_audit(db: sqlite3.Connection, kind: str, detail: dict) -> None:
    db.execute("INSERT INTO audit_events (at, kind, detail) VALUES (?, ?, ?)",
               (time.time(), kind, json.dumps(detail, sort_keys=True)))


def _migrate_to_3(db: sqlite3.Connection) -> None:
    """Attribution source, per-project body capture, stored bodies, and the OTLP shipped marker."""
    db.execute("ALTER TABLE calls ADD COLUMN project_source TEXT")
    # Set once a row has been accepted by the OTLP collector (otlp.py); NULL: not shipped yet.
    db.execute("ALTER TABLE calls ADD COLUMN exported_at REAL")
    # NULL follows `[bodies] enabled`; 0 or 1 overrides it for the project.
    db.execute("ALTER TABLE projects ADD COLUMN body_capture INTEGER")
    db.execute(
        """CREATE TABLE request_bodies (
            call_id TEXT PRIMARY KEY,
            captured_at REAL NOT NULL,
            request_headers TEXT NOT NULL,
            request_body TEXT,
            request_bytes INTEGER NOT NULL,
            request_truncated INTEGER NOT NULL,
            response_headers TEXT NOT NULL,
            response_body TEXT,
            response_bytes INTEGER NOT NULL,
            response_truncated INTEGER NOT NULL,
            redactions TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX request_bodies_captured_at ON request_bodies (captured_at)")
    # `project rename` / `merge` leave the old name here, so calls still arriving under it (a
    # header, a repository name) are recorded under the new one.
    db.execute(
        """CREATE TABLE project_aliases (
            alias TEXT PRIMARY KEY,
            project TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE export_state (
            name TEXT PRIMARY KEY,
            state_json TEXT NOT NULL,
            updated_at REAL NOT NULL
        )"""
    )
    write_audit(db, "schema_migrated", {"to_version": 3})


def _migrate_to_4(db: sqlite3.Connection) -> None:
    """Budgets, model policies and the events they raise (budgets.py)."""
    db.execute(
        """CREATE TABLE budgets (
            id INTEGER PRIMARY KEY,
            project TEXT,  -- NULL: every project
            provider TEXT,  -- NULL: every provider
            period TEXT NOT NULL CHECK (period IN ('daily', 'weekly', 'monthly')),
            limit_nanousd INTEGER NOT NULL CHECK (limit_nanousd > 0),
            action TEXT NOT NULL CHECK (action IN ('warn', 'block')),
            created_at REAL NOT NULL
        )"""
    )
    # One budget per scope and period: `budget set` again replaces its amount and action.
    db.execute("CREATE UNIQUE INDEX budgets_scope ON budgets (coalesce(project, ''), coalesce(provider, ''), period)")
    db.execute(
        """CREATE TABLE model_policies (
            id INTEGER PRIMARY KEY,
            project TEXT,  -- NULL: every project
            kind TEXT NOT NULL CHECK (kind IN ('allow', 'deny')),
            pattern TEXT NOT NULL,  -- a glob on the model name, case-insensitive
            created_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE UNIQUE INDEX model_policies_rule ON model_policies (coalesce(project, ''), kind, pattern)")
    db.execute(
        """CREATE TABLE policy_events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,  -- budget_warning | budget_exceeded | budget_blocking | call_blocked | model_blocked
            budget_id INTEGER,
            policy_id INTEGER,
            project TEXT,
            provider TEXT,
            model TEXT,
            period_start REAL,
            spend_nanousd INTEGER,
            limit_nanousd INTEGER,
            message TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX policy_events_at ON policy_events (at)")
    write_audit(db, "schema_migrated", {"to_version": 4})


# Ordered: MIGRATIONS[n] takes the schema from version n to n + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_to_1, _migrate_to_2, _migrate_to_3, _migrate_to_4]
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path) -> sqlite3.Connection:
    """Open the ledger, creating and migrating it as needed (WAL, synchronous=NORMAL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    for attempt in range(100):
        try:
            # Switching a new file to WAL takes an exclusive lock that SQLite does not wait for
            # (no busy handler): several processes opening it at once retry here.
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if attempt == 99:
                db.close()
                raise
            time.sleep(0.02)
    db.execute("PRAGMA synchronous=NORMAL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        db.close()
        raise sqlite3.DatabaseError(
            f"{path} has schema version {version}, newer than this halton-meter ({SCHEMA_VERSION}). "
            "Upgrade halton-meter."
        )
    for target in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        if db.execute("PRAGMA user_version").fetchone()[0] > target:
            db.execute("COMMIT")  # another process migrated while we waited for the lock
            continue
        try:
            MIGRATIONS[target](db)
            db.execute(f"PRAGMA user_version = {target + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return db


@dataclass(slots=True)
class AuditEvent:
    kind: str
    detail: dict


@dataclass(slots=True)
class BodySweep:
    """Delete stored bodies past the retention period (queued daily by the daemon)."""

    retention_days: int


class Ledger:
    """Owns the writer thread. `record` never blocks; `close` flushes every pending row.

    The writer prices each row with `prices` (a pricing.PriceTable) before inserting it, so the
    event loop never does cost arithmetic, and stores the exact rates used in `pricing_rates`.
    """

    def __init__(self, path: Path, prices: object | None = None, bodies: BodySettings | None = None) -> None:
        self.path = path
        self.prices = prices
        self.bodies = bodies or BodySettings(enabled=False)
        # Whether any call may need its bodies: on by default, or on for some project. The relay
        # reads it to skip capture entirely; the writer keeps it current.
        self.captures_bodies = self.bodies.enabled
        # Called by the writer thread, in order, with each list of rows just committed.
        self.commit_listeners: list[Callable[[list[CallRow]], None]] = []
        self.bodies_dropped = 0  # calls whose bodies were not kept because the writer was behind
        self._queued_body_bytes = 0
        self._bodies_lock = threading.Lock()
        self.rows_written = 0
        self.rows_lost = 0
        self._closed = False
        self._in_flight = 0  # rows taken off the queue and not yet written or lost
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._pricing_ids: dict[str, int] = {}  # rates_json -> pricing_rates.id, committed ones
        self._projects: set[str] = set()  # project names known to be in `projects`
        self._batch_ids: dict[str, str] = {}  # "provider:batch id" -> usage_status counted
        # Read from the database, refreshed whenever another connection commits (data_version).
        self._data_version: int | None = None
        self._aliases: dict[str, str] = {}
        self._body_overrides: dict[str, bool] = {}
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)

    def start(self) -> None:
        """Start the writer; raises if the database cannot be opened or migrated."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def record(self, row: CallRow) -> None:
        if self._closed:
            self._lose(1)  # after shutdown: counted, never silently dropped
            return
        if row.bodies is not None:
            size = row.bodies.request_kept + row.bodies.response_kept
            with self._bodies_lock:
                if self._queued_body_bytes + size > MAX_QUEUED_BODY_BYTES:
                    # The writer is behind: keep the row, not its bodies (counted, logged once).
                    row.bodies = None
                    self.bodies_dropped += 1
                    if self.bodies_dropped == 1:
                        log.warning("bodies_dropped reason=writer_behind queued_bytes=%d", self._queued_body_bytes)
                else:
                    self._queued_body_bytes += size
        self._queue.put(row)

    def audit(self, kind: str, **detail: object) -> None:
        """Queue an audit event (start, stop, loss…); written in order with the rows."""
        if not self._closed:
            self._queue.put(AuditEvent(kind, detail))

    def sweep_bodies(self) -> None:
        """Queue the deletion of stored bodies older than `retention_days`."""
        if not self._closed:
            self._queue.put(BodySweep(self.bodies.retention_days))

    def close(self, timeout: float = 30.0) -> None:
        """Flush every pending row; rows still unwritten after `timeout` are counted as lost."""
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck (a lock held elsewhere, a hung disk): the process is about to exit with it.
            self._lose(sum(isinstance(item, CallRow) for item in self._pending()) + self._in_flight)

    def _pending(self) -> list[object]:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        try:
            db = connect(self.path)
            self._refresh_project_settings(db)
        except BaseException as exc:  # reported to start()'s caller
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            stopping = False
            while not stopping:
                try:
                    batch = [self._queue.get(timeout=SETTINGS_POLL_S)]
                except queue.Empty:
                    self._refresh_quietly(db)
                    continue
                while len(batch) < MAX_BATCH_ROWS:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if _STOP in batch:
                    stopping = True
                    batch.extend(self._pending())
                    batch = [item for item in batch if item is not _STOP]
                self._in_flight = sum(isinstance(item, CallRow) for item in batch)
                for start in range(0, len(batch), MAX_BATCH_ROWS):
                    part = batch[start : start + MAX_BATCH_ROWS]
                    self._write(db, part)
                    self._in_flight = max(0, self._in_flight - sum(isinstance(i, CallRow) for i in part))
        finally:
            db.close()

    def _write(self, db: sqlite3.Connection, items: list) -> None:
        """Commit `items` in one transaction; never raises, so the writer thread never dies.

        A batch rejected for its content is retried row by row, so one bad row costs only itself;
        a database that is locked, full or read-only gets three tries, then the batch is lost
        (counted and logged).
        """
        if not items:
            return
        rows = [item for item in items if isinstance(item, CallRow)]
        # With the aliases as last read (idle polling keeps them fresh), for the body decision;
        # _insert reads them again inside the write transaction, where it counts.
        self._resolve_aliases(rows)
        rates = {id(row): self._price(row) for row in rows}
        bodies = {id(row): self._body_values(row) for row in rows if row.bodies is not None}
        for attempt in range(3):
            try:
                self._insert(db, items, rates, bodies)
                self.rows_written += len(rows)
                break
            except sqlite3.OperationalError as exc:
                log.error("ledger_write_failed rows=%d attempt=%d error=%r", len(rows), attempt + 1, exc)
                time.sleep(RETRY_PAUSE_S * (attempt + 1))
            except Exception:  # noqa: BLE001 - a row sqlite rejects (constraint, unbindable value)
                self._write_one_by_one(db, items, rates, bodies)
                break
        else:
            self._lose(len(rows))
            return
        if rows:
            for listener in self.commit_listeners:
                try:
                    listener(rows)
                except Exception:  # noqa: BLE001 - a listener's bug must not touch the rows
                    log.exception("ledger_commit_listener_failed")

    def _write_one_by_one(self, db: sqlite3.Connection, items: list, rates: dict[int, str | None],
                          bodies: dict[int, tuple | None]) -> None:
        for item in items:
            try:
                self._insert(db, [item], rates, bodies)
                if isinstance(item, CallRow):
                    self.rows_written += 1
            except Exception as exc:  # noqa: BLE001
                if isinstance(item, CallRow):
                    log.error("ledger_row_rejected call_id=%s error=%r", item.call_id, exc)
                    self._lose(1)
                else:
                    log.error("ledger_item_rejected item=%s error=%r", type(item).__name__, exc)

    def _price(self, row: CallRow) -> str | None:
        """Fill the cost columns; returns the exact rates applied, as JSON (None: none applied)."""
        if self.prices is None:
            return None
        try:
            quote = price_row(self.prices, row)
        except Exception as exc:  # noqa: BLE001 - a pricing bug must not cost the row
            log.exception("pricing_failed call_id=%s", row.call_id)
            row.cost_nanousd, row.unpriced_reason = None, f"pricing failed: {type(exc).__name__}"
            return None
        row.cost_nanousd, row.price_model = quote.cost_nanousd, quote.model_key
        row.unpriced_reason = quote.unpriced_reason
        return quote.rates_json

    def _refresh_project_settings(self, db: sqlite3.Connection) -> None:
        """Re-read aliases and body-capture overrides when another connection changed the file
        (`project rename|merge|set`); PRAGMA data_version makes the check one cheap read."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        self._data_version = version
        self._aliases = dict(db.execute("SELECT alias, project FROM project_aliases"))
        self._body_overrides = {name: bool(value) for name, value in db.execute(
            "SELECT name, body_capture FROM projects WHERE body_capture IS NOT NULL")}
        self._projects.clear()  # a merge may have removed a project row
        self.captures_bodies = self.bodies.enabled or any(self._body_overrides.values())

    def _resolve_aliases(self, rows: list[CallRow]) -> None:
        for row in rows:
            project = row.project or "default"
            if project in self._aliases:
                row.project = self._aliases[project]

    def _refresh_quietly(self, db: sqlite3.Connection) -> None:
        try:
            self._refresh_project_settings(db)
        except sqlite3.Error as exc:
            log.warning("project_settings_unreadable error=%r", exc)

    def _body_values(self, row: CallRow) -> tuple | None:
        """The redacted request_bodies row for `row`, or None when its project does not keep bodies."""
        capture, row.bodies = row.bodies, None  # the chunks are freed once stored
        with self._bodies_lock:
            self._queued_body_bytes -= capture.request_kept + capture.response_kept
        if not self._body_overrides.get(row.project or "default", self.bodies.enabled):
            return None
        try:
            return stored_values(row.call_id, row.started_at, capture, self.bodies.max_body_bytes)
        except Exception:  # noqa: BLE001 - a redaction bug costs the body, never the row
            log.exception("body_capture_failed call_id=%s", row.call_id)
            return None

    def _insert(self, db: sqlite3.Connection, items: list, rates: dict[int, str | None],
                bodies: dict[int, tuple | None]) -> None:
        new_ids: dict[str, int] = {}
        new_projects: set[str] = set()
        new_batches: dict[str, str] = {}
        values = []
        body_values = []
        # IMMEDIATE: no `project rename|merge` can commit between reading the aliases and
        # writing rows that use them.
        db.execute("BEGIN IMMEDIATE")
        try:
            self._refresh_project_settings(db)
            self._resolve_aliases([item for item in items if isinstance(item, CallRow)])
            for item in items:
                if isinstance(item, AuditEvent):
                    write_audit(db, item.kind, item.detail)
                    continue
                if isinstance(item, BodySweep):
                    deleted = sweep(db, item.retention_days, time.time())
                    if deleted:
                        write_audit(db, "bodies_swept", {"calls": deleted, "retention_days": item.retention_days})
                    continue
                if bodies.get(id(item)) is not None:
                    body_values.append(bodies[id(item)])
                rates_json = rates.get(id(item))
                if self._is_duplicate_batch(db, item, new_batches):
                    rates_json = None
                if rates_json is not None:
                    item.pricing_id = self._pricing_ids.get(rates_json) or new_ids.get(rates_json)
                    if item.pricing_id is None:
                        item.pricing_id = _pricing_id(db, item.price_model, rates_json, item.started_at)
                        new_ids[rates_json] = item.pricing_id
                project = item.project or "default"
                if project not in self._projects and project not in new_projects:
                    db.execute("INSERT OR IGNORE INTO projects (name, created_at) VALUES (?, ?)",
                               (project, item.started_at))
                    new_projects.add(project)
                values.append(_row_values(item))
            db.executemany(_INSERT, values)
            if body_values:
                db.executemany(INSERT_BODIES, body_values)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error is the one worth reporting
            raise
        self._pricing_ids.update(new_ids)
        self._projects |= new_projects
        self._batch_ids.update(new_batches)

    def _is_duplicate_batch(self, db: sqlite3.Connection, row: CallRow, seen: dict[str, str]) -> bool:
        """A batch's results downloaded again are not new spend: kept for audit, counted 0.

        The first complete download counts. A partial one counts only until a complete one
        arrives, which then marks the earlier partial ones duplicates.
        """
        if row.usage_status == "duplicate":
            return True  # already decided, in an earlier attempt at this batch
        if row.endpoint != "batch_results" or not row.request_id or row.usage_status not in ("exact", "partial"):
            return False
        key = f"{row.provider}:{row.request_id}"
        counted = seen.get(key) or self._batch_ids.get(key)
        if counted is None:
            found = db.execute(
                "SELECT usage_status FROM calls WHERE endpoint = 'batch_results' AND request_id = ? "
                "AND provider IS ? AND usage_status IN ('exact', 'partial') ORDER BY usage_status = 'exact' DESC "
                "LIMIT 1", (row.request_id, row.provider)).fetchone()
            counted = found[0] if found else None
        if counted == "exact" or (counted == "partial" and row.usage_status == "partial"):
            _zero_usage(row)
            return True
        if counted == "partial":  # this complete download supersedes the partial ones
            db.execute(
                f"UPDATE calls SET usage_status = 'duplicate', {', '.join(f'{c} = 0' for c in _TOKEN_COLUMNS)}, "
                "reasoning_tokens = NULL, cost_nanousd = 0, price_model = NULL, pricing_id = NULL, "
                "unpriced_reason = NULL WHERE endpoint = 'batch_results' AND request_id = ? AND provider IS ? "
                "AND usage_status = 'partial'", (row.request_id, row.provider))
        seen[key] = row.usage_status
        return False

    def _lose(self, count: int) -> None:
        self.rows_lost += count
        log.error("ledger_rows_lost rows=%d total_lost=%d path=%s", count, self.rows_lost, self.path)


def _zero_usage(row: CallRow) -> None:
    row.usage_status = "duplicate"
    row.cost_nanousd, row.unpriced_reason, row.price_model, row.pricing_id = 0, None, None, None
    for name in _TOKEN_COLUMNS:
        setattr(row, name, 0)
    row.reasoning_tokens = None


_TOKEN_COLUMNS = ("input_tokens", "cache_read_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                  "cache_write_30m_tokens", "cache_write_12h_tokens", "output_tokens")


def _pricing_id(db: sqlite3.Connection, model_key: str | None, rates_json: str, at: float) -> int:
    db.execute("INSERT OR IGNORE INTO pricing_rates (model_key, rates_json, first_used_at) VALUES (?, ?, ?)",
               (model_key or "", rates_json, at))
    return db.execute("SELECT id FROM pricing_rates WHERE rates_json = ?", (rates_json,)).fetchone()[0]


def row_usage(row: CallRow):
    """The row's counters as an adapters.base.Usage, for pricing and repricing."""
    from halton_meter.adapters.base import Usage

    items = json.loads(row.billed_items) if row.billed_items else {}
    return Usage(
        input_tokens=row.input_tokens, cache_read_tokens=row.cache_read_tokens,
        cache_write_5m_tokens=row.cache_write_5m_tokens, cache_write_1h_tokens=row.cache_write_1h_tokens,
        cache_write_30m_tokens=row.cache_write_30m_tokens,
        cache_write_12h_tokens=row.cache_write_12h_tokens, output_tokens=row.output_tokens,
        reasoning_tokens=row.reasoning_tokens, billed_items=items,
        request_prompt_range=None if row.largest_prompt_tokens is None
        else (row.smallest_prompt_tokens, row.largest_prompt_tokens),
    )


def price_row(prices, row: CallRow):
    """Quote a row's cost with a pricing.PriceTable (rows with nothing to price get a None cost)."""
    has_usage = row.usage_status in ("exact", "partial")
    return prices.price(
        provider=row.provider, models=(row.response_model, row.request_model),
        usage=row_usage(row) if has_usage else None, billing=row.billing,
        service_tier=row.service_tier, at=row.started_at,
    )
