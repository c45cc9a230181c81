"""The API's ledger views and /metrics on a real SQLite ledger; /metrics scraped by a real
Prometheus server where one is installed, and always by a strict parser of the text format."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from halton_meter import api_views
from halton_meter.ledger import CallRow, Ledger
from tests.conftest import start_serve, stop_serve

NOW = time.time()
HOUR = 3600.0


def row(n: int, *, project: str | None, model: str, ago_h: float, cost: int | None = 1_000_000,
        provider: str = "anthropic", outcome: str = "ok", client: str = "curl", unpriced: str | None = None,
        duration_ms: float = 1500.0, ttfb_ms: float = 300.0, source: str = "header") -> CallRow:
    return CallRow(
        call_id=f"call{n:04d}", started_at=NOW - ago_h * HOUR, host="api.anthropic.com", method="POST",
        path="/v1/messages", status=200 if outcome == "ok" else 529, outcome=outcome, project=project,
        project_source=source, model=model, provider=provider, endpoint="messages", client=client,
        usage_status="exact", input_tokens=100 + n, cache_read_tokens=10, cache_write_5m_tokens=5,
        output_tokens=20 + n, reasoning_tokens=4, cost_nanousd=None if unpriced else cost,
        unpriced_reason=unpriced, duration_ms=duration_ms, ttfb_ms=ttfb_ms, billing="tokens",
    )


SEED = [
    row(1, project="alpha", model="claude-sonnet-4-5", ago_h=0.5, cost=3_000_000),
    row(2, project="alpha", model="claude-sonnet-4-5", ago_h=2.5, cost=2_000_000, duration_ms=40_000),
    row(3, project="beta", model="gpt-5", provider="openai", ago_h=1.5, cost=5_000_000, client="codex"),
    row(4, project=None, model="claude-haiku-4-5", ago_h=3.5, cost=500_000, source="default"),
    row(5, project="beta", model="mystery-model", provider="openai", ago_h=0.2, unpriced="no price for 'mystery-model'"),
    row(6, project="alpha", model="claude-sonnet-4-5", ago_h=30, cost=7_000_000, outcome="provider_error"),
    row(7, project="gamma", model="claude-opus-4-1", ago_h=24 * 10, cost=9_000_000),
]


def seed(path: Path, rows: list[CallRow]) -> None:
    ledger = Ledger(path)  # no price table: the rows keep the costs given here
    ledger.start()
    for item in rows:
        ledger.record(item)
    ledger.close()
    assert ledger.rows_written == len(rows)


@pytest.fixture
def views(tmp_path):
    db_path = tmp_path / "db.sqlite"
    seed(db_path, [CallRow(**{f: getattr(r, f) for f in r.__slots__ if f != "bodies"}) for r in SEED])
    gauges = {"halton_meter_up": 1, "halton_meter_ledger_rows_lost_total": 0}
    routes = api_views.routes(db_path, lambda: gauges, lambda params: (200, {"status": "ok"}))

    def get(path: str, **params) -> tuple[int, object]:
        query = {name: [value] if isinstance(value, str) else list(value) for name, value in params.items()}
        return routes[path](query)

    get.db_path = db_path
    return get


def test_summary_is_the_report_document_for_the_window(views):
    status, body = views("/api/summary")
    assert status == 200
    assert body["totals"]["calls"] == 5  # the last 24 hours: rows 1-5
    assert body["totals"]["cost_nanousd"] == 10_500_000
    assert body["totals"]["cost_usd"] == "0.010500000"
    assert body["totals"]["unpriced_calls"] == 1
    assert [g["key"] for g in body["groups"]["project"]] == ["alpha", "beta", "default"]
    assert {g["key"] for g in body["groups"]["client"]} == {"curl", "codex"}
    assert body["unpriced"]["models"][0]["model"] == "mystery-model"
    status, body = views("/api/summary", since="7d", project="alpha")
    assert body["totals"]["calls"] == 3 and body["totals"]["cost_nanousd"] == 12_000_000


@pytest.mark.parametrize("params, message", [
    ({"since": "yesterday-ish"}, "is not a time"),
    ({"since": "1h", "until": "2h"}, "since is not before until"),
    ({"by": "colour"}, "by=colour is not a grouping"),
    ({"since": ["1h", "2h"]}, "give since once"),
])
def test_bad_parameters_are_a_400_that_says_what_to_do(views, params, message):
    status, body = views("/api/summary", **params)
    assert status == 400 and message in body["error"]


def test_calls_newest_first_with_paging_and_polling(views):
    status, body = views("/api/calls", since="30d", limit="3")
    assert status == 200
    assert [c["call_id"] for c in body["calls"]] == ["call0007", "call0006", "call0005"]
    assert body["latest_id"] == 7 and body["next_before"] == 5
    _, page = views("/api/calls", since="30d", limit="3", before=str(body["next_before"]))
    assert [c["call_id"] for c in page["calls"]] == ["call0004", "call0003", "call0002"]
    _, new = views("/api/calls", since="30d", after="4")
    assert [c["call_id"] for c in new["calls"]] == ["call0005", "call0006", "call0007"]
    assert new["next_before"] is None
    call = page["calls"][0]
    assert call["project"] == "default" and call["project_source"] == "default"
    assert call["cost_usd"] == "0.000500000" and call["priced"] is True and call["has_body"] is False
    assert call["cache_write_tokens"] == 5 and call["is_stream"] is False


def test_calls_filters(views):
    _, body = views("/api/calls", since="30d", unpriced="1")
    assert [(c["call_id"], c["priced"], c["cost_usd"]) for c in body["calls"]] == [("call0005", False, None)]
    _, body = views("/api/calls", since="30d", project="alpha,beta", outcome="provider_error")
    assert [c["call_id"] for c in body["calls"]] == ["call0006"]
    status, body = views("/api/calls", limit="0")
    assert status == 400 and "limit must be a whole number from 1 to 500" in body["error"]


def test_projects_include_settings_sources_and_idle_projects(views):
    import sqlite3

    db = sqlite3.connect(views.db_path)
    db.execute("UPDATE projects SET body_capture = 0 WHERE name = 'beta'")
    db.commit()
    db.close()
    _, body = views("/api/projects")
    projects = {p["project"]: p for p in body["projects"]}
    assert set(projects) == {"alpha", "beta", "default", "gamma"}
    assert projects["beta"]["body_capture"] is False and projects["alpha"]["body_capture"] is None
    assert projects["gamma"]["calls"] == 0 and projects["gamma"]["last_call_at"] is not None
    assert projects["default"]["sources"] == {"default": 1}
    assert [p["project"] for p in body["projects"]][:2] == ["alpha", "beta"]


def test_models_carry_provider_and_unpriced_reason(views):
    _, body = views("/api/models")
    models = {(m["provider"], m["model"]): m for m in body["models"]}
    assert models[("openai", "mystery-model")]["unpriced_reason"] == "no price for 'mystery-model'"
    assert models[("anthropic", "claude-sonnet-4-5")]["calls"] == 2
    assert models[("anthropic", "claude-sonnet-4-5")]["cost_usd"] == "0.005000000"
    # Most expensive first; a tie goes to the model with more calls.
    assert [m["model"] for m in body["models"]][:2] == ["claude-sonnet-4-5", "gpt-5"]


def test_timeseries_hour_buckets_cover_the_window_and_sum_to_the_totals(views):
    status, body = views("/api/timeseries", since="6h", bucket="hour")
    assert status == 200 and body["bucket"] == "hour" and body["bucket_s"] == 3600 and body["by"] == "project"
    starts = body["buckets"]
    assert all(b - a == HOUR for a, b in zip(starts, starts[1:])) and len(starts) in (6, 7)
    assert starts[0] <= NOW - 6 * HOUR < starts[0] + HOUR
    totals = {s["key"]: sum(s["cost_nanousd"]) for s in body["series"]}
    assert totals == {"alpha": 5_000_000, "beta": 5_000_000, "default": 500_000}
    calls = {s["key"]: sum(s["calls"]) for s in body["series"]}
    assert calls == {"alpha": 2, "beta": 2, "default": 1}
    beta = next(s for s in body["series"] if s["key"] == "beta")
    assert sum(beta["unpriced_calls"]) == 1
    # Each call sits in the bucket holding its start time.
    alpha = next(s for s in body["series"] if s["key"] == "alpha")
    i = max(i for i, start in enumerate(starts) if start <= NOW - 0.5 * HOUR)
    assert alpha["cost_nanousd"][i] == 3_000_000


def test_timeseries_by_model_and_provider_and_day_buckets(views):
    _, by_model = views("/api/timeseries", since="6h", by="model")
    assert {s["key"] for s in by_model["series"]} == {"claude-sonnet-4-5", "gpt-5", "mystery-model",
                                                      "claude-haiku-4-5"}
    _, by_provider = views("/api/timeseries", since="6h", by="provider")
    assert {s["key"]: sum(s["calls"]) for s in by_provider["series"]} == {"anthropic": 3, "openai": 2}
    _, daily = views("/api/timeseries", since="30d")
    assert daily["bucket"] == "day" and len(daily["buckets"]) in (30, 31)
    assert sum(sum(s["calls"]) for s in daily["series"]) == 7
    status, body = views("/api/timeseries", since="60d", bucket="hour")
    assert status == 400 and "bucket=day" in body["error"]


def test_timeseries_auto_buckets_follow_the_window(views):
    expected = {"1h": ("5m", 300, (12, 13)), "6h": ("15m", 900, (24, 25)), "24h": ("hour", 3600, (24, 25))}
    for since, (bucket, size, counts) in expected.items():
        _, body = views("/api/timeseries", since=since)
        assert (body["bucket"], body["bucket_s"]) == (bucket, size) and len(body["buckets"]) in counts
        assert all(start % size == 0 for start in body["buckets"])
    _, body = views("/api/timeseries", since="1h")
    assert {s["key"]: sum(s["calls"]) for s in body["series"]} == {"alpha": 1, "beta": 1}  # rows 1 and 5
    status, body = views("/api/timeseries", since="7d", bucket="5m")
    assert status == 400 and "5m buckets cover at most 62 hours" in body["error"]


def test_timeseries_keeps_the_largest_series_and_sums_the_rest_as_other(tmp_path):
    db_path = tmp_path / "db.sqlite"
    seed(db_path, [row(n, project=f"p{n:02d}", model="m", ago_h=1, cost=n * 1000) for n in range(1, 13)])
    routes = api_views.routes(db_path, dict, lambda params: (200, {}))
    _, body = routes["/api/timeseries"]({})
    keys = [s["key"] for s in body["series"]]
    assert keys == ["p12", "p11", "p10", "p09", "p08", "p07", "p06", "other"]
    assert sum(body["series"][-1]["cost_nanousd"]) == sum(n * 1000 for n in range(1, 6))


def test_views_of_a_home_without_a_ledger_are_empty_not_errors(tmp_path):
    routes = api_views.routes(tmp_path / "absent.sqlite", dict, lambda params: (200, {}))
    assert routes["/api/summary"]({})[1]["totals"]["calls"] == 0
    assert routes["/api/calls"]({})[1] == {"calls": [], "next_before": None, "latest_id": None}
    assert routes["/api/timeseries"]({})[1]["series"] == []
    assert "halton_meter_calls_total" in routes["/metrics"]({})[1].data.decode()


# --- /metrics ------------------------------------------------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_exposition(text: str) -> dict[str, dict]:
    """A strict reader of the Prometheus text format 0.0.4: every family has HELP then TYPE
    before its samples, names and labels are well formed, no series repeats, values are numbers,
    histograms are cumulative with +Inf equal to _count, counters end in _total."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    seen: set[str] = set()
    for line in text.splitlines():
        assert line, "blank lines are not produced"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert _NAME.fullmatch(name) and name not in families, line
            current = families[name] = {"type": None, "samples": []}
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in families and families[name]["type"] is None and kind in ("counter", "gauge", "histogram")
            families[name]["type"] = kind
            if kind == "counter":
                assert name.endswith("_total"), name
            continue
        assert not line.startswith("#"), line
        match = _SAMPLE.match(line)
        assert match, line
        name, _, labels_text, value = match.groups()
        assert current is not None and current["type"] is not None
        family = [f for f in families if name == f or (families[f]["type"] == "histogram"
                                                       and name in (f + "_bucket", f + "_sum", f + "_count"))]
        assert family == [list(families)[-1]], f"{name} outside its family"
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                label = _LABEL.match(labels_text, pos)
                assert label, labels_text
                assert label.group(1) not in labels
                labels[label.group(1)] = label.group(2)
                pos = label.end()
        series = name + json.dumps(labels, sort_keys=True)
        assert series not in seen, f"duplicate series {series}"
        seen.add(series)
        number = float(value)
        assert number >= 0
        current["samples"].append((name, labels, number))
    for name, family in families.items():
        if family["type"] != "histogram":
            continue
        by_labels: dict[str, list] = {}
        for sample, labels, value in family["samples"]:
            key = json.dumps({k: v for k, v in labels.items() if k != "le"}, sort_keys=True)
            by_labels.setdefault(key, []).append((sample, labels.get("le"), value))
        for key, samples in by_labels.items():
            buckets = [(le, v) for s, le, v in samples if s.endswith("_bucket")]
            assert buckets[-1][0] == "+Inf"
            bounds = [float(le) for le, _ in buckets[:-1]]
            assert bounds == sorted(bounds)
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{name}{key} not cumulative"
            count = next(v for s, _, v in samples if s.endswith("_count"))
            assert counts[-1] == count
    return families


def value(families: dict, name: str, **labels) -> float:
    family = name if name in families else name.rsplit("_", 1)[0]
    return sum(v for sample, have, v in families[family]["samples"]
               if sample == name and all(have.get(k) == w for k, w in labels.items()))


def test_metrics_exposition_is_strict_and_matches_the_ledger(views):
    status, document = views("/metrics")
    assert status == 200 and document.content_type.startswith("text/plain; version=0.0.4")
    families = parse_exposition(document.data.decode())
    assert value(families, "halton_meter_calls_total") == 7
    assert value(families, "halton_meter_calls_total", project="alpha", outcome="provider_error") == 1
    assert value(families, "halton_meter_calls_total", project="default") == 1
    assert value(families, "halton_meter_cost_usd_total") == pytest.approx(0.0265)
    assert value(families, "halton_meter_cost_usd_total", model="gpt-5") == pytest.approx(0.005)
    assert value(families, "halton_meter_unpriced_calls_total", model="mystery-model") == 1
    assert value(families, "halton_meter_tokens_total", type="input") == sum(100 + n for n in range(1, 8))
    assert value(families, "halton_meter_tokens_total", type="reasoning") == 28
    duration = "halton_meter_request_duration_seconds"
    assert value(families, f"{duration}_count", provider="anthropic") == 5
    assert value(families, f"{duration}_bucket", provider="anthropic", le="1") == 0
    assert value(families, f"{duration}_bucket", provider="anthropic", le="2.5") == 4
    assert value(families, f"{duration}_sum", provider="anthropic") == pytest.approx(46.0)
    assert value(families, "halton_meter_up") == 1


def test_metrics_are_read_incrementally(views):
    views("/metrics")
    seed(views.db_path, [row(50, project="alpha", model="claude-sonnet-4-5", ago_h=0, cost=1_000_000)])
    families = parse_exposition(views("/metrics")[1].data.decode())
    assert value(families, "halton_meter_calls_total", project="alpha") == 4
    assert value(families, "halton_meter_calls_total") == 8


def test_label_values_are_escaped(tmp_path):
    db_path = tmp_path / "db.sqlite"
    seed(db_path, [row(1, project="p", model='we"ird\\model\nx', ago_h=1)])
    text = api_views.routes(db_path, dict, lambda params: (200, {}))["/metrics"]({})[1].data.decode()
    assert 'model="we\\"ird\\\\model\\nx"' in text
    parse_exposition(text)


# --- over HTTP, and scraped by Prometheus --------------------------------------------------


def _api_port(banner: str) -> int:
    return int(banner.split("API             http://127.0.0.1:")[1].split("/")[0])


def _get(port: int, path: str, host: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path):
    seed(tmp_path / "db.sqlite", SEED[:5])
    proxy = start_serve(tmp_path)
    yield proxy, _api_port(proxy.banner)
    assert stop_serve(proxy) == 0


def test_the_daemon_serves_the_page_json_and_metrics(served):
    _proxy, port = served
    status, headers, page = _get(port, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert page.lstrip().lower().startswith(b"<!doctype html")
    status, headers, body = _get(port, "/api/summary?since=24h")
    assert status == 200 and json.loads(body)["totals"]["calls"] == 5
    status, headers, body = _get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert value(parse_exposition(body.decode()), "halton_meter_calls_total") == 5
    status, _, body = _get(port, "/api/summary", host="evil.example:80")
    assert status == 403 and b"loopback" in body
    status, _, body = _get(port, "/api/nothing")
    assert status == 404 and "/api/timeseries" in json.loads(body)["paths"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_real_prometheus_scrapes_metrics(served, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (.ci/run installs Debian's prometheus); "
                    "the strict parser above still checks the format")
    _proxy, api_port = served
    web_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: halton\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{api_port}']\n")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        target = result = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/targets", timeout=2) as r:
                    targets = json.load(r)["data"]["activeTargets"]
                target = targets[0] if targets else None
                query = urllib.parse.quote("sum(halton_meter_calls_total)")
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/query?query={query}",
                                            timeout=2) as r:
                    result = json.load(r)["data"]["result"]
                if target and target["health"] == "up" and result:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert target is not None and target["health"] == "up", target
        assert target["lastError"] == ""
        assert float(result[0]["value"][1]) == 5
    finally:
        process.terminate()
        process.wait(10)


def test_metrics_count_a_call_that_reuses_the_id_of_a_deleted_self_test_row(views):
    import sqlite3

    views("/metrics")
    seed(views.db_path, [row(60, project="selftest-x", model="m", ago_h=0, provider="selftest")])
    views("/metrics")  # reads the self-test row's id, then the self-test deletes its row
    db = sqlite3.connect(views.db_path)
    db.execute("DELETE FROM calls WHERE provider = 'selftest'")
    db.commit()
    db.close()
    seed(views.db_path, [row(61, project="alpha", model="claude-sonnet-4-5", ago_h=0)])  # same id again
    families = parse_exposition(views("/metrics")[1].data.decode())
    assert value(families, "halton_meter_calls_total", project="alpha") == 4
    assert value(families, "halton_meter_calls_total", provider="selftest") == 0
