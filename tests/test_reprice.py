"""Costs are stored with their rates and change only through `reprice`; `pricing` CLI commands."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

from halton_meter.ledger import CallRow, Ledger
from halton_meter.pricing import PriceTable
from tests.conftest import REPO, subprocess_env


def cli(home, *args):
    return subprocess.run([sys.executable, "-m", "halton_meter", *args], capture_output=True, text=True,
                          env=subprocess_env(home), cwd=str(REPO), timeout=60)


def sonnet_row(n: int, **fields) -> CallRow:
    values = dict(call_id=f"c{n}", started_at=time.time() - 3600, host="api.anthropic.com", method="POST",
                  path="/v1/messages", status=200, provider="anthropic", endpoint="messages", billing="tokens",
                  usage_status="exact", request_model="claude-sonnet-4-5",
                  response_model="claude-sonnet-4-5-20250929", model="claude-sonnet-4-5-20250929",
                  input_tokens=1000, output_tokens=100, project="p")
    values.update(fields)
    return CallRow(**values)


def write(home, rows):
    ledger = Ledger(home / "db.sqlite", prices=PriceTable.load(home))
    ledger.start()
    for row in rows:
        ledger.record(row)
    ledger.close()
    return sqlite3.connect(home / "db.sqlite")


def test_writer_prices_rows_and_stores_the_rates_used(tmp_path):
    db = write(tmp_path, [sonnet_row(1), sonnet_row(2), sonnet_row(3, response_model="mystery-1", model="mystery-1",
                                                                    request_model="mystery-1")])
    rows = db.execute("SELECT cost_nanousd, price_model, pricing_id, unpriced_reason FROM calls ORDER BY id").fetchall()
    assert rows[0][:2] == (1000 * 3000 + 100 * 15000, "claude-sonnet-4-5")
    assert rows[0][2] == rows[1][2] is not None  # one pricing_rates row shared by equal rates
    assert rows[2][0] is None and "mystery-1" in rows[2][3]
    rates = json.loads(db.execute("SELECT rates_json FROM pricing_rates WHERE id = ?", (rows[0][2],)).fetchone()[0])
    assert "claude-sonnet-4-5" in json.dumps(rates) and "15" in json.dumps(rates)


def test_price_edit_changes_nothing_until_reprice(tmp_path):
    home = tmp_path
    write(home, [sonnet_row(1), sonnet_row(2, started_at=time.time() - 10 * 86400)]).close()
    (home / "config.toml").write_text('[pricing.models."claude-sonnet-4-5"]\nprovider = "anthropic"\n'
                                      'input = 4\noutput = 20\n')
    before = sqlite3.connect(home / "db.sqlite").execute("SELECT cost_nanousd FROM calls ORDER BY id").fetchall()
    assert before == [(3_000_000 + 1_500_000,)] * 2

    dry = cli(home, "reprice", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 would change" in dry.stdout
    assert sqlite3.connect(home / "db.sqlite").execute("SELECT cost_nanousd FROM calls").fetchall() == before

    result = cli(home, "reprice", "--since", "7d")
    assert result.returncode == 0, result.stderr
    assert "Repriced 1 calls: 1 changed" in result.stdout
    db = sqlite3.connect(home / "db.sqlite")
    after = db.execute("SELECT cost_nanousd FROM calls ORDER BY id").fetchall()
    assert after == [(1000 * 4000 + 100 * 20000,), (4_500_000,)]  # the older row was outside --since
    ids = db.execute("SELECT pricing_id FROM calls ORDER BY id").fetchall()
    assert ids[0] != ids[1]
    event = db.execute("SELECT detail FROM audit_events WHERE kind = 'reprice'").fetchone()
    assert json.loads(event[0])["changed"] == 1


def test_reprice_prices_rows_that_were_unpriced(tmp_path):
    write(tmp_path, [sonnet_row(1, response_model="inhouse-7", model="inhouse-7", request_model="inhouse-7")]).close()
    (tmp_path / "config.toml").write_text('[pricing.models."inhouse-7"]\nprovider = "anthropic"\n'
                                          'input = 1\noutput = 2\n')
    assert cli(tmp_path, "reprice").returncode == 0
    row = sqlite3.connect(tmp_path / "db.sqlite").execute(
        "SELECT cost_nanousd, price_model, unpriced_reason FROM calls").fetchone()
    assert row == (1000 * 1000 + 100 * 2000, "inhouse-7", None)


def test_reprice_with_no_ledger_and_a_bad_since(tmp_path):
    assert "nothing to reprice" in cli(tmp_path, "reprice").stdout
    bad = cli(tmp_path, "reprice", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_pricing_show_and_import(tmp_path):
    shown = cli(tmp_path, "pricing", "show", "gpt-4.1-2025-04-14", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "gpt-4.1" in shown.stdout
    assert cli(tmp_path, "pricing", "show", "no-such-model-9").returncode == 1

    litellm = tmp_path / "prices.json"
    litellm.write_text(json.dumps({
        "sample_spec": {"input_cost_per_token": 0},
        "acme-coder-2": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1.5e-06,
                         "output_cost_per_token": 6e-06},
    }))
    imported = cli(tmp_path, "pricing", "import", str(litellm))
    assert imported.returncode == 0, imported.stderr
    assert "Imported 1 model prices" in imported.stdout
    shown = cli(tmp_path, "pricing", "show", "acme-coder-2")
    assert shown.returncode == 0 and "1.5" in shown.stdout and "imported" in shown.stdout
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    failed = cli(tmp_path, "pricing", "import", str(broken))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr


def test_malformed_price_override_is_a_clear_error(tmp_path):
    (tmp_path / "config.toml").write_text('[pricing.models."x"]\ninput = "cheap"\n')
    result = cli(tmp_path, "pricing", "show")
    assert result.returncode == 1 and "Traceback" not in result.stderr and "x" in result.stderr
