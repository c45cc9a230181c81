"""The SQLite ledger: schema migrations and the single batching writer.

The event loop hands finished calls to `Ledger.record`, which only enqueues; one writer thread owns
the connection and commits up to 32 rows per transaction, so disk latency never reaches traffic.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 32
RETRY_PAUSE_S = 0.2  # between attempts at a failed commit (a locked or briefly full disk)
_STOP = object()


@dataclass(slots=True)
class CallRow:
    """One call through the proxy, as the relay saw it."""

    call_id: str
    started_at: float  # unix seconds
    host: str
    method: str
    path: str
    status: int | None = None
    outcome: str = "ok"  # ok | provider_error | client_cancelled | upstream_error | unparsed | interrupted
    error: str | None = None
    is_stream: bool = False
    request_bytes: int = 0  # bytes relayed to the provider, head and body, as on the wire
    response_bytes: int = 0  # bytes relayed to the client, head and body, as on the wire
    ttfb_ms: float | None = None
    duration_ms: float | None = None
    project: str | None = None
    model: str | None = None
    user_agent: str | None = None
    parse_error: str | None = None


_COLUMNS = tuple(f.name for f in fields(CallRow))
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


# Ordered: MIGRATIONS[n] takes the schema from version n to n + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_to_1]
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path) -> sqlite3.Connection:
    """Open the ledger, creating and migrating it as needed (WAL, synchronous=NORMAL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
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
        try:
            MIGRATIONS[target](db)
            db.execute(f"PRAGMA user_version = {target + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return db


class Ledger:
    """Owns the writer thread. `record` never blocks; `close` flushes every pending row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows_written = 0
        self.rows_lost = 0
        self._closed = False
        self._in_flight = 0  # rows taken off the queue and not yet written or lost
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
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
        self._queue.put(row)

    def close(self, timeout: float = 30.0) -> None:
        """Flush every pending row; rows still unwritten after `timeout` are counted as lost."""
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck (a lock held elsewhere, a hung disk): the process is about to exit with it.
            self._lose(self._queue.qsize() + self._in_flight)

    def _run(self) -> None:
        try:
            db = connect(self.path)
        except BaseException as exc:  # reported to start()'s caller
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            stopping = False
            while not stopping:
                batch = [self._queue.get()]
                while len(batch) < MAX_BATCH_ROWS:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if _STOP in batch:
                    stopping = True
                    batch = [row for row in batch if row is not _STOP]
                    batch.extend(self._drain())
                self._in_flight = len(batch)
                for start in range(0, len(batch), MAX_BATCH_ROWS):
                    self._write(db, batch[start : start + MAX_BATCH_ROWS])
                    self._in_flight = max(0, self._in_flight - MAX_BATCH_ROWS)
        finally:
            db.close()

    def _drain(self) -> list[CallRow]:
        rows = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rows
            if item is not _STOP:
                rows.append(item)

    def _write(self, db: sqlite3.Connection, rows: list[CallRow]) -> None:
        """Commit `rows` in one transaction; never raises, so the writer thread never dies.

        A batch rejected for its content is retried row by row, so one bad row costs only itself;
        a database that is locked, full or read-only gets three tries, then the batch is lost
        (counted and logged).
        """
        if not rows:
            return
        for attempt in range(3):
            try:
                self._insert(db, rows)
                self.rows_written += len(rows)
                return
            except sqlite3.OperationalError as exc:
                log.error("ledger_write_failed rows=%d attempt=%d error=%r", len(rows), attempt + 1, exc)
                time.sleep(RETRY_PAUSE_S * (attempt + 1))
            except Exception:  # noqa: BLE001 - a row sqlite rejects (constraint, unbindable value)
                self._write_one_by_one(db, rows)
                return
        self._lose(len(rows))

    def _write_one_by_one(self, db: sqlite3.Connection, rows: list[CallRow]) -> None:
        for row in rows:
            try:
                self._insert(db, [row])
                self.rows_written += 1
            except Exception as exc:  # noqa: BLE001
                log.error("ledger_row_rejected call_id=%s error=%r", row.call_id, exc)
                self._lose(1)

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[CallRow]) -> None:
        db.execute("BEGIN")
        try:
            db.executemany(_INSERT, [astuple(row) for row in rows])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error is the one worth reporting
            raise

    def _lose(self, count: int) -> None:
        self.rows_lost += count
        log.error("ledger_rows_lost rows=%d total_lost=%d path=%s", count, self.rows_lost, self.path)
