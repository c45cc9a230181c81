"""`halton-meter report` and `tail` over real ledgers: exact figures in text, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from halton_meter import cli
from halton_meter.ledger import CallRow, Ledger, connect
from halton_meter.report import format_usd, usd_string
from tests.conftest import REPO, subprocess_env

HOUR = 3600.0
HOSTS = {"anthropic": "api.anthropic.com", "openai": "api.openai.com", "openrouter": "openrouter.ai",
         "xai": "api.x.ai"}


def call(n: int, at: float, *, project: str | None, provider: str, model: str | None, **fields) -> CallRow:
    defaults = dict(status=200, outcome="ok", billing="tokens", usage_status="exact", endpoint="messages",
                    client="claude-code", duration_ms=100.0)
    defaults.update(fields)
    return CallRow(call_id=f"call-{n}", started_at=at, host=HOSTS.get(provider, "api.example.com"),
                   method="POST", path="/v1/messages", project=project, provider=provider, model=model,
                   **defaults)


def standard_rows(now: float) -> list[CallRow]:
    """Nine calls in the last 30 days, one 40 days back; every figure below is derived from these."""
    return [
        call(1, now - 1 * HOUR, project="alpha", provider="anthropic", model="claude-sonnet-4-5",
             input_tokens=1000, cache_read_tokens=2000, cache_write_5m_tokens=300, cache_write_1h_tokens=200,
             output_tokens=400, cost_nanousd=12_345_678_901, duration_ms=1000.0),
        call(2, now - 2 * HOUR, project="alpha", provider="anthropic", model="claude-sonnet-4-5",
             input_tokens=500, output_tokens=100, cost_nanousd=464_000, duration_ms=3000.0),
        call(3, now - 3 * HOUR, project=None, provider="openai", model="gpt-5", endpoint="responses",
             client="openai-python", input_tokens=2_000_000, cache_read_tokens=1_000_000,
             output_tokens=1_500_000, cost_nanousd=1_234_567_890_123, duration_ms=500.0),
        call(4, now - 4 * HOUR, project="beta", provider="openrouter", model="qwen/qwen3-coder", client="curl",
             input_tokens=700, output_tokens=70, unpriced_reason="no price for model 'qwen/qwen3-coder'",
             provider_cost_nanousd=5_000_000, duration_ms=2000.0),
        call(5, now - 5 * HOUR, project="beta", provider="anthropic", model="claude-sonnet-4-5", status=529,
             outcome="provider_error", error_type="overloaded_error", usage_status="none", billing="none",
             duration_ms=200.0),
        call(6, now - 6 * HOUR, project="beta", provider="xai", model="grok-4", input_tokens=100,
             output_tokens=50, cost_nanousd=990_000_000, provider_cost_nanousd=1_000_000_000, duration_ms=800.0),
        call(7, now - 7 * HOUR, project="alpha", provider="anthropic", model="claude-sonnet-4-5",
             outcome="unparsed", usage_status="unknown"),
        call(8, now - 8 * HOUR, project="alpha", provider="anthropic", model="claude-sonnet-4-5",
             endpoint="batch_results", usage_status="duplicate", cost_nanousd=0),
        call(9, now - 40 * 24 * HOUR, project="gamma", provider="anthropic", model="claude-haiku-4-5",
             input_tokens=9, output_tokens=9, cost_nanousd=9),
        call(10, now - 9 * HOUR, project="gamma", provider="anthropic", model="claude-haiku-4-5",
             outcome="client_cancelled", usage_status="partial", input_tokens=10, output_tokens=5,
             cost_nanousd=100_000, duration_ms=50.0),
    ]


TOTAL_COST = 12_345_678_901 + 464_000 + 1_234_567_890_123 + 990_000_000 + 100_000  # 1,247.904133024


def write_ledger(home: Path, rows: list[CallRow]) -> Path:
    path = home / "db.sqlite"
    ledger = Ledger(path)
    ledger.start()
    for row in rows:
        ledger.record(row)
    ledger.close()
    assert ledger.rows_written == len(rows)
    return path


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def standard(home) -> Path:
    write_ledger(home, standard_rows(time.time()))
    return home


@pytest.fixture
def new_york():
    """Local time with DST (2025-03-09 02:00 EST -> 03:00 EDT), for buckets and date parsing."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def run(capsys, home: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--home", str(home), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_json(capsys, home: Path, *args: str) -> dict:
    code, out, err = run(capsys, home, "report", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def keys(data: dict, grouping: str) -> list:
    return [row["key"] for row in data["groups"][grouping]]


# --- money -------------------------------------------------------------------------------------


@pytest.mark.parametrize("nanousd, text", [
    (0, "$0.00"), (1, "$0.000000001"), (464_000, "$0.000464"), (100_000, "$0.0001"),
    (12_345_678, "$0.0123"), (12_355_000, "$0.0124"), (500_000_000, "$0.50"), (990_000_000, "$0.99"),
    (999_400_000, "$0.999"), (999_600_000, "$1.00"), (1_000_000_000, "$1.00"), (12_345_678_901, "$12.35"),
    (1_234_567_890_123, "$1,234.57"), (-464_000, "-$0.000464"),
])
def test_dollars_are_readable_at_every_scale(nanousd, text):
    assert format_usd(nanousd) == text


def test_exact_dollar_strings_keep_every_nanodollar():
    assert usd_string(464_000) == "0.000464000"
    assert usd_string(TOTAL_COST) == "1247.904133024"
    assert usd_string(0) == "0.000000000"
    assert usd_string(-5) == "-0.000000005"


# --- JSON -----------------------------------------------------------------------------------------


def test_json_totals_groups_and_callouts(capsys, standard):
    data = report_json(capsys, standard)
    assert data["schema"] == "halton-meter.report/1"
    assert data["totals"] == {
        "calls": 9, "projects": 4, "models": 5,
        "input_tokens": 1000 + 500 + 2_000_000 + 700 + 100 + 10,
        "cache_read_tokens": 1_002_000, "cache_write_tokens": 500,
        "output_tokens": 400 + 100 + 1_500_000 + 70 + 50 + 5,
        "cost_nanousd": TOTAL_COST, "cost_usd": "1247.904133024", "unpriced_calls": 1,
        "avg_duration_ms": round((1000 + 3000 + 500 + 2000 + 200 + 800 + 100 + 100 + 50) / 9, 1),
        "duplicate_calls": 1,
    }
    assert keys(data, "project") == ["default", "alpha", "beta", "gamma"]  # cost, descending
    alpha = data["groups"]["project"][1]
    assert alpha == {
        "key": "alpha", "calls": 4, "input_tokens": 1500, "cache_read_tokens": 2000, "cache_write_tokens": 500,
        "output_tokens": 500, "cost_nanousd": 12_346_142_901, "cost_usd": "12.346142901", "unpriced_calls": 0,
        "avg_duration_ms": 1050.0, "cost_share_pct": round(100 * 12_346_142_901 / TOTAL_COST, 2),
    }
    assert alpha["cost_share_pct"] == 0.99
    assert keys(data, "model") == ["gpt-5", "claude-sonnet-4-5", "grok-4", "claude-haiku-4-5", "qwen/qwen3-coder"]
    sonnet = data["groups"]["model"][1]
    assert (sonnet["calls"], sonnet["cost_nanousd"], sonnet["avg_duration_ms"]) == (5, 12_346_142_901, 880.0)
    assert data["unpriced"] == {
        "calls": 1, "input_tokens": 700, "cache_read_tokens": 0, "cache_write_tokens": 0, "output_tokens": 70,
        "models": [{"model": "qwen/qwen3-coder", "reason": "no price for model 'qwen/qwen3-coder'", "calls": 1,
                    "input_tokens": 700, "cache_read_tokens": 0, "cache_write_tokens": 0, "output_tokens": 70}],
        "fix": "add prices under [pricing.models] in config.toml or `halton-meter pricing import FILE`",
    }
    assert data["usage_unknown"] == 2
    assert data["usage_unknown_by_status"] == {"unknown": 1, "partial": 1}
    assert data["provider_errors"] == {"calls": 1, "by_error_type": {"overloaded_error": 1}}
    assert data["provider_cost"] == {
        "calls": 2, "provider_cost_nanousd": 1_005_000_000, "provider_cost_usd": "1.005000000",
        "computed_cost_nanousd": 990_000_000, "computed_cost_usd": "0.990000000", "computed_calls": 1,
    }


def test_money_in_json_is_never_a_float(capsys, standard):
    data = report_json(capsys, standard, "--by", "day")

    def walk(value, name=""):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, key)
        elif isinstance(value, list):
            for item in value:
                walk(item, name)
        elif name.endswith("_nanousd"):
            assert type(value) is int, name
        elif name.endswith("_usd"):
            assert isinstance(value, str), name

    walk(data)


def test_null_keys_and_the_default_project_group_together(capsys, tmp_path):
    now = time.time()
    rows = standard_rows(now) + [
        call(11, now - HOUR, project="default", provider="anthropic", model=None, cost_nanousd=7),  # merges into NULL
        call(12, now - HOUR, project=None, provider=None, model=None, client=None, endpoint=None),
    ]
    home = write_ledger(tmp_path / "home", rows).parent
    by = ("--by", "project", "--by", "model", "--by", "provider", "--by", "client", "--by", "endpoint")
    a = report_json(capsys, home, *by)
    default = a["groups"]["project"][0]
    assert (default["key"], default["calls"], default["cost_nanousd"]) == ("default", 3, 1_234_567_890_130)
    assert {row["key"]: (row["calls"], row["cost_nanousd"]) for row in a["groups"]["model"]}[None] == (2, 7)
    assert keys(a, "model")[-2:] == [None, "qwen/qwen3-coder"]  # $0.000000007, then nothing priced
    assert {row["key"]: row["calls"] for row in a["groups"]["provider"]} == {
        "openai": 1, "anthropic": 7, "xai": 1, "openrouter": 1, None: 1}
    assert {row["key"]: row["calls"] for row in a["groups"]["endpoint"]} == {
        "responses": 1, "messages": 8, "batch_results": 1, None: 1}


# --- filters and windows ------------------------------------------------------------------------


def test_filters(capsys, standard):
    alpha = report_json(capsys, standard, "--project", "alpha")
    assert alpha["totals"]["calls"] == 4 and alpha["totals"]["cost_nanousd"] == 12_346_142_901
    assert alpha["filters"] == {"project": ["alpha"], "provider": [], "model": []}
    assert alpha["usage_unknown"] == 1 and alpha["provider_errors"]["calls"] == 0
    assert alpha["totals"]["duplicate_calls"] == 1 and alpha["unpriced"]["calls"] == 0

    default = report_json(capsys, standard, "--project", "default")
    assert keys(default, "project") == ["default"] and default["totals"]["cost_nanousd"] == 1_234_567_890_123

    two = report_json(capsys, standard, "--project", "beta", "--project", "gamma")
    assert keys(two, "project") == ["beta", "gamma"] and two["totals"]["calls"] == 4

    openai = report_json(capsys, standard, "--provider", "openai")
    assert keys(openai, "model") == ["gpt-5"] and openai["totals"]["input_tokens"] == 2_000_000

    grok = report_json(capsys, standard, "--model", "grok-4")
    assert grok["totals"]["calls"] == 1 and grok["provider_cost"]["calls"] == 1
    assert grok["unpriced"]["calls"] == 0

    beta_anthropic = report_json(capsys, standard, "--project", "beta", "--provider", "anthropic")
    assert beta_anthropic["totals"]["calls"] == 1 and beta_anthropic["provider_errors"]["calls"] == 1

    nothing = report_json(capsys, standard, "--model", "no-such-model")
    assert nothing["totals"]["calls"] == 0 and nothing["groups"] == {"project": [], "model": []}


def test_since_and_until(capsys, standard):
    assert report_json(capsys, standard, "--since", "90m")["totals"]["calls"] == 1
    assert report_json(capsys, standard, "--since", "150m")["totals"]["calls"] == 2
    assert report_json(capsys, standard, "--since", "6w")["totals"]["calls"] == 10
    last_day_ago = report_json(capsys, standard, "--since", "60d", "--until", "1d")
    assert last_day_ago["totals"]["calls"] == 1 and keys(last_day_ago, "project") == ["gamma"]
    recent = report_json(capsys, standard, "--since", "210m", "--until", "90m")  # calls 2 and 3
    assert keys(recent, "project") == ["default", "alpha"] and recent["totals"]["calls"] == 2


def test_local_dates_and_buckets_across_dst(capsys, tmp_path, new_york):
    def local(text: str) -> float:
        from datetime import datetime

        return datetime.fromisoformat(text).timestamp()

    times = ["2025-03-08T23:30", "2025-03-09T00:30", "2025-03-09T23:30", "2025-03-10T00:10",
             "2025-03-31T23:59", "2025-04-01T00:00", "2025-02-28T23:59"]
    rows = [call(n, local(t), project="p", provider="anthropic", model="m", cost_nanousd=10 ** n)
            for n, t in enumerate(times)]
    home = write_ledger(tmp_path / "home", rows).parent
    data = report_json(capsys, home, "--since", "2025-03-01", "--until", "2025-04-30",
                       "--by", "day", "--by", "week", "--by", "month")
    assert data["window"] == {"since": "2025-03-01T00:00:00-05:00", "until": "2025-05-01T00:00:00-04:00"}
    assert [(r["key"], r["calls"]) for r in data["groups"]["day"]] == [
        ("2025-03-08", 1), ("2025-03-09", 2), ("2025-03-10", 1), ("2025-03-31", 1), ("2025-04-01", 1)]
    assert [(r["key"], r["calls"]) for r in data["groups"]["week"]] == [
        ("2025-W10", 3), ("2025-W11", 1), ("2025-W14", 2)]
    assert [(r["key"], r["calls"], r["cost_nanousd"]) for r in data["groups"]["month"]] == [
        ("2025-03", 5, 1 + 10 + 100 + 1000 + 10_000), ("2025-04", 1, 100_000)]
    # A date alone as --until includes that day; a date-time is exclusive.
    march = report_json(capsys, home, "--since", "2025-03-01", "--until", "2025-03-31", "--by", "month")
    assert [(r["key"], r["calls"]) for r in march["groups"]["month"]] == [("2025-03", 5)]
    evening = report_json(capsys, home, "--since", "2025-03-09T00:30", "--until", "2025-03-09T23:30")
    assert evening["totals"]["calls"] == 1
    utc = report_json(capsys, home, "--since", "2025-03-10T03:30Z", "--until", "2025-03-10T04:00Z")
    assert utc["totals"]["calls"] == 1  # 23:30 EDT on the 9th is 03:30 UTC on the 10th


# --- text and CSV ---------------------------------------------------------------------------------


def test_text_report(capsys, standard):
    code, out, err = run(capsys, standard, "report")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("Window   ") and lines[0].endswith("(local time)")
    assert lines[1:4] == [
        "Calls    9 across 4 projects and 5 models",
        "Tokens   in 2,002,310 (uncached)  cache read 1,002,000  cache write 500  out 1,500,625",
        "Cost     $1,247.90  (without 1 unpriced call, see below)",
    ]
    tables = out.split("\n\n")
    assert tables[1].splitlines() == [
        "By project",
        "project  calls      input  cache read  cache write     output       cost  avg ms  share",
        "-------  -----  ---------  ----------  -----------  ---------  ---------  ------  -----",
        "default      1  2,000,000   1,000,000            0  1,500,000  $1,234.57     500  98.9%",
        "alpha        4      1,500       2,000          500        500     $12.35   1,050   1.0%",
        "beta         3        800           0            0        120     $0.99*   1,000   0.1%",
        "gamma        1         10           0            0          5    $0.0001      50   0.0%",
    ]
    assert tables[2].splitlines()[3:] == [
        "gpt-5                  1  2,000,000   1,000,000            0  1,500,000  $1,234.57     500  98.9%",
        "claude-sonnet-4-5      5      1,500       2,000          500        500     $12.35     880   1.0%",
        "grok-4                 1        100           0            0         50      $0.99     800   0.1%",
        "claude-haiku-4-5       1         10           0            0          5    $0.0001      50   0.0%",
        "qwen/qwen3-coder       1        700           0            0         70       n/a*   2,000   0.0%",
    ]
    assert tables[3] == "* includes unpriced calls, whose cost is not counted."
    assert tables[4].splitlines() == [
        "Unpriced calls: 1 (700 in, 0 cache read, 0 cache write, 70 out), not in the cost above:",
        "  qwen/qwen3-coder  1 call  no price for model 'qwen/qwen3-coder'",
        "  Fix: add prices under [pricing.models] in config.toml or `halton-meter pricing import FILE`.",
    ]
    assert tables[5].startswith("Usage unknown: 2 calls (1 unknown, 1 partial)")
    assert tables[6] == "Provider errors: 1 call (overloaded_error 1)."
    assert tables[7] == ("Provider-reported cost: $1.01 on 2 calls "
                         "(computed here: $0.99 for the 1 of them that are priced).")
    assert tables[8].startswith("Batch duplicates: 1 call re-downloaded results already counted")


def test_csv_has_one_row_per_grouping_and_key(capsys, standard):
    code, out, _ = run(capsys, standard, "report", "--csv", "--by", "project", "--by", "provider")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["grouping", "key", "calls", "input_tokens", "cache_read_tokens", "cache_write_tokens",
                       "output_tokens", "cost_nanousd", "cost_usd", "unpriced_calls", "avg_duration_ms",
                       "cost_share_pct"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("project", "default"), ("project", "alpha"), ("project", "beta"), ("project", "gamma"),
        ("provider", "openai"), ("provider", "anthropic"), ("provider", "xai"), ("provider", "openrouter")]
    assert rows[2] == ["project", "alpha", "4", "1500", "2000", "500", "500", "12346142901", "12.346142901",
                       "0", "1050.0", "0.99"]
    assert rows[-1] == ["provider", "openrouter", "1", "700", "0", "0", "70", "0", "0.000000000", "1",
                        "2000.0", "0.0"]
    assert "\r" not in out


def test_empty_ledger_says_what_to_do(capsys, home):
    code, out, err = run(capsys, home, "report")
    assert (code, err) == (0, "")
    assert out.startswith("No captures yet.\n") and "halton-meter serve" in out
    assert not (home / "db.sqlite").exists()  # a report never creates a ledger
    connect(home / "db.sqlite").close()
    assert run(capsys, home, "report")[1].startswith("No captures yet.")
    data = report_json(capsys, home)
    assert data["totals"]["calls"] == 0 and data["totals"]["cost_usd"] == "0.000000000"
    assert data["groups"] == {"project": [], "model": []}
    code, out, _ = run(capsys, home, "tail")
    assert code == 0 and out.startswith("No captures yet.")


def test_quiet_window_is_not_mistaken_for_an_empty_ledger(capsys, standard):
    code, out, _ = run(capsys, standard, "report", "--since", "30m")
    assert code == 0
    assert "none in this window" in out and "No captures yet" not in out


# --- the real command line --------------------------------------------------------------------------


def cli_process(home: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "halton_meter", "--home", str(home), *args],
                          capture_output=True, text=True, env=subprocess_env(home), cwd=str(REPO),
                          timeout=60, **kwargs)


def test_cli_json_matches_in_process(capsys, home):
    write_ledger(home, standard_rows(time.time()))
    done = cli_process(home, "report", "--json", "--since", "31d")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"] == report_json(capsys, home, "--since", "31d")["totals"]


@pytest.mark.parametrize("args, message", [
    (("--since", "7x"), "--since '7x' is not a time"),
    (("--until", "yesterday"), "--until 'yesterday' is not a time"),
    (("--since", "1h", "--until", "2h"), "is not before --until"),
    (("--by", "colour"), "invalid choice: 'colour'"),
    (("--json", "--csv"), "not allowed with argument"),
])
def test_usage_errors_exit_2(home, args, message):
    done = cli_process(home, "report", *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_unreadable_ledger_exits_1(home):
    home.mkdir()
    (home / "db.sqlite").write_bytes(b"not a database, just bytes" * 100)
    done = cli_process(home, "report")
    assert done.returncode == 1
    assert "cannot read the ledger" in done.stderr and "Traceback" not in done.stderr


def test_home_after_the_command(home):
    write_ledger(home, standard_rows(time.time()))
    done = subprocess.run([sys.executable, "-m", "halton_meter", "report", "--home", str(home), "--json"],
                          capture_output=True, text=True, env=subprocess_env(home.parent / "elsewhere"),
                          cwd=str(REPO), timeout=60)
    assert json.loads(done.stdout)["totals"]["calls"] == 9


# --- tail ------------------------------------------------------------------------------------------


def test_tail_prints_the_latest_calls_oldest_first(capsys, home, new_york):
    now = time.time()
    write_ledger(home, standard_rows(now))
    code, out, _ = run(capsys, home, "tail", "-n", "4")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert [line.split()[2] for line in lines] == ["alpha", "alpha", "gamma", "gamma"]  # ids 7, 8, 9, 10
    unparsed, duplicate, old, cancelled = lines
    assert unparsed.split()[3:8] == ["anthropic", "claude-sonnet-4-5", "200", "unparsed", "in"]
    assert "usage unknown" in unparsed
    assert cancelled.endswith("$0.0001      50 ms  claude-code")
    assert "in 10 out 5" in cancelled and "client_cancelled" in cancelled
    from datetime import datetime

    assert cancelled.startswith(datetime.fromtimestamp(now - 9 * HOUR).strftime("%Y-%m-%d %H:%M:%S"))

    code, out, _ = run(capsys, home, "tail", "-n", "20")
    lines = out.splitlines()
    assert len(lines) == 10
    first = lines[0]
    assert "$12.35" in first and "in 1,000 out 400 cache read 2,000" in first and "1,000 ms" in first
    assert "$0.000464" in lines[1]
    assert "default" in lines[2] and "$1,234.57" in lines[2] and lines[2].endswith("openai-python")
    assert "unpriced" in lines[3] and "529 provider_error" in lines[4]
    assert lines[7].split()[-4:] == ["duplicate", "100", "ms", "claude-code"]

    code, out, _ = run(capsys, home, "tail", "-n", "2", "--project", "beta", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in records] == [5, 6]
    assert records[1] == {
        "id": 6, "call_id": "call-6", "started_at": records[1]["started_at"], "project": "beta",
        "provider": "xai", "model": "grok-4", "endpoint": "messages", "client": "claude-code", "status": 200,
        "outcome": "ok", "error_type": None, "usage_status": "exact", "input_tokens": 100,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "output_tokens": 50, "cost_nanousd": 990_000_000,
        "cost_usd": "0.990000000", "unpriced_reason": None, "duration_ms": 800.0,
    }
    assert records[1]["started_at"].endswith(("-05:00", "-04:00"))
    code, out, _ = run(capsys, home, "tail", "--project", "default", "--json")
    assert [json.loads(line)["call_id"] for line in out.splitlines()] == ["call-3"]


def test_tail_follow_prints_new_calls_until_ctrl_c(home):
    now = time.time()
    write_ledger(home, standard_rows(now)[:3])
    process = subprocess.Popen(
        [sys.executable, "-m", "halton_meter", "--home", str(home), "tail", "-f", "-n", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(home), cwd=str(REPO))
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        wait_for(lambda: len(lines) >= 1)
        assert "gpt-5" in lines[0]
        ledger = Ledger(home / "db.sqlite")
        ledger.start()
        ledger.record(call(50, time.time(), project="late", provider="anthropic", model="claude-opus-4-1",
                           input_tokens=12_345, output_tokens=678, cost_nanousd=464_000))
        ledger.close()
        wait_for(lambda: len(lines) >= 2)
        assert "late" in lines[1] and "claude-opus-4-1" in lines[1] and "in 12,345 out 678" in lines[1]
        assert "$0.000464" in lines[1]
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert "Traceback" not in process.stderr.read()
        assert len(lines) == 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
