"""Budgets and model rules: the engine on a real ledger, and the proxy refusing calls itself.

Through a real `serve` with the fake provider: a block budget refuses the next call of its scope in
the provider's own error format without reaching the provider (the fake counts the ids it saw),
in-flight calls finish, other scopes go on, and `budget`/`policy` changes reach a running daemon.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from halton_meter import budgets
from halton_meter.budgets import ModelRule, PolicyEngine, PolicyError, parse_amount, period_bounds
from halton_meter.ledger import CallRow, Ledger, connect
from halton_meter.relay import refusal_response
from tests.conftest import REPO, messages_body, start_serve, stop_serve, subprocess_env, wait_for

# The fake provider's non-streaming message: 12 input and 9 output tokens of claude-sonnet-4-5.
CALL_COST = 12 * 3000 + 9 * 15000


def cli(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "halton_meter", *args], env={**subprocess_env(home), **(env or {})},
                          cwd=str(REPO), capture_output=True, text=True, timeout=60)


def events(db: Path, kind: str | None = None) -> list[dict]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in connection.execute(
            "SELECT * FROM policy_events WHERE ? IS NULL OR kind = ? ORDER BY id", (kind, kind))]
    finally:
        connection.close()


def post(proxy, *, project: str | None = "capped", body: bytes | None = None, host: str = "api.anthropic.com",
         path: str = "/v1/messages", headers: dict | None = None, conn=None):
    """One call through the proxy; returns (status, headers, body, fake id)."""
    fake_id = uuid.uuid4().hex
    own = conn is None
    conn = conn or proxy.connection(host)
    sent = {"content-type": "application/json", "x-fake-id": fake_id, **(headers or {})}
    if project:
        sent["X-Halton-Project"] = project
    conn.request("POST", path, body=body if body is not None else messages_body(), headers=sent)
    response = conn.getresponse()
    data = response.read()
    if own:
        conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data, fake_id


@pytest.fixture
def daemon(tmp_path, fake):
    started = []

    def start(*extra: str, env: dict | None = None):
        home = tmp_path / f"home{len(started)}"
        home.mkdir()
        saved = {name: os.environ.get(name) for name in env or {}}
        os.environ.update(env or {})  # start_serve passes this process's environment on
        try:
            proxy = start_serve(home, "--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}",
                                "--upstream", f"api.openai.com=127.0.0.1:{fake.port}",
                                "--upstream", f"generativelanguage.googleapis.com=127.0.0.1:{fake.port}",
                                "--upstream-ca", str(fake.ca_path), *extra)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        assert stop_serve(proxy) == 0
        log = "".join(proxy.log_lines)
        assert "Traceback" not in log and "policies_load_failed" not in log, log


# ---- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, nanousd", [("10", 10 * 10**9), ("$12.50", 12_500_000_000), ("0.000000001", 1),
                                           ("1,000", 1000 * 10**9), (" 0.25 ", 250_000_000)])
def test_amounts_are_exact_dollars(text, nanousd):
    assert parse_amount(text) == nanousd


@pytest.mark.parametrize("text", ["0", "-5", "abc", "1e400", "0.0000000001", "nan", "inf", ""])
def test_bad_amounts_are_refused_with_the_reason(text):
    with pytest.raises(PolicyError, match="amount"):
        parse_amount(text)


def test_periods_start_at_local_midnight_monday_and_the_first(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        # Wednesday 2026-03-11 15:00 local, in the week after the DST change of Sunday 2026-03-08.
        now = time.mktime((2026, 3, 11, 15, 0, 0, 0, 0, -1))
        day = period_bounds("daily", now)
        assert day == (time.mktime((2026, 3, 11, 0, 0, 0, 0, 0, -1)), time.mktime((2026, 3, 12, 0, 0, 0, 0, 0, -1)))
        week = period_bounds("weekly", now)
        assert week[0] == time.mktime((2026, 3, 9, 0, 0, 0, 0, 0, -1)) and week[1] - week[0] == 7 * 86400
        month = period_bounds("monthly", now)
        assert month == (time.mktime((2026, 3, 1, 0, 0, 0, 0, 0, -1)), time.mktime((2026, 4, 1, 0, 0, 0, 0, 0, -1)))
        # The month holding the DST change is an hour short of 31 days.
        assert month[1] - month[0] == 31 * 86400 - 3600
        december = period_bounds("monthly", time.mktime((2026, 12, 31, 23, 59, 0, 0, 0, -1)))
        assert december[1] == time.mktime((2027, 1, 1, 0, 0, 0, 0, 0, -1))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def _row(project: str, cost: int | None, started_at: float, provider: str = "anthropic") -> CallRow:
    row = CallRow(call_id=uuid.uuid4().hex, started_at=started_at, host="api.anthropic.com", method="POST",
                  path="/v1/messages", project=project, provider=provider)
    row.cost_nanousd = cost
    row.unpriced_reason = None if cost is not None else "unknown model"
    return row


def _seed(path: Path, rows: list[CallRow]) -> None:
    ledger = Ledger(path)
    ledger.start()
    for row in rows:
        ledger.record(row)
    ledger.close()
    assert ledger.rows_written == len(rows)


def _budget(db, project, provider, period, limit, action):
    with db:
        return db.execute("INSERT INTO budgets (project, provider, period, limit_nanousd, action, created_at) "
                          "VALUES (?, ?, ?, ?, ?, 0)", (project, provider, period, limit, action)).lastrowid


def test_engine_counts_the_period_from_the_ledger_then_keeps_a_running_total(tmp_path):
    now = time.time()
    start, _ = period_bounds("daily", now)
    _seed(tmp_path / "db.sqlite", [
        _row("ci", 400, start + 1),
        _row("ci", 5000, start - 1),  # yesterday: not counted
        _row("other", 7000, start + 2),  # another project
        _row("ci", 100, start + 3, provider="openai"),
        _row("ci", None, start + 4),  # unpriced: counted apart
    ])
    db = connect(tmp_path / "db.sqlite")
    ci = _budget(db, "ci", None, "daily", 1000, "block")
    ci_anthropic = _budget(db, "ci", "anthropic", "daily", 10_000, "warn")
    raised = []
    engine = PolicyEngine()
    engine.emit = raised.append
    engine.load(db, now)
    assert {s["budget_id"]: (s["spend_nanousd"], s["unpriced_calls"]) for s in engine.snapshot()} == {
        ci: (500, 1), ci_anthropic: (400, 1)}
    assert engine.active and not engine.needs_project and not engine.blocking_for("ci", "anthropic")
    assert raised == []

    engine.on_commit([_row("ci", 300, now)])  # 800 of 1000: the 80 % warning, once
    assert [(e.kind, e.budget_id, e.spend_nanousd) for e in raised] == [("budget_warning", ci, 800)]
    engine.on_commit([_row("ci", 100, now), _row("other", 10**9, now), _row("ci", 50, start - 10)])
    assert len(raised) == 1 and not engine.blocking_for("ci", "openai")
    engine.on_commit([_row("ci", 100, now, provider="openai")])  # 1000: used up
    assert [e.kind for e in raised] == ["budget_warning", "budget_blocking"]
    assert engine.blocking_for("ci", "openai") and engine.blocking_for("ci", None)
    assert engine.needs_project  # a budget naming a project blocks now: calls must know theirs
    assert not engine.blocking_for("other", "openai")
    refusal = engine.refusal("ci", "anthropic", "claude-sonnet-4-5")
    assert refusal.status == 429 and refusal.event.kind == "call_blocked" and refusal.event.budget_id == ci
    assert "daily budget of $0.000001 for project ci is used up" in refusal.message
    assert f"budget rm {ci}" in refusal.message
    assert engine.refusal("other", "anthropic", "claude-sonnet-4-5") is None


def test_engine_reload_keeps_events_once_per_period_and_limit(tmp_path):
    path = tmp_path / "db.sqlite"
    db = connect(path)
    now = time.time()
    budget_id = _budget(db, None, None, "monthly", 1000, "warn")
    engine = PolicyEngine()
    raised = []
    engine.emit = raised.append
    engine.load(db, now)
    engine.on_commit([_row("x", 1200, now)])
    assert [e.kind for e in raised] == ["budget_warning", "budget_exceeded"]
    with db:
        db.executemany(budgets.PolicyEvent.SQL, [e.values() for e in raised])
    # A restarted daemon does not raise them again for the same period and limit...
    again = PolicyEngine()
    again.emit = raised.append
    again.load(db, now)
    assert len(raised) == 2 and again.snapshot()[0]["spend_nanousd"] == 0  # the row was never in calls
    # ...but a raised limit that is crossed again is news.
    with db:
        db.execute("UPDATE budgets SET limit_nanousd = 2000 WHERE id = ?", (budget_id,))
        db.execute("INSERT INTO audit_events (at, kind, detail) VALUES (0, 'budget_set', '{}')")
    again.load(db, now)
    again.on_commit([_row("x", 1700, now)])
    assert [e.kind for e in raised][2:] == ["budget_warning"] and raised[-1].limit_nanousd == 2000


def test_budget_set_below_todays_spend_raises_both_events_at_once(tmp_path):
    now = time.time()
    _seed(tmp_path / "db.sqlite", [_row("ci", 5000, now)])
    db = connect(tmp_path / "db.sqlite")
    _budget(db, "ci", None, "daily", 1000, "block")
    engine = PolicyEngine()
    raised = []
    engine.emit = raised.append
    engine.load(db, now)
    assert [e.kind for e in raised] == ["budget_warning", "budget_blocking"]
    assert engine.blocking_for("ci", "anthropic")


@pytest.mark.parametrize("ask", ["blocking_for", "refusal"])
def test_a_new_period_starts_from_zero(tmp_path, ask):
    db = connect(tmp_path / "db.sqlite")
    _budget(db, None, None, "daily", 1000, "block")
    with db:  # with a model rule too, the relay asks `refusal` without `blocking_for` first
        db.execute("INSERT INTO model_policies (project, kind, pattern, created_at) VALUES (NULL, 'deny', 'x-*', 0)")
    engine = PolicyEngine()
    engine.load(db, time.time())
    engine.on_commit([_row("x", 1000, time.time())])
    assert engine.refusal("x", "anthropic", "claude-sonnet-4-5") is not None
    tracked = engine._tracked[0]
    tracked.start, tracked.end = tracked.start - 86400, tracked.start  # as if yesterday's period
    engine._roll_at = tracked.end
    if ask == "blocking_for":
        assert not engine.blocking_for("x", "anthropic")
    assert engine.refusal("x", "anthropic", "claude-sonnet-4-5") is None
    assert engine.snapshot()[0]["spend_nanousd"] == 0 and engine.snapshot()[0]["period_start"] == tracked.start


def test_self_test_rows_never_count_and_queued_events_are_not_raised_twice(tmp_path):
    db = connect(tmp_path / "db.sqlite")
    _budget(db, None, None, "daily", 1000, "warn")
    engine = PolicyEngine()
    raised = []
    engine.emit = raised.append
    engine.load(db, time.time())
    engine.on_commit([_row("x", 10**6, time.time(), provider="selftest")])
    assert raised == [] and engine.snapshot()[0]["spend_nanousd"] == 0
    engine.on_commit([_row("x", 900, time.time())])
    assert [e.kind for e in raised] == ["budget_warning"]
    with db:  # another connection's change reloads before the queued event reached the ledger
        db.execute("INSERT INTO audit_events (at, kind, detail) VALUES (0, 'reprice', '{}')")
    engine.load(db, time.time())
    assert [e.kind for e in raised] == ["budget_warning"]


def test_rename_and_merge_carry_budgets_and_rules(tmp_path):
    from halton_meter import projects

    path = tmp_path / "db.sqlite"
    _seed(path, [_row("ci", 1, time.time()), _row("old", 1, time.time()), _row("main", 1, time.time())])
    db = connect(path)
    ci = _budget(db, "ci", None, "daily", 1000, "block")
    old_daily = _budget(db, "old", None, "daily", 5, "block")
    old_weekly = _budget(db, "old", None, "weekly", 7, "warn")
    main_daily = _budget(db, "main", None, "daily", 9, "warn")
    with db:
        db.execute("INSERT INTO model_policies (project, kind, pattern, created_at) VALUES ('ci', 'deny', '*opus*', 0)")
    projects.rename(db, "ci", "ci-2", out=io.StringIO())
    assert db.execute("SELECT id, project FROM budgets WHERE id = ?", (ci,)).fetchone() == (ci, "ci-2")
    assert db.execute("SELECT project FROM model_policies").fetchall() == [("ci-2",)]
    projects.merge(db, "old", "main", out=io.StringIO())  # main keeps its daily budget, gains the weekly
    assert sorted(db.execute("SELECT id, project FROM budgets WHERE id != ?", (ci,)).fetchall()) == [
        (old_weekly, "main"), (main_daily, "main")]
    assert old_daily not in [i for (i,) in db.execute("SELECT id FROM budgets")]


@pytest.mark.parametrize("endpoint, billing, refused", [
    ("messages", "tokens", True), ("count_tokens", "free", False), ("batch_results", "tokens", False),
    ("batch_create", "none", True), ("models", "none", False)])
def test_only_calls_that_spend_are_refused(endpoint, billing, refused):
    from halton_meter.adapters.base import CallState
    from halton_meter.relay import _refusal_for

    engine = PolicyEngine()
    engine._rules = (ModelRule(1, None, "deny", "*"),)
    engine._settle(time.time())
    state = CallState(provider="anthropic", endpoint=endpoint, billing=billing, request_model="claude-opus-4-1")
    assert (_refusal_for(engine, "p", "anthropic", state) is not None) is refused
    assert _refusal_for(engine, "p", "anthropic", None) is None


@pytest.mark.parametrize("rules, project, model, refused", [
    ([("deny", None, "claude-opus-*")], "any", "claude-opus-4-1", True),
    ([("deny", None, "claude-opus-*")], "any", "CLAUDE-OPUS-4-1", True),  # case-insensitive
    ([("deny", None, "claude-opus-*")], "any", "claude-sonnet-4-5", False),
    ([("deny", "ci", "*opus*")], "dev", "claude-opus-4-1", False),  # another project's rule
    ([("deny", "ci", "*opus*")], "ci", "anthropic.claude-opus-4-1-v1:0", True),  # Bedrock ids too
    ([("allow", "ci", "claude-haiku-*"), ("allow", "ci", "gpt-5-mini")], "ci", "gpt-5-mini", False),
    ([("allow", "ci", "claude-haiku-*")], "ci", "claude-sonnet-4-5", True),
    ([("allow", "ci", "claude-*"), ("deny", "ci", "claude-opus-*")], "ci", "claude-opus-4-1", True),  # deny wins
    ([("allow", None, "claude-*")], "ci", "gpt-5", True),
])
def test_model_rules(rules, project, model, refused):
    engine = PolicyEngine()
    engine._rules = tuple(ModelRule(i, p, kind, pattern) for i, (kind, p, pattern) in enumerate(rules, 1))
    engine._settle(time.time())
    refusal = engine.refusal(project, "anthropic", model)
    assert (refusal is not None) is refused
    if refused:
        assert refusal.status == 403 and refusal.event.kind == "model_blocked" and model in refusal.message
        assert "policy rm" in refusal.message


@pytest.mark.parametrize("provider, target, status, check", [
    ("anthropic", "/v1/messages", 429,
     lambda b: b["type"] == "error" and b["error"]["type"] == "rate_limit_error"),
    ("anthropic", "/v1/messages", 403, lambda b: b["error"]["type"] == "permission_error"),
    ("vertex", "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude:rawPredict", 429,
     lambda b: b["error"]["type"] == "rate_limit_error"),
    ("openai", "/v1/chat/completions", 429,
     lambda b: b["error"]["type"] == "insufficient_quota" and b["error"]["code"] == "budget_exceeded"),
    ("groq", "/openai/v1/chat/completions", 403, lambda b: b["error"]["code"] == "model_not_allowed"),
    ("gemini", "/v1beta/models/gemini-2.5-pro:generateContent", 429,
     lambda b: b["error"]["status"] == "RESOURCE_EXHAUSTED" and b["error"]["code"] == 429),
    ("vertex", "/v1/projects/p/locations/us/publishers/google/models/gemini-2.5-pro:generateContent", 403,
     lambda b: b["error"]["status"] == "PERMISSION_DENIED"),
    ("bedrock", "/model/anthropic.claude/converse", 429, lambda b: set(b) == {"message"}),
])
def test_refusals_use_each_providers_error_format(provider, target, status, check):
    event = budgets.PolicyEvent(kind="call_blocked", message="m")
    refusal = budgets.Refusal(status, "budget" if status == 429 else "model", "the daily budget is used up", event)
    raw = refusal_response(refusal, provider, target, keep_alive=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    assert fields["x-should-retry"] == "false" and fields["content-type"] == "application/json"
    assert int(fields["content-length"]) == len(body) and fields["connection"] == "keep-alive"
    payload = json.loads(body)
    assert check(payload) and "the daily budget is used up" in json.dumps(payload)
    if provider == "bedrock":
        assert fields["x-amzn-errortype"] == ("ThrottlingException" if status == 429 else "AccessDeniedException")


# ---- the commands ----------------------------------------------------------------------------


def test_budget_and_policy_commands(tmp_path):
    home = tmp_path / "home"
    assert "No budgets" in cli(home, "budget", "list").stdout
    assert not (home / "db.sqlite").exists()  # listing creates nothing
    done = cli(home, "budget", "set", "--project", "ci", "--daily", "$10", "--action", "block")
    assert done.returncode == 0 and "Set budget 1: daily budget of $10.00 for project ci, block" in done.stdout
    assert cli(home, "budget", "set", "--project", "ci", "--daily", "12.5").stdout.startswith("Changed budget 1")
    assert cli(home, "budget", "set", "--provider", "anthropic", "--monthly", "100").returncode == 0
    listed = json.loads(cli(home, "budget", "list", "--json").stdout)["budgets"]
    assert [(b["id"], b["project"], b["provider"], b["period"], b["limit_usd"], b["action"]) for b in listed] == [
        (1, "ci", None, "daily", "12.500000000", "warn"), (2, None, "anthropic", "monthly", "100.000000000", "warn")]
    table = cli(home, "budget", "list").stdout
    assert "project ci" in table and "$12.50" in table and "provider anthropic" in table

    for args, words in ((("budget", "set", "--daily", "0"), "positive amount"),
                        (("budget", "set", "--daily", "5", "--provider", "nope"), "no provider 'nope'"),
                        (("budget", "set", "--daily", "5", "--project", "bad name"), "not allowed"),
                        (("budget", "rm", "9"), "no budget 9"),
                        (("policy", "deny", "has space"), "not a model pattern"),
                        (("policy", "rm", "4"), "no model rule 4")):
        failed = cli(home, *args)
        assert failed.returncode == 1 and words in failed.stderr, (args, failed.stderr)
    both = cli(home, "budget", "set", "--daily", "5", "--weekly", "6")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr

    assert cli(home, "policy", "deny", "--project", "ci", "claude-opus-*").returncode == 0
    assert cli(home, "policy", "allow", "--project", "ci", "claude-*", "gpt-5-mini").returncode == 0
    assert cli(home, "policy", "deny", "--project", "ci", "claude-opus-*").returncode == 0  # kept once
    rules = json.loads(cli(home, "policy", "list", "--json").stdout)["rules"]
    assert [(r["kind"], r["pattern"]) for r in rules] == [
        ("deny", "claude-opus-*"), ("allow", "claude-*"), ("allow", "gpt-5-mini")]
    assert cli(home, "policy", "rm", "1", "3").stdout.strip() == "Removed model rule 1, 3."
    assert cli(home, "budget", "rm", "2").returncode == 0
    db = sqlite3.connect(home / "db.sqlite")
    assert db.execute("SELECT COUNT(*) FROM budgets").fetchone() == (1,)
    assert db.execute("SELECT pattern FROM model_policies").fetchall() == [("claude-*",)]
    kinds = [k for (k,) in db.execute("SELECT kind FROM audit_events WHERE kind != 'schema_migrated'")]
    assert kinds == ["budget_set"] * 3 + ["model_policy_added"] * 3 + ["model_policies_removed", "budgets_removed"]


def test_rules_for_a_renamed_project_follow_the_new_name(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    db = connect(home / "db.sqlite")
    with db:
        db.execute("INSERT INTO project_aliases (alias, project) VALUES ('old-ci', 'ci')")
    done = cli(home, "budget", "set", "--project", "old-ci", "--daily", "1")
    assert "old-ci was renamed to ci" in done.stdout
    assert db.execute("SELECT project FROM budgets").fetchone() == ("ci",)


# ---- through the proxy -----------------------------------------------------------------------


def test_block_budget_refuses_the_next_call_without_contacting_the_provider(daemon, fake):
    proxy = daemon()
    # Set while the daemon runs: it reads the change from the ledger.
    limit_usd = f"{2 * CALL_COST / 10**9:.9f}"
    assert cli(proxy.home, "budget", "set", "--project", "capped", "--daily", limit_usd, "--action", "block").returncode == 0
    assert wait_for(lambda: json.loads(cli(proxy.home, "status", "--json").stdout) is not None)

    conn = proxy.connection()
    first = post(proxy, conn=conn)
    assert first[0] == 200 and fake.seen_ids.get(first[3]) == 1
    assert wait_for(lambda: len(proxy.rows("capped")) == 1)
    second = post(proxy, conn=conn)  # reaches 100 %: this one still goes (it was within budget)
    assert second[0] == 200
    assert wait_for(lambda: events(proxy.db, "budget_blocking"))

    status, headers, body, fake_id = post(proxy, conn=conn)  # same kept-alive connection
    assert status == 429 and fake_id not in fake.seen_ids
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert "daily budget of" in error["error"]["message"] and "project capped is used up" in error["error"]["message"]
    assert headers["x-should-retry"] == "false" and headers["connection"] == "keep-alive"
    # The connection goes on: another project's call on it is served.
    free = post(proxy, conn=conn, project="free")
    assert free[0] == 200 and fake.seen_ids.get(free[3]) == 1
    conn.close()

    assert wait_for(lambda: events(proxy.db, "call_blocked"))
    kinds = [e["kind"] for e in events(proxy.db)]
    assert kinds == ["budget_warning", "budget_blocking", "call_blocked"]
    blocked = events(proxy.db, "call_blocked")[0]
    assert blocked["project"] == "capped" and blocked["provider"] == "anthropic"
    assert blocked["model"] == "claude-sonnet-4-5" and blocked["spend_nanousd"] == 2 * CALL_COST
    assert len(proxy.rows("capped")) == 2  # a refused call is an event, not a call

    health = json.loads(cli(proxy.home, "status", "--json").stdout)
    budget_row = next(row for row in health["components"] if row["name"] == "budgets")
    assert budget_row["state"] == "ok" and "BLOCKING" in budget_row["detail"]  # stated, not a fault
    tail = cli(proxy.home, "tail", "-n", "10").stdout
    assert "budget" in tail and "refused" in tail.lower()

    # A body too large to go out with the head: refused from the request line, then closed.
    large = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5,
                        "messages": [{"role": "user", "content": "y" * (200 * 1024)}]}).encode()
    status, headers, _, fake_id = post(proxy, body=large)
    assert status == 429 and headers["connection"] == "close" and fake_id not in fake.seen_ids

    # Raising the budget lets calls through again, without a restart.
    assert cli(proxy.home, "budget", "set", "--project", "capped", "--daily", "1", "--action", "block").returncode == 0
    assert wait_for(lambda: post(proxy)[0] == 200)


def test_warn_budget_raises_events_and_a_desktop_notification_but_never_blocks(daemon, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sent = tmp_path / "notifications.txt"
    notifier = bin_dir / "notify-send"
    # One write per notification: two may run at once.
    notifier.write_text(f"#!/bin/sh\nline=$(printf '%s|' \"$@\")\necho \"$line\" >> {sent}\n")
    notifier.chmod(0o755)
    proxy = daemon(env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert cli(proxy.home, "budget", "set", "--provider", "anthropic", "--monthly",
               f"{1.5 * CALL_COST / 10**9:.9f}").returncode == 0
    time.sleep(0.6)  # the daemon polls the ledger four times a second when idle
    for n in range(3):
        assert post(proxy, project=f"p{n}")[0] == 200  # warn only: every call goes through
    assert wait_for(lambda: [e["kind"] for e in events(proxy.db)] == ["budget_warning", "budget_exceeded"])
    assert wait_for(lambda: sent.exists() and sent.read_text().count("\n") == 2)
    lines = sorted(sent.read_text().splitlines(), key=lambda line: "exceeded" in line)
    assert all(line.startswith("--app-name=halton-meter|halton-meter: budget|") for line in lines), lines
    assert "80% of the monthly budget of" in lines[0] and "exceeded" in lines[1]
    status = json.loads(cli(proxy.home, "status", "--json").stdout)
    row = next(r for r in status["components"] if r["name"] == "budgets")
    assert row["state"] == "ok" and "EXCEEDED" in row["detail"]


def test_model_rules_refuse_with_403_and_other_models_go_on(daemon, fake):
    proxy = daemon()
    assert cli(proxy.home, "policy", "deny", "--project", "ci", "claude-opus-*").returncode == 0
    assert cli(proxy.home, "policy", "allow", "--project", "ci", "claude-*", "gpt-5-mini").returncode == 0
    time.sleep(0.6)
    status, headers, body, fake_id = post(proxy, project="ci", body=messages_body(model="claude-opus-4-1"))
    assert status == 403 and fake_id not in fake.seen_ids
    assert json.loads(body)["error"]["type"] == "permission_error"
    assert "model claude-opus-4-1 is denied for project ci" in json.loads(body)["error"]["message"]
    assert post(proxy, project="ci", body=messages_body(model="claude-sonnet-4-5"))[0] == 200
    assert post(proxy, project="dev", body=messages_body(model="claude-opus-4-1"))[0] == 200  # not ci

    chat = json.dumps({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, body, fake_id = post(proxy, project="ci", host="api.openai.com", path="/v1/chat/completions", body=chat)
    assert status == 403 and fake_id not in fake.seen_ids
    assert json.loads(body)["error"]["code"] == "model_not_allowed" and "allow list" in json.loads(body)["error"]["message"]
    gemini = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
    status, _, body, _ = post(proxy, project="ci", host="generativelanguage.googleapis.com",
                              path="/v1beta/models/gemini-2.5-pro:generateContent", body=gemini)
    assert status == 403 and json.loads(body)["error"]["status"] == "PERMISSION_DENIED"
    # Calls that bill nothing are never refused: a model listing.
    conn = proxy.connection("api.openai.com")
    conn.request("GET", "/v1/models", headers={"X-Halton-Project": "ci"})
    assert conn.getresponse().status == 200
    conn.close()
    assert wait_for(lambda: len(events(proxy.db, "model_blocked")) == 3)


def test_a_large_or_expect_continue_body_is_read_whole_for_the_model_check(daemon, fake):
    proxy = daemon()
    assert cli(proxy.home, "policy", "deny", "claude-opus-*").returncode == 0
    time.sleep(0.6)
    padding = "x" * (300 * 1024)  # past the 64 KiB sent with the head
    for model, expected in (("claude-opus-4-1", 403), ("claude-sonnet-4-5", 200)):
        body = json.dumps({"max_tokens": 5, "messages": [{"role": "user", "content": padding}],
                           "model": model}).encode()  # the model after the long part
        for expect in (False, True):
            headers = {"Expect": "100-continue"} if expect else {}
            status, response_headers, _, fake_id = post(proxy, project="any", body=body, headers=headers)
            assert status == expected, (model, expect)
            if expected == 200:
                assert int(response_headers["x-fake-received-bytes"]) == len(body)
            else:
                assert fake_id not in fake.seen_ids
    chunked = proxy.connection()
    chunked.putrequest("POST", "/v1/messages")
    for name, value in (("Content-Type", "application/json"), ("Transfer-Encoding", "chunked"),
                        ("X-Halton-Project", "any")):
        chunked.putheader(name, value)
    chunked.endheaders()
    body = messages_body(model="claude-opus-4-1")
    for piece in (body[:10], body[10:]):
        chunked.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    chunked.send(b"0\r\n\r\n")
    assert chunked.getresponse().status == 403
    chunked.close()


def test_the_process_project_is_waited_for_when_a_rule_names_a_project(daemon, fake, tmp_path):
    proxy = daemon()
    assert cli(proxy.home, "policy", "deny", "--project", "from-env", "claude-opus-*").returncode == 0
    time.sleep(0.6)
    script = (
        "import http.client, json, ssl, sys\n"
        f"conn = http.client.HTTPSConnection('127.0.0.1', {proxy.port}, "
        f"context=ssl.create_default_context(cafile={str(proxy.bundle)!r}), timeout=15)\n"
        "conn.set_tunnel('api.anthropic.com', 443)\n"
        "conn.request('POST', '/v1/messages', body=sys.argv[1].encode(), headers={'content-type': 'application/json'})\n"
        "print(conn.getresponse().status)\n")
    env = {k: v for k, v in subprocess_env(proxy.home).items() if k != "HALTON_PROJECT"}
    for project, expected in (("from-env", "403"), ("elsewhere", "200")):
        done = subprocess.run([sys.executable, "-c", script, messages_body(model="claude-opus-4-1").decode()],
                              env={**env, "HALTON_PROJECT": project}, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=30)
        assert done.stdout.strip() == expected, done.stderr
    assert wait_for(lambda: [e["project"] for e in events(proxy.db, "model_blocked")] == ["from-env"])


def test_calls_in_flight_finish_when_their_budget_runs_out(daemon, fake):
    proxy = daemon()
    assert cli(proxy.home, "budget", "set", "--project", "capped", "--daily",
               f"{CALL_COST / 10**9:.9f}", "--action", "block").returncode == 0
    time.sleep(0.6)
    # A slow stream starts within budget...
    streaming = proxy.connection()
    streaming.request("POST", "/v1/messages", body=messages_body(stream=True),
                      headers={"content-type": "application/json", "X-Halton-Project": "capped",
                               "x-fake-events": "20", "x-fake-delay-ms": "50"})
    response = streaming.getresponse()
    assert response.status == 200
    first = response.read1(64)
    # ...and while it runs, another call uses the budget up.
    assert post(proxy)[0] == 200
    assert wait_for(lambda: events(proxy.db, "budget_blocking"))
    rest = first + response.read()
    assert rest.rstrip().endswith(b'data: {"type":"message_stop"}') or b"message_stop" in rest[-200:]
    streaming.close()
    assert post(proxy)[0] == 429
    assert wait_for(lambda: len(proxy.rows("capped")) == 2)
    assert all(row["outcome"] == "ok" for row in proxy.rows("capped"))


def test_no_policy_no_change_on_the_wire(daemon, fake):
    """Without budgets or rules the relay takes its usual path: nothing parsed before forwarding."""
    proxy = daemon()
    results = []

    def one():
        results.append(post(proxy, project=None)[0])

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [200] * 8
    assert events(proxy.db) == []


def test_tail_places_policy_events_among_the_calls(tmp_path):
    import io

    from halton_meter.tail import run_tail

    path = tmp_path / "db.sqlite"
    now = time.time()
    _seed(path, [_row("ci", 100, now - 30), _row("ci", 100, now - 10), _row("dev", 100, now - 5)])
    db = connect(path)
    with db:
        db.executemany(budgets.PolicyEvent.SQL, [
            budgets.PolicyEvent(kind="budget_blocking", message="daily budget used up", at=now - 20,
                                budget_id=1, project="ci").values(),
            budgets.PolicyEvent(kind="call_blocked", message="halton-meter: refused", at=now - 1,
                                project="ci").values(),
        ])
    out = io.StringIO()
    assert run_tail(path, lines=10, out=out) == 0
    lines = out.getvalue().splitlines()
    assert ["!! BUDGET" in line for line in lines] == [False, True, False, False, False]
    assert "!! REFUSED refused" in lines[4] and "ci" in lines[4]
    out = io.StringIO()
    assert run_tail(path, lines=10, projects=["dev"], as_json=True, out=out) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r.get("type") for r in records] == [None]  # ci's events are not dev's
    out = io.StringIO()
    assert run_tail(path, lines=10, projects=["ci"], as_json=True, out=out) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r.get("type", "call") for r in records] == ["call", "policy_event", "call", "policy_event"]
    assert records[1]["kind"] == "budget_blocking" and records[3]["message"] == "halton-meter: refused"
