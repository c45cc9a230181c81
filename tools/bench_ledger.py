"""Benchmark the ledger: rows/s through the writer, and `report` over a million-row ledger.

    python tools/bench_ledger.py [--rows 200000] [--report-rows 1000000] [--runs 5] [--db PATH] [--json]

Ingest: --rows realistic calls are built first, then pushed through `Ledger.record` and timed until
`close()` returns (every row committed); once without pricing and, when halton_meter.pricing
exists, with `PriceTable.load()` as `prices=` (the schema's report indexes included). Target: at
least 5,000 rows/s.

Report: --report-rows calls spread over 60 days (20 projects, 30 models, 8 providers) are written
with executemany into a temp file (or --db PATH, kept, and reused when it already exists), then
`report.run_report` (the CLI's code path, in-process) is timed --runs times, default window and
groupings, and three heavier variants: median, min and max.
Target: at most 1 s. Prints a table, or JSON with --json ({"environment", "ingest": [...],
"report": {...}}); exits 0 whatever the figures are, 1 only when setup fails.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from halton_meter import report  # noqa: E402
from halton_meter.ledger import CallRow, Ledger, connect  # noqa: E402

INGEST_TARGET_ROWS_S = 5_000
REPORT_TARGET_S = 1.0
SPREAD_DAYS = 60

# provider -> (host, path, endpoint, models, client families)
PROVIDERS = {
    "anthropic": ("api.anthropic.com", "/v1/messages", "messages",
                  ("claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5", "claude-3-5-haiku",
                   "claude-sonnet-4"), ("claude-code", "anthropic-python", "anthropic-js")),
    "openai": ("api.openai.com", "/v1/responses", "responses",
               ("gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4o", "o3", "o4-mini"),
               ("codex", "openai-python", "openai-js")),
    "gemini": ("generativelanguage.googleapis.com", "/v1beta/models/gemini:streamGenerateContent",
               "generate_content", ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
                                    "gemini-2.0-flash"), ("gemini-cli", "google-genai")),
    "xai": ("api.x.ai", "/v1/chat/completions", "chat_completions",
            ("grok-4", "grok-code-fast-1", "grok-3-mini"), ("openai-python", "curl")),
    "groq": ("api.groq.com", "/openai/v1/chat/completions", "chat_completions",
             ("llama-3.3-70b-versatile", "qwen3-32b"), ("openai-python",)),
    "deepseek": ("api.deepseek.com", "/chat/completions", "chat_completions",
                 ("deepseek-chat", "deepseek-reasoner"), ("openai-python", "cursor")),
    "mistral": ("api.mistral.ai", "/v1/chat/completions", "chat_completions",
                ("mistral-large-latest", "codestral-latest", "mistral-small-latest"), ("mistral-python",)),
    "openrouter": ("openrouter.ai", "/api/v1/chat/completions", "chat_completions",
                   ("anthropic/claude-sonnet-4.5", "openai/gpt-5", "meta-llama/llama-4-maverick",
                    "qwen/qwen3-coder"), ("cursor", "openai-python")),
}
UNPRICED_MODELS = {"qwen/qwen3-coder", "codestral-latest"}  # as if missing from the rate table
PROVIDER_COST = {"openrouter", "xai"}  # providers that report what they charged
PROJECTS = (None,) + tuple(f"project-{name}" for name in (
    "atlas", "bramble", "cinder", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
    "kestrel", "lumen", "meadow", "nimbus", "orchid", "pylon", "quartz", "rivet", "summit"))
COLUMNS = ("call_id", "started_at", "host", "method", "path", "status", "outcome", "error", "is_stream",
           "request_bytes", "response_bytes", "ttfb_ms", "duration_ms", "project", "model", "user_agent",
           "provider", "endpoint", "client", "request_id", "request_model", "response_model", "error_type",
           "billing", "usage_status", "input_tokens", "cache_read_tokens", "cache_write_5m_tokens",
           "output_tokens", "reasoning_tokens", "usage_json", "provider_cost_nanousd", "cost_nanousd",
           "price_model", "unpriced_reason")
# Rough per-million-token rates in nano-dollars per token: input, cache read, cache write, output.
RATES = (3_000, 300, 3_750, 15_000)


class BenchError(Exception):
    """Setup failed: nothing to measure."""


def realistic_rows(count: int, *, seed: int = 1, days: int = SPREAD_DAYS, end: float | None = None):
    """`count` tuples in COLUMNS order, in time order over the `days` before `end` (Zipf-ish mixes)."""
    rnd = random.Random(seed)
    end = time.time() if end is None else end
    models = [(provider, model) for provider, spec in PROVIDERS.items() for model in spec[3]]
    model_weights = [1 / (rank + 1) ** 0.7 for rank in range(len(models))]
    project_weights = [1 / (rank + 1) for rank in range(len(PROJECTS))]
    starts = sorted(rnd.uniform(end - days * 86400, end) for _ in range(count))
    picked_models = rnd.choices(models, model_weights, k=count)
    picked_projects = rnd.choices(PROJECTS, project_weights, k=count)
    rolls = [rnd.random() for _ in range(count)]
    randint, uniform, getrandbits = rnd.randint, rnd.uniform, rnd.getrandbits
    for n in range(count):
        provider, model = picked_models[n]
        host, path, endpoint, _, clients = PROVIDERS[provider]
        client = clients[n % len(clients)]
        inp, read, write, out = randint(10, 5000), randint(0, 60_000), randint(0, 2000), randint(10, 3000)
        reasoning = out // 3 if model.startswith(("o3", "o4", "gpt-5", "deepseek-reasoner")) else None
        status, outcome, error_type, usage = 200, "ok", None, "exact"
        roll = rolls[n]
        if roll < 0.02:
            status, outcome, usage = 529, "provider_error", "none"
            error_type = "overloaded_error" if roll < 0.012 else "rate_limit_error"
            inp = read = write = out = 0
            reasoning = None
        elif roll < 0.03:
            outcome, usage = "client_cancelled", "partial"
        elif roll < 0.033:
            outcome, usage = "unparsed", "unknown"
            inp = read = write = out = 0
        cost = reason = None
        if usage in ("exact", "partial"):
            if model in UNPRICED_MODELS:
                reason = f"no price for model {model!r}"
            else:
                cost = inp * RATES[0] + read * RATES[1] + write * RATES[2] + out * RATES[3]
        duration = uniform(300, 45_000)
        yield (
            f"{getrandbits(128):032x}", starts[n], host, "POST", path, status, outcome,
            None if status == 200 else "overloaded", 1, 4000 + inp * 4, 800 + out * 6,
            min(duration, uniform(200, 3000)), duration, picked_projects[n], model, f"{client}/1.0",
            provider, endpoint, client, f"req_{getrandbits(64):016x}", model, model, error_type,
            "tokens", usage, inp, read, write, out, reasoning,
            '{"input_tokens":%d,"cache_read_input_tokens":%d,"cache_creation_input_tokens":%d,'
            '"output_tokens":%d}' % (inp, read, write, out),
            cost + cost // 50 if cost is not None and provider in PROVIDER_COST else None,
            cost, model if cost is not None else None, reason,
        )


# --- ingest -----------------------------------------------------------------------------------


def bench_ingest(rows: int, workdir: Path) -> list[dict]:
    calls = [CallRow(**dict(zip(COLUMNS, values))) for values in realistic_rows(rows, seed=2)]
    prices, pricing_note = _price_table()
    results = []
    for priced in (False, True):
        if priced and prices is None:
            continue
        path = workdir / f"ingest-{int(priced)}.sqlite"
        for row in calls:  # the writer fills these in when it prices; start each run clean
            row.cost_nanousd = row.price_model = row.pricing_id = row.unpriced_reason = None
        ledger = Ledger(path, prices=prices if priced else None)
        ledger.start()
        started = time.perf_counter()
        for row in calls:
            ledger.record(row)
        ledger.close(timeout=600)
        seconds = time.perf_counter() - started
        results.append({
            "name": "schema as migrated" + (", priced" if priced else ", no pricing"),
            "rows": ledger.rows_written, "lost": ledger.rows_lost, "seconds": round(seconds, 3),
            "rows_per_s": round(ledger.rows_written / seconds), "pricing": priced,
            "note": pricing_note if priced else None,
        })
        path.unlink()
        for suffix in ("-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    if prices is None:
        results.append({"name": "priced", "skipped": pricing_note})
    return results


def _price_table():
    try:
        from halton_meter.pricing import PriceTable
    except ImportError:
        return None, "halton_meter.pricing is not there yet"
    try:
        return PriceTable.load(), "PriceTable.load()"
    except Exception as exc:  # noqa: BLE001 - report it, measure the rest
        return None, f"PriceTable.load() failed: {type(exc).__name__}: {exc}"


# --- report -----------------------------------------------------------------------------------


def generate(path: Path, rows: int) -> float:
    """Write `rows` calls straight into a fresh ledger; returns seconds taken."""
    started = time.perf_counter()
    db = connect(path)
    db.execute("PRAGMA synchronous = OFF")  # a benchmark fixture: speed over durability
    insert = f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    batch = []
    db.execute("BEGIN")
    for values in realistic_rows(rows, seed=1):
        batch.append(values)
        if len(batch) == 50_000:
            db.executemany(insert, batch)
            batch.clear()
    db.executemany(insert, batch)
    db.execute("INSERT OR IGNORE INTO projects (name, created_at) "
               "SELECT COALESCE(project, 'default'), MIN(started_at) FROM calls GROUP BY 1")
    db.execute("COMMIT")
    db.close()
    return time.perf_counter() - started


def time_report(path: Path, runs: int, **options) -> dict:
    seconds = []
    for _ in range(runs):
        out, err = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        code = report.run_report(path, out=out, err=err, **options)
        seconds.append(time.perf_counter() - started)
        if code != 0:
            raise BenchError(f"report exited {code}: {err.getvalue().strip()}")
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3), "runs": [round(s, 3) for s in seconds]}


def bench_report(rows: int, runs: int, db_path: Path | None, workdir: Path) -> dict:
    path = db_path or workdir / "report.sqlite"
    reused = path.exists()
    generated_s = None if reused else generate(path, rows)
    db = connect(path)
    total = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    in_window = db.execute("SELECT COUNT(*) FROM calls WHERE started_at >= ?",
                           (time.time() - 30 * 86400,)).fetchone()[0]
    span_days = db.execute("SELECT (MAX(started_at) - MIN(started_at)) / 86400 FROM calls").fetchone()[0] or 0
    db.close()
    cases = []
    label = "schema as migrated"
    everything = f"{int(span_days) + 2}d"
    cases += [
        {"name": f"{label}: default", **time_report(path, runs)},
        {"name": f"{label}: --since {everything} (all rows)", **time_report(path, runs, since=everything)},
        {"name": f"{label}: --by day --by week --by month",
         **time_report(path, runs, by=("day", "week", "month"))},
        {"name": f"{label}: --by provider --by client --by endpoint",
         **time_report(path, runs, by=("provider", "client", "endpoint"))},
    ]
    return {"path": str(path) if db_path else None, "reused": reused, "rows": total,
            "rows_in_default_window": in_window, "generate_s": round(generated_s, 1) if generated_s else None,
            "file_mb": round(path.stat().st_size / 1e6),
            "cases": cases}


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows to push through Ledger.record")
    parser.add_argument("--report-rows", type=int, default=1_000_000, help="rows in the report ledger")
    parser.add_argument("--runs", type=int, default=5, help="timed report runs per case (median)")
    parser.add_argument("--db", type=Path, help="keep the report ledger here (reused if it exists)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    environment = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                   "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with tempfile.TemporaryDirectory(prefix="halton-bench-") as tmp:
            workdir = Path(tmp)
            ingest = bench_ingest(args.rows, workdir) if args.rows > 0 else []
            reporting = bench_report(args.report_rows, args.runs, args.db, workdir) if args.report_rows > 0 else None
    except (BenchError, sqlite3.Error, OSError) as exc:
        print(f"bench_ledger: setup failed: {exc}", file=sys.stderr)
        return 1
    result = {"environment": environment, "ingest": ingest, "report": reporting,
              "targets": {"ingest_rows_per_s": INGEST_TARGET_ROWS_S, "report_s": REPORT_TARGET_S}}
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def render(result: dict) -> str:
    env = result["environment"]
    lines = [f"halton-meter ledger benchmark: Python {env['python']}, SQLite {env['sqlite']}, "
             f"{env['cpus']} CPUs, {env['platform']}", ""]
    if result["ingest"]:
        lines.append(f"{'ingest (Ledger.record until close)':<52} {'rows':>9} {'seconds':>8} {'rows/s':>8}  "
                     f"target >= {INGEST_TARGET_ROWS_S:,}/s")
        for run in result["ingest"]:
            if "skipped" in run:
                lines.append(f"  {run['name']:<50} skipped: {run['skipped']}")
                continue
            verdict = "ok" if run["rows_per_s"] >= INGEST_TARGET_ROWS_S and not run["lost"] else "MISSED"
            lines.append(f"  {run['name']:<50} {run['rows']:>9,} {run['seconds']:>8.2f} {run['rows_per_s']:>8,}  "
                         f"{verdict}" + (f" ({run['lost']:,} lost)" if run["lost"] else ""))
        lines.append("")
    rep = result["report"]
    if rep:
        made = "reused" if rep["reused"] else f"generated in {rep['generate_s']} s"
        lines.append(f"report over {rep['rows']:,} rows ({rep['rows_in_default_window']:,} in the default "
                     f"30-day window; {rep['file_mb']:,} MB, {made}"
                     + ")")
        lines.append(f"{'case':<64} {'median s':>8} {'min':>6} {'max':>6}  target <= {REPORT_TARGET_S} s")
        for case in rep["cases"]:
            verdict = "ok" if case["median_s"] <= REPORT_TARGET_S else "MISSED"
            lines.append(f"  {case['name']:<62} {case['median_s']:>8.3f} {case['min_s']:>6.3f} "
                         f"{case['max_s']:>6.3f}  {verdict}")
        if rep["path"]:
            lines.append(f"ledger kept at {rep['path']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
