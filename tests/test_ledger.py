"""The ledger: schema versioning, WAL, batching, flush on close, loud loss."""

from __future__ import annotations

import sqlite3
import time

import pytest

from halton_meter import ledger as ledger_module
from halton_meter.ledger import MAX_BATCH_ROWS, SCHEMA_VERSION, CallRow, Ledger, connect


def row(n: int) -> CallRow:
    return CallRow(call_id=f"call-{n}", started_at=time.time(), host="api.anthropic.com",
                   method="POST", path="/v1/messages", status=200, request_bytes=n)


def write_rows(tmp_path, rows) -> Ledger:
    ledger = Ledger(tmp_path / "db.sqlite")
    ledger.start()
    for item in rows:
        ledger.record(item)
    ledger.close()
    return ledger


def test_new_database_is_versioned_and_in_wal_mode(tmp_path):
    db = connect(tmp_path / "db.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = {r[1] for r in db.execute("PRAGMA table_info(calls)")}
    assert {"host", "path", "method", "status", "request_bytes", "response_bytes", "ttfb_ms",
            "duration_ms", "is_stream", "outcome"} <= columns
    db.close()


def test_reopening_does_not_migrate_again(tmp_path):
    connect(tmp_path / "db.sqlite").close()
    connect(tmp_path / "db.sqlite").close()  # would fail with "table calls already exists"


def test_newer_schema_is_refused_with_advice(tmp_path):
    path = tmp_path / "db.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="Upgrade halton-meter"):
        connect(path)


def test_every_row_is_written_and_close_flushes(tmp_path):
    ledger = Ledger(tmp_path / "db.sqlite")
    ledger.start()
    for n in range(1000):
        ledger.record(row(n))
    ledger.close()
    db = sqlite3.connect(tmp_path / "db.sqlite")
    assert db.execute("SELECT COUNT(*), SUM(request_bytes) FROM calls").fetchone() == (1000, sum(range(1000)))
    assert ledger.rows_written == 1000 and ledger.rows_lost == 0


def test_writes_are_batched(tmp_path, monkeypatch):
    sizes = []
    original = Ledger._write

    def spy(self, db, rows):
        sizes.append(len(rows))
        original(self, db, rows)

    monkeypatch.setattr(Ledger, "_write", spy)
    ledger = Ledger(tmp_path / "db.sqlite")
    ledger.start()
    for n in range(500):
        ledger.record(row(n))
    ledger.close()
    assert sum(sizes) == 500 and max(sizes) <= MAX_BATCH_ROWS
    assert len(sizes) < 500  # rows queued together were committed together


def test_a_lone_row_reaches_disk_within_a_second(tmp_path):
    ledger = Ledger(tmp_path / "db.sqlite")
    ledger.start()
    ledger.record(row(1))
    deadline = time.monotonic() + 1.0
    db = sqlite3.connect(tmp_path / "db.sqlite")
    while db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 0:
        assert time.monotonic() < deadline, "row not on disk within 1 s"
        time.sleep(0.01)
    ledger.close()


def test_unwritable_database_counts_lost_rows_loudly(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ledger_module, "RETRY_PAUSE_S", 0)
    write_rows(tmp_path, [row(1)])
    # A duplicate call_id violates the UNIQUE constraint: every retry fails, the loss is counted.
    ledger = write_rows(tmp_path, [row(1)])
    assert ledger.rows_lost == 1 and ledger.rows_written == 0
    assert "ledger_rows_lost" in caplog.text


def test_unopenable_database_fails_start(tmp_path):
    (tmp_path / "db.sqlite").mkdir()  # a directory where the file should be
    with pytest.raises(sqlite3.Error):
        Ledger(tmp_path / "db.sqlite").start()


def test_one_bad_row_does_not_sink_its_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "RETRY_PAUSE_S", 0)
    write_rows(tmp_path, [row(1)])
    ledger = write_rows(tmp_path, [row(n) for n in (2, 1, 3)])  # call-1 is a duplicate
    db = sqlite3.connect(tmp_path / "db.sqlite")
    assert sorted(r[0] for r in db.execute("SELECT call_id FROM calls")) == ["call-1", "call-2", "call-3"]
    assert ledger.rows_lost == 1 and ledger.rows_written == 2


def test_writer_survives_an_unexpected_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "RETRY_PAUSE_S", 0)
    ledger = Ledger(tmp_path / "db.sqlite")
    ledger.start()
    broken = row(1)
    broken.model = object()  # sqlite cannot bind this: not an IntegrityError
    ledger.record(broken)
    time.sleep(0.2)
    ledger.record(row(2))
    ledger.close()
    db = sqlite3.connect(tmp_path / "db.sqlite")
    assert [r[0] for r in db.execute("SELECT call_id FROM calls")] == ["call-2"]
    assert ledger.rows_lost == 1


def test_rows_stuck_behind_a_lock_at_close_are_counted_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "RETRY_PAUSE_S", 0)
    ledger = Ledger(tmp_path / "db.sqlite")
    ledger.start()
    blocker = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        for n in range(3):
            ledger.record(row(n))
        ledger.close(timeout=1.0)
        assert ledger.rows_lost == 3 and ledger.rows_written == 0
        ledger.record(row(9))  # after close: counted too
        assert ledger.rows_lost == 4
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_v1_ledger_migrates_to_the_full_schema_keeping_rows(tmp_path):
    path = tmp_path / "db.sqlite"
    db = sqlite3.connect(path)
    ledger_module.MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO calls (call_id, started_at, host, method, path, outcome, is_stream, request_bytes, "
               "response_bytes, project) VALUES ('old', 1.0, 'api.openai.com', 'POST', '/v1/x', 'ok', 0, 1, 2, 'alpha')")
    db.commit()
    db.close()
    db = connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT provider, usage_status, billing, input_tokens FROM calls").fetchone() == (
        "openai", "none", "none", 0)
    assert db.execute("SELECT name FROM projects").fetchall() == [("alpha",)]
    assert db.execute("SELECT kind, detail FROM audit_events").fetchall() == [
        ("schema_migrated", '{"to_version": 2}'), ("schema_migrated", '{"to_version": 3}'),
        ("schema_migrated", '{"to_version": 4}')]
    assert db.execute("SELECT COUNT(*) FROM budgets").fetchone() == (0,)
    assert db.execute("SELECT COUNT(*) FROM policy_events").fetchone() == (0,)
    assert db.execute("SELECT project_source, exported_at FROM calls").fetchone() == (None, None)
    assert db.execute("SELECT body_capture FROM projects").fetchone() == (None,)
    assert db.execute("SELECT COUNT(*) FROM request_bodies").fetchone() == (0,)
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"calls_report_pairs", "calls_usage_gaps", "calls_batch_id"} <= indexes


def test_second_download_of_batch_results_is_not_new_spend(tmp_path):
    def results(n: int) -> CallRow:
        return CallRow(call_id=f"b{n}", started_at=time.time(), host="api.anthropic.com", method="GET",
                       path="/v1/messages/batches/msgbatch_1/results", status=200, provider="anthropic",
                       endpoint="batch_results", request_id="msgbatch_1", usage_status="exact", billing="tokens",
                       input_tokens=100, output_tokens=10, cost_nanousd=5)
    write_rows(tmp_path, [results(1)])
    write_rows(tmp_path, [results(2), results(3)])  # a later download: across restarts and in one batch
    db = sqlite3.connect(tmp_path / "db.sqlite")
    rows = db.execute("SELECT usage_status, input_tokens, output_tokens, cost_nanousd FROM calls ORDER BY id").fetchall()
    assert rows == [("exact", 100, 10, 5), ("duplicate", 0, 0, 0), ("duplicate", 0, 0, 0)]


def test_projects_and_audit_events_are_written_with_rows(tmp_path):
    ledger = Ledger(tmp_path / "db.sqlite")
    ledger.start()
    ledger.audit("proxy_started", port=1234)
    ledger.record(row(1))
    named = row(2)
    named.project = "acme"
    ledger.record(named)
    ledger.close()
    db = sqlite3.connect(tmp_path / "db.sqlite")
    assert {r[0] for r in db.execute("SELECT name FROM projects")} == {"default", "acme"}
    assert db.execute("SELECT kind, detail FROM audit_events WHERE kind = 'proxy_started'").fetchone() == (
        "proxy_started", '{"port": 1234}')


def test_concurrent_first_opens_migrate_once(tmp_path):
    import threading

    errors = []

    def open_it():
        try:
            connect(tmp_path / "db.sqlite").close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize("statuses,expected", [
    (("partial", "exact"), [("duplicate", 0, 0), ("exact", 100, 5)]),
    (("exact", "partial"), [("exact", 100, 5), ("duplicate", 0, 0)]),
    (("partial", "partial"), [("partial", 100, 5), ("duplicate", 0, 0)]),
])
def test_batch_results_count_once_whatever_order_downloads_finish_in(tmp_path, statuses, expected):
    def results(n: int, status: str) -> CallRow:
        return CallRow(call_id=f"b{n}", started_at=time.time(), host="api.anthropic.com", method="GET",
                       path="/v1/messages/batches/msgbatch_9/results", status=200, provider="anthropic",
                       endpoint="batch_results", request_id="msgbatch_9", usage_status=status, billing="tokens",
                       input_tokens=100, output_tokens=10, cost_nanousd=5)
    for n, status in enumerate(statuses):
        write_rows(tmp_path, [results(n, status)])
    db = sqlite3.connect(tmp_path / "db.sqlite")
    assert db.execute("SELECT usage_status, input_tokens, cost_nanousd FROM calls ORDER BY id").fetchall() == expected
