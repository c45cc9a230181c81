"""The SQLite ledger: schema migrations and the single batching writer.

The event loop hands finished calls to `Ledger.record`, which only enqueues; one writer thread owns
the connection and commits up to 32 rows per transaction, so disk latency never reaches traffic.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from halton_meter.bodies import INSERT_BODIES, stored_values, sweep
from halton_meter.config import BodySettings, make_private_dir
from halton_meter.spool import Backlog, beat, gap_notes_path, heartbeat_path, last_beat, spool_dir, take_gap_notes

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 32
# A write the database refuses (locked, full, read-only) is tried again after this pause, doubling
# up to RETRY_MAX_PAUSE_S while the refusal lasts; its rows wait in memory meanwhile.
RETRY_PAUSE_S = 0.25
RETRY_MAX_PAUSE_S = 5.0
# How long one write waits for another connection's lock before its rows are held for a retry.
WRITER_BUSY_TIMEOUT_S = 2.0
# Rows held only in memory while the database refuses writes (about 1.1 KB each); past this they
# move to the spool (spool.py), which is safer anyway: it survives a crash. Rows read back from the
# spool to be replayed are held too, up to as many again.
MAX_WAITING_ROWS = 50_000
# How often the writer refreshes the daemon's heartbeat file (its last sign of life after a crash).
HEARTBEAT_S = 5.0
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
    make_private_dir(path.parent)
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
        # Budgets and model rules (budgets.PolicyEngine), loaded by the writer; None: none kept.
        self.policies = None
        self.bodies_dropped = 0  # calls whose bodies were not kept because the writer was behind
        self._queued_body_bytes = 0
        self._bodies_lock = threading.Lock()
        self.rows_written = 0
        self.rows_lost = 0
        self._closed = False
        self.rows_spooled = 0  # rows moved to the spool (spool.py) because the database refused them
        self.rows_replayed = 0  # rows read back from the spool (of this run or an earlier one) and written
        # The database's last refusal of a write: {"error", "since", "at", "ended_at"} (unix
        # seconds; ended_at None while it lasts, rows waiting in memory). None: never refused.
        self.last_write_error: dict | None = None
        # Set by the daemon before start(): the writer keeps its heartbeat there and, at start,
        # reports a previous run's crash (kept in `unclean_exit`) with the edge's gap notes.
        self.run_dir: Path | None = None
        self.unclean_exit: dict | None = None
        self._backlog = Backlog(spool_dir(path), lambda item: isinstance(item, CallRow))
        self._spool_unread = True  # spool files may be waiting to be replayed
        self._retry_pause = RETRY_PAUSE_S
        self._retry_at = 0.0  # time.monotonic() before which a refused write is not tried again
        self._next_beat = 0.0
        self._abandoned = False  # close() stopped waiting for a stuck writer
        # Losses the database could not record when they happened: audit events for the next commit.
        self._losses_to_record: list[dict] = []
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

    @property
    def rows_waiting(self) -> int:
        """Rows the writer holds and has not written yet: while the database refuses writes,
        every row recorded since (up to MAX_WAITING_ROWS, then they are spooled)."""
        return self._backlog.rows

    @property
    def refusing_writes(self) -> bool:
        """Whether the database refused the last write (rows wait in memory until it takes one)."""
        return self.last_write_error is not None and self.last_write_error["ended_at"] is None

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

    def record_event(self, event) -> None:
        """Queue a policy event (budgets.PolicyEvent: any item with `SQL` and `values()`)."""
        if not self._closed:
            self._queue.put(event)

    def canonical_project(self, name: str) -> str:
        """The name calls of project `name` are recorded under (a renamed project's new name)."""
        return self._aliases.get(name, name)

    def sweep_bodies(self) -> None:
        """Queue the deletion of stored bodies older than `retention_days`."""
        if not self._closed:
            self._queue.put(BodySweep(self.bodies.retention_days))

    def close(self, timeout: float = 30.0) -> None:
        """Flush every pending row; what the database still refuses goes to the spool. Rows the
        writer has not dealt with when `timeout` runs out (a hung disk) are counted lost."""
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck: the process is about to exit with it. Should it still write a row after this,
            # that row is counted lost as well: the count errs loud, never silent.
            self._abandoned = True
            self._lose(sum(isinstance(item, CallRow) for item in self._pending()) + self.rows_waiting)

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
            db.execute(f"PRAGMA busy_timeout = {round(WRITER_BUSY_TIMEOUT_S * 1000)}")
            self._refresh_project_settings(db)
        except BaseException as exc:  # reported to start()'s caller
            self._startup_error = exc
            self._ready.set()
            return
        try:
            self._load_spool()  # before any new row, and before judging how the last run ended
            if self.run_dir is not None:
                self._check_previous_exit(db)
        except Exception:  # noqa: BLE001 - costs a replay or a report, never metering
            log.exception("ledger_start_checks_failed")
        self._ready.set()
        try:
            while self._step(db):
                pass
        finally:
            db.close()

    def _step(self, db: sqlite3.Connection) -> bool:
        """One turn of the writer: take what was queued, then commit the oldest batch held (unless
        the database refused the last one and its pause is not over). False once told to stop."""
        if self._abandoned:
            return False
        self._beat()
        if self._spool_unread and not len(self._backlog) and time.monotonic() >= self._retry_at:
            self._load_spool()  # caught up (or due to try again): replay what was spooled
        if self._take_queued(self._wait_s()):
            self._finish(db)
            return False
        if self.refusing_writes and self._backlog.rows_only_here > MAX_WAITING_ROWS:
            self._spool_held("backlog_full")
        if not len(self._backlog):
            self._refresh_quietly(db)
        elif time.monotonic() >= self._retry_at:
            self._write(db, self._backlog.take(MAX_BATCH_ROWS))
        return True

    def _wait_s(self) -> float:
        """How long to wait for the queue: idle, until the next settings poll; with items held,
        until the pause after a refused write is over (0 when there is none)."""
        if not len(self._backlog):
            return SETTINGS_POLL_S
        return max(0.0, self._retry_at - time.monotonic())

    def _take_queued(self, timeout: float) -> bool:
        """Move everything queued behind the held items, waiting up to `timeout` for the first;
        True if told to stop (items queued after the signal are taken too)."""
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return False
        stop = False
        while True:
            if item is _STOP:
                stop = True
            else:
                self._backlog.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return stop

    def _finish(self, db: sqlite3.Connection) -> None:
        """Shutdown: one more try at everything held, without waiting out a pause; what the
        database still refuses goes to the spool, for the next start."""
        while len(self._backlog) and not self._abandoned:
            self._write(db, self._backlog.take(MAX_BATCH_ROWS))
            if self.refusing_writes:
                break
        if len(self._backlog) and not self._abandoned:
            self._spool_held("shutdown")

    def _write(self, db: sqlite3.Connection, items: list) -> None:
        """Commit `items` in one transaction; never raises, so the writer thread never dies.

        A batch rejected for its content is retried row by row, so one bad row costs only itself.
        A batch the database refuses (locked past the busy timeout, full, read-only, I/O error)
        goes back to the head of the backlog, to be tried again after a pause, while new rows
        queue behind it: nothing is lost and traffic never waits.
        """
        if not items:
            return
        # The body decision in _prepare follows the latest `project set … body-capture`: one
        # cheap PRAGMA read, not the last idle poll's view, which can be a quarter second old.
        self._refresh_quietly(db)
        self._prepare([item for item in items if isinstance(item, CallRow)])
        items = self._drop_already_written(db, items)
        if not items:
            return
        rates = {id(item): self._backlog.extras(item)["rates"] for item in items if isinstance(item, CallRow)}
        bodies = {id(item): self._backlog.extras(item)["body"] for item in items if isinstance(item, CallRow)}
        try:
            self._insert(db, items, rates, bodies)
        except sqlite3.OperationalError as exc:
            self._hold(items, exc)
        except Exception:  # noqa: BLE001 - a row sqlite rejects (constraint, unbindable value)
            self._write_one_by_one(db, items, rates, bodies)
        else:
            self._committed(items)

    def _write_one_by_one(self, db: sqlite3.Connection, items: list, rates: dict[int, str | None],
                          bodies: dict[int, tuple | None]) -> None:
        for index, item in enumerate(items):
            try:
                self._insert(db, [item], rates, bodies)
            except sqlite3.OperationalError as exc:
                self._hold(items[index:], exc)
                return
            except Exception as exc:  # noqa: BLE001
                self._reject(item, exc)
            else:
                self._committed([item])

    def _prepare(self, rows: list[CallRow]) -> None:
        """Price each row and take its stored body, once: a row held for a retry, or read back
        from the spool, keeps what it got."""
        fresh = [row for row in rows if self._backlog.extras(row) is None]
        # With the aliases as just read by _write, for the body decision; _insert reads them
        # again inside the write transaction, where it counts.
        self._resolve_aliases(fresh)
        for row in fresh:
            rates = self._price(row)
            body = self._body_values(row) if row.bodies is not None else None
            if body is not None and self._backlog.body_bytes > MAX_QUEUED_BODY_BYTES:
                body = None  # held bodies are bounded like queued ones: the row is kept, not its body
                self.bodies_dropped += 1
            self._backlog.keep_extras(row, {"rates": rates, "body": body})

    def _drop_already_written(self, db: sqlite3.Connection, items: list) -> list:
        """Rows replayed from the spool that are already in `calls` (the previous run stopped
        between committing them and deleting the file) are skipped, not written twice."""
        replayed = [item for item in items if isinstance(item, CallRow) and self._backlog.from_spool(item)]
        if not replayed:
            return items
        try:
            present = {found for (found,) in db.execute(
                f"SELECT call_id FROM calls WHERE call_id IN ({', '.join('?' * len(replayed))})",
                [row.call_id for row in replayed])}
        except sqlite3.Error:
            return items  # the write itself will tell what is wrong
        written = [row for row in replayed if row.call_id in present]
        if not written:
            return items
        log.info("ledger_replay_skipped rows=%d reason=already_in_ledger", len(written))
        self._backlog.settle(written)
        skipped = {id(row) for row in written}
        return [item for item in items if id(item) not in skipped]

    def _hold(self, items: list, exc: sqlite3.OperationalError) -> None:
        """The database refused the write: `items` go back to the head of the backlog and the
        next try waits RETRY_PAUSE_S, doubling up to RETRY_MAX_PAUSE_S while it lasts. Logged
        once when the outage starts."""
        self._backlog.put_back(items)
        now = time.time()
        error = f"{getattr(exc, 'sqlite_errorname', 'SQLITE_ERROR')}: {exc}"
        if self.refusing_writes:
            self.last_write_error = {**self.last_write_error, "error": error, "at": now}
            self._retry_pause = min(self._retry_pause * 2, RETRY_MAX_PAUSE_S)
        else:
            self.last_write_error = {"error": error, "since": now, "at": now, "ended_at": None}
            self._retry_pause = RETRY_PAUSE_S
            log.error("ledger_write_failed error=%r rows_waiting=%d action=hold_in_memory_and_retry path=%s",
                      error, self.rows_waiting, self.path)
        self._retry_at = time.monotonic() + self._retry_pause

    def _committed(self, items: list) -> None:
        rows = [item for item in items if isinstance(item, CallRow)]
        self.rows_written += len(rows)
        self.rows_replayed += sum(self._backlog.from_spool(row) for row in rows)
        if self.refusing_writes:
            self._end_outage()
        self._backlog.settle(items)
        for detail in self._losses_to_record:  # the database works again: it can hold the record
            self._backlog.push_front(AuditEvent("rows_lost", detail))
        self._losses_to_record.clear()
        if rows:
            for listener in self.commit_listeners:
                try:
                    listener(rows)
                except Exception:  # noqa: BLE001 - a listener's bug must not touch the rows
                    log.exception("ledger_commit_listener_failed")

    def _end_outage(self) -> None:
        now = time.time()
        self.last_write_error = {**self.last_write_error, "ended_at": now}
        log.warning("ledger_write_recovered rows_recovered=%d outage_s=%.1f error_was=%r",
                    self.rows_waiting, now - self.last_write_error["since"], self.last_write_error["error"])

    def _reject(self, item: object, exc: Exception) -> None:
        if isinstance(item, CallRow):
            log.error("ledger_row_rejected call_id=%s error=%r", item.call_id, exc)
            self._lose(1)
        else:
            log.error("ledger_item_rejected item=%s error=%r", type(item).__name__, exc)
        self._backlog.settle([item])

    def _spool_held(self, reason: str) -> None:
        """Move what is held only in memory to a spool file (too many rows waiting, or shutdown
        while the database refuses them). If the spool cannot be written either, those rows are
        counted lost, logged, and recorded as an audit event by the next write that works."""
        self._prepare([item for item in self._backlog.held() if isinstance(item, CallRow)])
        try:
            path, rows, unwritable = self._backlog.spool()
        except OSError as exc:
            lost, events = self._backlog.let_go()
            log.error("ledger_spool_failed rows=%d events=%d reason=%s error=%r dir=%s", lost, events, reason,
                      exc, self._backlog.directory)
            if lost:
                self._lose(lost)
            self._losses_to_record.append({"rows": lost, "events": events, "at": time.time(), "error": repr(exc),
                                           "reason": f"neither the database nor the spool could take them ({reason})"})
            return
        self.rows_spooled += rows
        self._spool_unread = True
        if path is not None:
            log.warning("ledger_rows_spooled rows=%d reason=%s file=%s", rows, reason, path)
        for item in unwritable:  # let go already; a field that JSON cannot hold (a bug) costs the item
            log.error("ledger_item_unspoolable item=%s", type(item).__name__)
            if isinstance(item, CallRow):
                self._lose(1)

    def _load_spool(self) -> None:
        rows, unreadable, more = self._backlog.load(MAX_WAITING_ROWS)
        self._spool_unread = more
        if rows:
            log.info("ledger_spool_replaying rows=%d dir=%s", rows, self._backlog.directory)
        if unreadable:
            self._lose(unreadable)

    def _beat(self) -> None:
        if self.run_dir is not None and time.monotonic() >= self._next_beat:
            beat(heartbeat_path(self.run_dir))
            self._next_beat = time.monotonic() + HEARTBEAT_S

    def _check_previous_exit(self, db: sqlite3.Connection) -> None:
        """A previous run that said `proxy_started` and never `proxy_stopping` was killed: report
        the metering gap from its last sign of life to now, and the provider connections the
        edge tunnelled unmetered meanwhile (spool.py). Unmetered connections after a clean stop
        are reported too."""
        make_private_dir(self.run_dir)
        unmetered = take_gap_notes(gap_notes_path(self.run_dir))
        last = db.execute("SELECT kind, detail FROM audit_events WHERE kind IN ('proxy_started', "
                          "'proxy_stopping') ORDER BY id DESC LIMIT 1").fetchone()
        last_kind, last_detail = (last[0], json.loads(last[1])) if last is not None else (None, {})
        for item in self._backlog.held():  # spooled, so newer than anything in the database
            if isinstance(item, AuditEvent) and item.kind in ("proxy_started", "proxy_stopping"):
                last_kind, last_detail = item.kind, item.detail
        now = time.time()
        if last_kind == "proxy_started" and not self._still_running(last_detail):
            seen = max(last_beat(heartbeat_path(self.run_dir)) or 0, _newest_entry_at(db))
            self.unclean_exit = {"previous_pid": last_detail.get("pid"), "last_seen_at": round(seen, 3),
                                 "restarted_at": round(now, 3), "gap_s": round(now - seen, 1),
                                 "unmetered_connections": len(unmetered)}
            log.warning("unclean_exit previous_pid=%s last_seen=%s gap_s=%.1f unmetered_connections=%d",
                        self.unclean_exit["previous_pid"], time.strftime("%H:%M:%S", time.localtime(seen)),
                        now - seen, len(unmetered))
            self._backlog.push_front(AuditEvent("unclean_exit", self.unclean_exit))
        elif unmetered:
            log.warning("metering_gap_reported unmetered_connections=%d", len(unmetered))
            self._backlog.push_front(AuditEvent("metering_gap", {
                "unmetered_connections": len(unmetered), "first_at": min(unmetered), "last_at": max(unmetered)}))

    def _still_running(self, started: dict) -> bool:
        """Whether the run whose `proxy_started` detail this is still runs (another instance on
        this ledger): its process exists and the heartbeat is fresh. A dead or reused pid fails
        one or the other."""
        pid = started.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        beat_at = last_beat(heartbeat_path(self.run_dir))
        return beat_at is not None and time.time() - beat_at < 3 * HEARTBEAT_S

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
        if self.policies is not None:
            try:
                self.policies.load(db)
            except Exception:  # noqa: BLE001 - a policy bug must never cost rows: keep the last ones
                log.exception("policies_load_failed")

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
                if not isinstance(item, CallRow):
                    db.execute(item.SQL, item.values())  # a policy event
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


def _newest_entry_at(db: sqlite3.Connection) -> float:
    """When the newest call ended or the newest audit event was written (0: neither exists)."""
    call = db.execute("SELECT started_at + COALESCE(duration_ms, 0) / 1000.0 FROM calls "
                      "ORDER BY id DESC LIMIT 1").fetchone()
    event = db.execute("SELECT MAX(at) FROM audit_events").fetchone()
    return max(call[0] if call else 0, event[0] or 0)


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
