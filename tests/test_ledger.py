"""The ledger: schema versioning, WAL, batching, flush on close, loud loss."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from halton_meter import ledger as ledger_module
from halton_meter.ledger import MAX_BATCH_ROWS, SCHEMA_VERSION, CallRow, Ledger, connect
from tests.conftest import wait_for


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


# -- a database that refuses writes: rows wait in memory, then in the spool; crash reports -----

@pytest.fixture
def quick_retries(monkeypatch):
    """A short busy timeout and pauses, so a refused write shows within a test's patience."""
    monkeypatch.setattr(ledger_module, "WRITER_BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(ledger_module, "RETRY_PAUSE_S", 0.02)
    monkeypatch.setattr(ledger_module, "RETRY_MAX_PAUSE_S", 0.1)


class WriteLock:
    """Another connection holding the ledger's write lock (what a `sqlite3` shell mid-transaction does)."""

    def __init__(self, path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def call_ids(path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT call_id FROM calls ORDER BY id")]
    finally:
        db.close()


def audit_events(path, kind: str) -> list[dict]:
    db = sqlite3.connect(path)
    try:
        return [json.loads(r[0]) for r in db.execute("SELECT detail FROM audit_events WHERE kind = ? ORDER BY id",
                                                      (kind,))]
    finally:
        db.close()


def test_rows_wait_behind_a_lock_and_land_in_order_when_it_goes(tmp_path, quick_retries, caplog):
    path = tmp_path / "db.sqlite"
    ledger = Ledger(path)
    ledger.start()
    lock = WriteLock(path)
    try:
        for n in range(40):
            ledger.record(row(n))
        assert wait_for(lambda: ledger.refusing_writes)
        for n in range(40, 100):  # new rows keep queueing behind the held ones
            ledger.record(row(n))
        assert wait_for(lambda: ledger.rows_waiting == 100)
        time.sleep(0.5)  # many refused tries (pauses of 0.1 s at most): nothing is given up
        assert (ledger.rows_written, ledger.rows_lost, ledger.rows_waiting) == (0, 0, 100)
        assert ledger.last_write_error["error"].startswith("SQLITE_BUSY")
    finally:
        lock.release()
    assert wait_for(lambda: ledger.rows_written == 100)
    ledger.close()
    assert call_ids(path) == [f"call-{n}" for n in range(100)]
    assert (ledger.rows_lost, ledger.rows_waiting, ledger.refusing_writes) == (0, 0, False)
    assert ledger.last_write_error["ended_at"] >= ledger.last_write_error["since"]
    # Loud once at each end of the outage, not once per try.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("ledger_write_failed" in m for m in messages) == 1
    assert sum("ledger_write_recovered" in m for m in messages) == 1
    assert not list((tmp_path / "spool").glob("*"))


def test_past_the_bound_rows_go_to_the_spool_and_come_back_once_writes_work(tmp_path, quick_retries, monkeypatch):
    monkeypatch.setattr(ledger_module, "MAX_WAITING_ROWS", 10)
    path = tmp_path / "db.sqlite"
    ledger = Ledger(path)
    ledger.start()
    lock = WriteLock(path)
    try:
        for n in range(25):
            ledger.record(row(n))
        assert wait_for(lambda: ledger.rows_spooled == 25)
        (spooled,) = (tmp_path / "spool").glob("*.jsonl")
        assert spooled.stat().st_mode & 0o777 == 0o600
        assert len(spooled.read_text().splitlines()) == 25
        for n in range(25, 30):  # only in memory, under the bound: held there
            ledger.record(row(n))
        # The spooled rows are read back to be tried again, and stay spooled meanwhile.
        assert wait_for(lambda: ledger.rows_waiting == 30)
        time.sleep(0.3)
        assert ledger.rows_spooled == 25 and len(list((tmp_path / "spool").glob("*.jsonl"))) == 1
    finally:
        lock.release()
    assert wait_for(lambda: ledger.rows_written == 30)
    ledger.close()
    assert sorted(call_ids(path)) == sorted(f"call-{n}" for n in range(30))
    assert (ledger.rows_spooled, ledger.rows_replayed, ledger.rows_lost) == (25, 25, 0)
    assert not list((tmp_path / "spool").glob("*"))  # replayed in full, then deleted


def test_rows_refused_at_shutdown_are_spooled_and_replayed_exactly_once_with_their_price(tmp_path, quick_retries):
    from halton_meter.pricing import PriceTable

    path = tmp_path / "db.sqlite"
    ledger = Ledger(path, prices=PriceTable.load(tmp_path))
    ledger.start()
    lock = WriteLock(path)
    try:
        for n in range(3):
            ledger.record(priced_row(n))
        ledger.audit("marker", note="spooled with the rows")
        ledger.close()
    finally:
        lock.release()
    assert (ledger.rows_written, ledger.rows_spooled, ledger.rows_lost) == (0, 3, 0)
    (spooled,) = (tmp_path / "spool").glob("*.jsonl")
    kept = spooled.read_bytes()

    # Priced when first tried; the replaying ledger has no price table and must not need one.
    replay = Ledger(path)
    replay.start()
    replay.close()
    assert replay.rows_replayed == 3 and not spooled.exists()
    db = sqlite3.connect(path)
    assert db.execute("SELECT call_id, cost_nanousd, price_model FROM calls ORDER BY id").fetchall() == [
        (f"priced-{n}", 1000 * 3000 + 100 * 15000, "claude-sonnet-4-5") for n in range(3)]
    assert db.execute("SELECT COUNT(*) FROM calls WHERE pricing_id IS NULL").fetchone() == (0,)
    assert audit_events(path, "marker") == [{"note": "spooled with the rows"}]

    # A crash between the commit and the file's deletion replays the file again: no row twice.
    spooled.write_bytes(kept)
    again = Ledger(path)
    again.start()
    again.close()
    assert (again.rows_replayed, again.rows_lost) == (0, 0) and not spooled.exists()
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT call_id) FROM calls").fetchone() == (3, 3)


def priced_row(n: int) -> CallRow:
    return CallRow(call_id=f"priced-{n}", started_at=time.time(), host="api.anthropic.com", method="POST",
                   path="/v1/messages", status=200, provider="anthropic", endpoint="messages", billing="tokens",
                   usage_status="exact", request_model="claude-sonnet-4-5",
                   response_model="claude-sonnet-4-5-20250929", model="claude-sonnet-4-5-20250929",
                   input_tokens=1000, output_tokens=100)


def test_rows_the_spool_cannot_take_either_are_counted_lost_and_recorded(tmp_path, quick_retries, monkeypatch,
                                                                         caplog):
    monkeypatch.setattr(ledger_module, "MAX_WAITING_ROWS", 5)
    path = tmp_path / "db.sqlite"
    (tmp_path / "spool").write_text("a file where the spool directory goes: the spool cannot be written")
    ledger = Ledger(path)
    ledger.start()
    lock = WriteLock(path)
    try:
        for n in range(8):
            ledger.record(row(n))
        assert wait_for(lambda: ledger.rows_lost == 8)
        ledger.record(row(8))  # under the bound again: waits, and is not lost
    finally:
        lock.release()
    assert wait_for(lambda: ledger.rows_written == 1)
    ledger.close()
    assert call_ids(path) == ["call-8"]
    assert ledger.rows_lost == 8 and ledger.rows_spooled == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("ledger_spool_failed rows=8" in m for m in errors)
    (event,) = audit_events(path, "rows_lost")  # written by the first write that worked
    assert event["rows"] == 8 and "spool" in event["reason"]


def test_rows_the_spool_cannot_take_at_shutdown_are_counted_lost_loudly(tmp_path, quick_retries, caplog):
    path = tmp_path / "db.sqlite"
    (tmp_path / "spool").write_text("not a directory")
    ledger = Ledger(path)
    ledger.start()
    lock = WriteLock(path)
    try:
        for n in range(3):
            ledger.record(row(n))
        ledger.close()
    finally:
        lock.release()
    assert (ledger.rows_lost, ledger.rows_spooled, ledger.rows_written) == (3, 0, 0)
    assert any("ledger_spool_failed rows=3" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_a_killed_run_is_reported_with_its_gap_at_the_next_start(tmp_path):
    from halton_meter.spool import gap_notes_path, heartbeat_path, note_metering_gap

    path, run_dir = tmp_path / "db.sqlite", tmp_path / "run"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed_pid = int(gone.stdout)
    now = time.time()
    db = connect(path)
    ledger_module.write_audit(db, "proxy_started", {"pid": killed_pid})
    db.execute("UPDATE audit_events SET at = ? WHERE kind = 'proxy_started'", (now - 60,))
    db.execute("UPDATE audit_events SET at = ? WHERE kind = 'schema_migrated'", (now - 70,))
    db.close()
    run_dir.mkdir()
    heartbeat_path(run_dir).touch()
    os.utime(heartbeat_path(run_dir), (now - 30, now - 30))  # its last beat: newer than anything in the ledger
    for offset in (20, 10):  # the edge tunnelled two provider connections while it was gone
        note_metering_gap(gap_notes_path(run_dir), now - offset)

    ledger = Ledger(path)
    ledger.run_dir = run_dir
    ledger.start()
    ledger.close()
    report = ledger.unclean_exit
    assert report["previous_pid"] == killed_pid and report["unmetered_connections"] == 2
    assert report["last_seen_at"] == pytest.approx(now - 30, abs=0.01)
    assert 30 <= report["gap_s"] < 40
    assert audit_events(path, "unclean_exit") == [report]
    assert not gap_notes_path(run_dir).exists()  # taken: the next start does not count them again


def test_a_clean_stop_is_not_a_crash_but_unmetered_connections_after_it_are_reported(tmp_path):
    from halton_meter.spool import gap_notes_path, note_metering_gap

    path, run_dir = tmp_path / "db.sqlite", tmp_path / "run"
    first = Ledger(path)
    first.start()
    first.audit("proxy_started", pid=os.getpid())
    first.audit("proxy_stopping", rows_lost_so_far=0)
    first.close()
    run_dir.mkdir()
    note_metering_gap(gap_notes_path(run_dir), time.time())

    second = Ledger(path)
    second.run_dir = run_dir
    second.start()
    second.close()
    assert second.unclean_exit is None and audit_events(path, "unclean_exit") == []
    (gap,) = audit_events(path, "metering_gap")
    assert gap["unmetered_connections"] == 1


def test_spooled_rows_still_safe_on_disk_are_not_counted_lost_when_a_new_spool_fails(tmp_path, quick_retries):
    path, spool = tmp_path / "db.sqlite", tmp_path / "spool"
    first = Ledger(path)
    first.start()
    lock = WriteLock(path)
    try:
        for n in range(3):
            first.record(row(n))
        first.close()
        (kept,) = spool.glob("*.jsonl")
        # The kernel refuses new files in an immutable directory, even to root.
        if subprocess.run(["chattr", "+i", str(spool)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available on this filesystem")
        try:
            second = Ledger(path)
            second.start()  # holds the 3 spooled rows; the database still refuses them
            for n in range(3, 5):
                second.record(row(n))
            second.close()  # the new spool file cannot be created
        finally:
            subprocess.run(["chattr", "-i", str(spool)], check=True)
    finally:
        lock.release()
    assert (second.rows_lost, second.rows_spooled) == (2, 0)  # only the rows that were nowhere else
    assert kept.exists()
    third = Ledger(path)
    third.start()
    third.close()
    assert sorted(call_ids(path)) == ["call-0", "call-1", "call-2"] and not kept.exists()
