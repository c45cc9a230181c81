"""The ledger under real faults: the daemon SIGKILLed mid-stream behind the edge, a full disk, a
read-only database file, a lock held by another process. Traffic always flows, and no row
disappears unnoticed: each one is written, spooled, or counted lost out loud.

The full disk is a small tmpfs of the test's own (skipped where mounting is not allowed); the
read-only database is `chattr +i` on its files, which the kernel enforces even for root and even
on descriptors already open (skipped where the filesystem has no such flag).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from halton_meter.api import get_json
from halton_meter.config import Settings
from halton_meter.lifecycle.state import InstallState, save_state
from tests.conftest import REPO, Proxy, start_serve, stop_serve, subprocess_env
from tests.test_edge_daemon import call, client_context, launch, wait_for

NON_STREAM_COST = 12 * 3000 + 9 * 15000  # what the fake provider's answers cost: exact usage, priced
STREAM_COST = 20 * 3000 + 6 * 15000

# Holds a transaction on the ledger from another process until its stdin closes.
HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute(sys.argv[2])
db.execute("SELECT COUNT(*) FROM calls").fetchone()  # a read transaction starts at its first read
print("holding", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


def upstream(fake) -> list[str]:
    return ["--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}", "--upstream-ca", str(fake.ca_path)]


def api_port(home: Path) -> int:
    return int((home / "run" / "api.port").read_text())


def health(home: Path) -> dict:
    status, body = get_json(api_port(home), "/health")
    assert status == 200
    return body


def wait_health(home: Path, predicate, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = health(home)
        if predicate(report):
            return report
        assert time.monotonic() < deadline, f"/health never got there: {report}"
        time.sleep(0.05)


def record_install(home: Path, edge_port: int) -> None:
    """What `init` would have written, so `status` asks this proxy's API (written before any disk fills)."""
    save_state(Settings(home=home), InstallState(mode="run", supervisor="detached", edge_port=edge_port,
                                                 api_port=api_port(home)))


def status_row(home: Path, name: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "halton_meter", "status", "--json"], capture_output=True,
                            text=True, env=subprocess_env(home), cwd=str(REPO), timeout=60)
    rows = {row["name"]: row for row in json.loads(result.stdout)["components"]}
    return rows[name]


def calls_ok(proxy_port: int, context, project: str, count: int) -> None:
    """`count` calls, alternately plain and streamed, each answered in full."""
    for n in range(count):
        stream = n % 2 == 1
        status, body = call(proxy_port, context, project, stream=stream)
        assert status == 200
        if stream:
            assert b'"type": "message_stop"' in body
        else:
            assert json.loads(body)["usage"]["output_tokens"] == 9


def costs(rows: list[dict]) -> list[int]:
    return sorted(row["cost_nanousd"] for row in rows)


def expected_costs(count: int) -> list[int]:
    return sorted(STREAM_COST if n % 2 else NON_STREAM_COST for n in range(count))


def ledger_rows(home: Path, project: str) -> list[dict]:
    db = sqlite3.connect(home / "db.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM calls WHERE project = ? ORDER BY id", (project,))]
    finally:
        db.close()


def integrity(home: Path) -> str:
    db = sqlite3.connect(home / "db.sqlite")
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def audit(home: Path, kind: str) -> list[dict]:
    db = sqlite3.connect(home / "db.sqlite")
    try:
        return [json.loads(d) for (d,) in db.execute("SELECT detail FROM audit_events WHERE kind = ? ORDER BY id",
                                                     (kind,))]
    finally:
        db.close()


def logged(proxy: Proxy, text: str) -> list[str]:
    return [line for line in proxy.log_lines if text in line]


# -- SIGKILL of the daemon mid-stream, behind the edge ------------------------------------------

def test_sigkill_mid_stream_fails_open_keeps_committed_rows_and_reports_the_gap(tmp_path, fake):
    home = tmp_path
    daemon, _, _ = launch(home, "daemon", "--api-port", "0", *upstream(fake))
    edge, edge_port, edge_log = launch(home, "edge", "--port", "0", *upstream(fake))
    processes = [edge, daemon]
    try:
        context = client_context(home, fake)
        calls_ok(edge_port, context, "before", 4)
        assert wait_for(lambda: len(ledger_rows(home, "before")) == 4)

        # A stream of 400 events 50 ms apart: 20 s if nothing breaks it.
        conn = http.client.HTTPSConnection("127.0.0.1", edge_port, context=context, timeout=15)
        conn.set_tunnel("api.anthropic.com", 443)
        conn.request("POST", "/v1/messages", body=json.dumps(
            {"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True, "messages": []}).encode(),
            headers={"Content-Type": "application/json", "X-Halton-Project": "cut",
                     "x-fake-events": "400", "x-fake-delay-ms": "50"})
        response = conn.getresponse()
        assert response.status == 200 and b"message_start" in response.read(200)
        old_pid = daemon.pid
        daemon.kill()  # SIGKILL: no goodbye anywhere
        daemon.wait(10)
        killed = time.monotonic()
        with pytest.raises((http.client.IncompleteRead, OSError)) as cut:
            response.read()
        assert not isinstance(cut.value, TimeoutError)
        assert time.monotonic() - killed < 5  # the client learns at once, it does not hang
        conn.close()

        # New connections go straight through at once (fail open), unmetered but noted.
        started = time.monotonic()
        calls_ok(edge_port, context, "during", 2)
        assert time.monotonic() - started < 10
        assert any("metering_gap" in line for line in edge_log)

        # Every row committed before the kill is there, intact.
        assert integrity(home) == "ok"
        before = ledger_rows(home, "before")
        assert costs(before) == expected_costs(4) and {r["usage_status"] for r in before} == {"exact"}
        assert ledger_rows(home, "during") == []

        time.sleep(1.0)  # a gap of at least a second
        restarted = time.time()
        daemon, _, daemon_log = launch(home, "daemon", "--api-port", "0", *upstream(fake))
        processes.append(daemon)
        report = health(home)["unclean_exit"]
        assert report is not None and report["previous_pid"] == old_pid
        assert report["unmetered_connections"] == 2
        assert report["gap_s"] >= 1.0 and report["last_seen_at"] <= restarted
        assert wait_for(lambda: audit(home, "unclean_exit") == [report])
        assert wait_for(lambda: any("unclean_exit" in line and "WARNING" in line for line in daemon_log))

        record_install(home, edge_port)
        row = status_row(home, "daemon")
        assert row["state"] == "ok" and "unclean exit" in row["detail"] and "metering gap" in row["detail"]
        assert "2 connection(s) went through unmetered" in row["detail"]

        # Metering again.
        assert wait_for(lambda: call(edge_port, context, "after")[0] == 200
                        and ledger_rows(home, "after") != [], timeout=15)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(15)


# -- a full disk ---------------------------------------------------------------------------------

class SmallDisk:
    """A tmpfs of a few MiB: filled for real (ENOSPC, SQLITE_FULL) and emptied again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"
        self.binds: list[Path] = []

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:  # the last partial block too
                os.write(fd, b"\0" * 512)
        except OSError:
            pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()

    def bind(self, source: Path, target: Path) -> None:
        """Mount `source` (another filesystem) over `target`, as a spool directory that lives elsewhere."""
        target.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True, timeout=30)
        self.binds.append(target)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)],
                                capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command: a full disk needs a small filesystem of its own")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    disk = SmallDisk(mount)
    try:
        yield disk
    finally:
        for target in reversed(disk.binds):
            subprocess.run(["umount", "-l", str(target)], timeout=30)
        subprocess.run(["umount", "-l", str(mount)], timeout=30)


def test_full_disk_holds_rows_in_memory_and_writes_them_when_space_returns(small_disk, fake):
    home = small_disk.path / "home"
    proxy = start_serve(home, *upstream(fake))
    try:
        context = client_context(home, fake)
        record_install(home, proxy.port)
        calls_ok(proxy.port, context, "before", 1)
        assert len(proxy.wait_rows("before")) == 1

        small_disk.fill()
        calls_ok(proxy.port, context, "during", 4)  # traffic flows, answers intact
        report = wait_health(home, lambda h: h["rows_waiting"] == 4)
        assert report["status"] == "degraded" and report["rows_lost"] == 0
        assert report["last_write_error"]["error"].startswith("SQLITE_FULL")
        assert report["last_write_error"]["ended_at"] is None
        row = status_row(home, "database")
        assert row["state"] == "warn", row
        assert "4 row(s) waiting in memory, none lost" in row["detail"] and "SQLITE_FULL" in row["detail"]
        assert proxy.rows("during") == []
        assert len(logged(proxy, "ledger_write_failed")) == 1 and "ERROR" in logged(proxy, "ledger_write_failed")[0]

        small_disk.free()
        assert costs(proxy.wait_rows("during", 4, timeout=20)) == expected_costs(4)
        # The writer counts a batch done just after committing it: /health may lag the rows a moment.
        report = wait_health(home, lambda h: h["status"] == "ok")
        assert (report["rows_waiting"], report["rows_lost"]) == (0, 0)
        assert report["last_write_error"]["ended_at"] is not None
        assert wait_for(lambda: logged(proxy, "ledger_write_recovered rows_recovered=4"))
    finally:
        exit_code = stop_serve(proxy)
    assert exit_code == 0
    assert integrity(home) == "ok"


def three_calls_on_a_full_disk(proxy, home: Path, fake, small_disk) -> None:
    """One call written, then the disk fills and three more wait in memory (`during`)."""
    context = client_context(home, fake)
    calls_ok(proxy.port, context, "before", 1)
    assert len(proxy.wait_rows("before")) == 1
    small_disk.fill()
    calls_ok(proxy.port, context, "during", 3)
    wait_health(home, lambda h: h["rows_waiting"] == 3)


def test_full_disk_until_shutdown_spools_the_rows_elsewhere_and_the_next_start_writes_them(small_disk, fake,
                                                                                           tmp_path):
    home = small_disk.path / "home"
    elsewhere = tmp_path / "spool-elsewhere"
    elsewhere.mkdir(mode=0o700)
    proxy = start_serve(home, *upstream(fake))
    small_disk.bind(elsewhere, home / "spool")
    try:
        three_calls_on_a_full_disk(proxy, home, fake, small_disk)
    finally:
        exit_code = stop_serve(proxy)
    assert exit_code == 0  # nothing lost: exit 0
    assert logged(proxy, "ledger_rows_spooled rows=3 reason=shutdown")
    (spooled,) = elsewhere.glob("*.jsonl")
    lines = spooled.read_text().splitlines()
    assert sum('"halton_meter.ledger:CallRow"' in line for line in lines) == 3
    assert any('"kind":"proxy_stopping"' in line for line in lines)  # the stop itself waits there too

    small_disk.free()
    again = start_serve(home, *upstream(fake))
    try:
        assert costs(again.wait_rows("during", 3, timeout=20)) == expected_costs(3)
        report = wait_health(home, lambda h: h["rows_replayed"] == 3 and h["rows_waiting"] == 0)
        assert report["unclean_exit"] is None  # the spooled proxy_stopping says it stopped cleanly
        assert list(elsewhere.iterdir()) == []
    finally:
        exit_code = stop_serve(again)
    assert exit_code == 0
    assert len(audit(home, "proxy_stopping")) == 2 and integrity(home) == "ok"


def test_full_disk_until_shutdown_with_nowhere_to_spool_counts_the_rows_lost_out_loud(small_disk, fake):
    home = small_disk.path / "home"
    proxy = start_serve(home, *upstream(fake))
    try:
        three_calls_on_a_full_disk(proxy, home, fake, small_disk)
    finally:
        exit_code = stop_serve(proxy)
    assert exit_code == 1  # rows could not be written: exit 1
    assert [line for line in logged(proxy, "ledger_spool_failed rows=3") if "ERROR" in line]
    assert [line for line in logged(proxy, "ledger_rows_lost rows=3") if "ERROR" in line]

    small_disk.free()
    again = start_serve(home, *upstream(fake))
    try:
        assert again.rows("during") == [] and len(again.rows("before")) == 1
        # Its stop never reached the ledger either: the next start says the run ended badly.
        assert health(home)["unclean_exit"] is not None
    finally:
        exit_code = stop_serve(again)
    assert exit_code == 0


# -- a read-only database --------------------------------------------------------------------------

def test_read_only_database_holds_rows_until_it_is_writable_again(tmp_path, fake):
    home = tmp_path / "home"
    proxy = start_serve(home, *upstream(fake))
    files = [str(home / "db.sqlite"), str(home / "db.sqlite-wal")]
    frozen = False
    try:
        context = client_context(home, fake)
        record_install(home, proxy.port)
        calls_ok(proxy.port, context, "before", 1)
        assert len(proxy.wait_rows("before")) == 1
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *files], capture_output=True,
                                                            timeout=30).returncode != 0:
            pytest.skip("chattr +i is not available on this filesystem: no way to make the file read-only for root")
        frozen = True
        calls_ok(proxy.port, context, "during", 4)
        report = wait_health(home, lambda h: h["rows_waiting"] == 4)
        assert report["last_write_error"]["error"].startswith(("SQLITE_IOERR", "SQLITE_READONLY"))
        assert report["rows_lost"] == 0 and report["status"] == "degraded"
        row = status_row(home, "database")
        assert row["state"] == "warn" and "4 row(s) waiting in memory, none lost" in row["detail"]
        assert proxy.rows("during") == []
        subprocess.run(["chattr", "-i", *files], check=True, timeout=30)
        frozen = False
        assert costs(proxy.wait_rows("during", 4, timeout=20)) == expected_costs(4)
        report = wait_health(home, lambda h: h["status"] == "ok")
        assert (report["rows_waiting"], report["rows_lost"]) == (0, 0)
    finally:
        if frozen:
            subprocess.run(["chattr", "-i", *files], timeout=30)
        exit_code = stop_serve(proxy)
    assert exit_code == 0 and integrity(home) == "ok"


# -- a lock held by another process ---------------------------------------------------------------

def hold(home: Path, statement: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(home / "db.sqlite"), statement],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(15) == 0


def test_a_lock_held_past_the_busy_timeout_delays_rows_and_loses_none(tmp_path, fake):
    home = tmp_path / "home"
    proxy = start_serve(home, *upstream(fake))
    try:
        context = client_context(home, fake)
        calls_ok(proxy.port, context, "before", 1)
        assert len(proxy.wait_rows("before")) == 1

        locker = hold(home, "BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            calls_ok(proxy.port, context, "locked", 4)
            assert time.monotonic() - started < 10  # the calls did not wait for the lock
            # The writer waited out its 2 s busy timeout, then held the rows for later.
            report = wait_health(home, lambda h: h["rows_waiting"] == 4 and h["last_write_error"] is not None)
            assert report["last_write_error"]["error"].startswith("SQLITE_BUSY")
            time.sleep(max(0.0, 5 - (time.monotonic() - started)))  # a lock of 5 s or more, all told
            assert proxy.rows("locked") == [] and health(home)["rows_waiting"] == 4
        finally:
            release(locker)
        assert costs(proxy.wait_rows("locked", 4, timeout=20)) == expected_costs(4)
        outage = wait_health(home, lambda h: h["status"] == "ok")["last_write_error"]
        assert outage["ended_at"] is not None

        # A long read transaction does not hold writes up at all (WAL): rows land meanwhile.
        reader = hold(home, "BEGIN")
        try:
            calls_ok(proxy.port, context, "reading", 2)
            assert costs(proxy.wait_rows("reading", 2, timeout=10)) == expected_costs(2)
        finally:
            release(reader)
        report = wait_health(home, lambda h: h["rows_waiting"] == 0)
        assert report["last_write_error"] == outage  # no new refusal
        assert (report["rows_lost"], report["rows_waiting"]) == (0, 0)
    finally:
        exit_code = stop_serve(proxy)
    assert exit_code == 0
