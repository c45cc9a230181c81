"""The dashboard in a real headless Chromium, over real ledger rows written by the real proxy.

Older rows are written straight into the ledger before `serve` starts (the time axis needs days);
the recent ones are real calls through the proxy to the fake provider. Each test reads the figures
it expects from the API the page itself uses, and compares them with what the page shows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from halton_meter.ledger import CallRow, Ledger
from halton_meter.report import format_usd, usd_string
from tests.cdp import Browser
from tests.conftest import REPO, start_serve, stop_serve

HOUR, DAY = 3600, 86400
UNKNOWN_MODEL = "claude-private-experiment"
SCREENSHOTS = REPO / "tools" / "output"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1400,1000")


# --- data -----------------------------------------------------------------------------------


def older_rows(now: float) -> list[CallRow]:
    """Priced history over the last week: alpha spends most, beta less; two of them inside 24 h."""
    def row(n, ago, project, provider, model, cost):
        return CallRow(call_id=f"dash-{n}", started_at=now - ago, host=f"api.{provider}.com", method="POST",
                       path="/v1/messages", status=200, project=project, provider=provider, model=model,
                       client="anthropic-python", endpoint="messages", usage_status="exact", billing="tokens",
                       input_tokens=1000 * n, output_tokens=100 * n, cost_nanousd=cost, duration_ms=900.0 + n)
    return [
        row(1, 6 * DAY, "alpha", "anthropic", "claude-sonnet-4-5", 2_500_000_000),
        row(2, 4 * DAY, "alpha", "anthropic", "claude-sonnet-4-5", 4_000_000_000),
        row(3, 3 * DAY, "beta", "openai", "gpt-4.1", 800_000_000),
        row(4, 2 * DAY, "alpha", "anthropic", "claude-haiku-4-5", 1_500_000_000),
        row(5, 36 * HOUR, "beta", "openai", "gpt-4.1", 700_000_000),
        row(6, 5 * HOUR, "beta", "openai", "gpt-4.1", 400_000_000),
        row(7, 3 * HOUR, "alpha", "anthropic", "claude-sonnet-4-5", 1_200_000_000),
    ]


def send(proxy, host, path, body, project, **headers) -> int:
    conn = proxy.connection(host)
    agent = "Anthropic/Python 0.40.0" if "anthropic" in host else "OpenAI/Python 3.3.1"
    conn.request("POST", path, body=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "User-Agent": agent, "X-Halton-Project": project, **headers})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def recent_calls(proxy) -> None:
    """Real calls: two providers, streamed and not, one unknown model, one provider error."""
    send(proxy, "api.anthropic.com", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 50,
         "stream": True, "messages": []}, "alpha", **{"User-Agent": "claude-cli/2.1.3 (external, cli)"})
    send(proxy, "api.anthropic.com", "/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5,
         "messages": []}, "alpha")
    send(proxy, "api.openai.com", "/v1/chat/completions", {"model": "gpt-4.1", "stream": True,
         "stream_options": {"include_usage": True}, "messages": []}, "beta")
    assert send(proxy, "api.openai.com", "/v1/chat/completions", {"model": "gpt-4.1", "messages": []}, "beta",
                **{"x-fake-status": "429"}) == 429
    send(proxy, "api.anthropic.com", "/v1/messages", {"model": UNKNOWN_MODEL, "max_tokens": 5,
         "messages": []}, "gamma")
    for project, count in (("alpha", 6), ("beta", 5), ("gamma", 1)):  # with the older rows
        assert len(proxy.wait_rows(project, count)) == count


@pytest.fixture(scope="module")
def dash(fake, tmp_path_factory):
    """A running `serve` with history and real calls; `.api` is the dashboard's origin."""
    home = tmp_path_factory.mktemp("dashboard")
    ledger = Ledger(home / "db.sqlite")
    ledger.start()
    for row in older_rows(time.time()):
        ledger.record(row)
    ledger.close()
    upstreams = ("--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}",
                 "--upstream", f"api.openai.com=127.0.0.1:{fake.port}", "--upstream-ca", str(fake.ca_path))
    proxy = start_serve(home, *upstreams)
    proxy.upstreams = upstreams
    proxy.api_port = int((home / "run" / "api.port").read_text())
    proxy.api = f"http://127.0.0.1:{proxy.api_port}"
    try:
        recent_calls(proxy)
        yield proxy
    finally:
        assert stop_serve(proxy) == 0
    assert "Traceback" not in proxy.log, proxy.log[-3000:]


def get(dash, path: str) -> dict:
    with urllib.request.urlopen(dash.api + path, timeout=10) as response:
        return json.loads(response.read())


# --- the browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="halton-chromium-"))
    log = open(profile / "stderr.log", "wb")
    process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    connection = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start:\n{(profile / 'stderr.log').read_text()[-3000:]}")
            time.sleep(0.05)
        port, path = port_file.read_text().split()
        connection = Browser.connect(f"ws://127.0.0.1:{port}{path}")
        yield connection
    finally:
        if connection is not None:
            connection.close()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the browser and its renderers: its own group
        except ProcessLookupError:
            pass
        process.wait(10)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def tab(browser):
    return browser.new_page()


@pytest.fixture
def page(tab):
    tab.browser.events.clear()
    return tab


def open_dashboard(page, dash, query: str = "") -> None:
    page.navigate(f"{dash.api}/{query}")
    page.wait_for("document.body.dataset.ready === '1'", 10)


def renders(page) -> int:
    return int(page.evaluate("document.body.dataset.renders"))


def after_render(page, action: str, search: str) -> None:
    """Run a user action and wait for the render it causes (of the view at `search`)."""
    before = renders(page)
    page.evaluate(action)
    page.wait_for(f"Number(document.body.dataset.renders) > {before} && "
                  f"document.body.dataset.view === {json.dumps(search)}", 10)


def text(page, testid: str) -> str:
    return page.evaluate(f"document.querySelector('[data-testid={testid}]').textContent")


def keys(page, selector: str, attribute: str = "data-key") -> list[str]:
    return page.evaluate(f"Array.from(document.querySelectorAll({json.dumps(selector)}), "
                         f"e => e.getAttribute({json.dumps(attribute)}))")


def problems(page, *, allow_refused: bool = False) -> list[str]:
    """Console errors, uncaught exceptions and failed requests the page has had so far."""
    page.evaluate("1")  # the reply comes after every event sent before it
    found = []
    for event in page.events("Runtime.exceptionThrown"):
        found.append(f"exception: {event['exceptionDetails'].get('exception', {}).get('description')}")
    for event in page.events("Runtime.consoleAPICalled"):
        if event["type"] in ("error", "warning", "assert"):
            found.append(f"console.{event['type']}: {[a.get('value') for a in event['args']]}")
    for event in page.events("Log.entryAdded"):
        entry = event["entry"]
        if entry["level"] in ("error", "warning") and not (allow_refused and "ERR_CONNECTION_REFUSED" in entry["text"]):
            found.append(f"log: {entry['text']} {entry.get('url', '')}")
    for event in page.events("Network.loadingFailed"):
        # A fetch the page aborts on purpose (a filter changed while it was in flight) is no failure.
        if not event.get("canceled") and not (allow_refused and "REFUSED" in event["errorText"]):
            found.append(f"request failed: {event['errorText']}")
    for event in page.events("Network.responseReceived"):
        if event["response"]["status"] >= 400:
            found.append(f"HTTP {event['response']['status']}: {event['response']['url']}")
    return found


def chart_heights(page) -> dict[str, float]:
    """Bucket start -> the stacked height of its bars, in pixels."""
    return page.evaluate("""(() => {
        const out = {};
        for (const r of document.querySelectorAll('[data-testid=chart] rect[data-key][data-bucket]'))
            out[r.dataset.bucket] = (out[r.dataset.bucket] || 0) + r.height.baseVal.value;
        return out; })()""")


# --- tests ----------------------------------------------------------------------------------


def test_dashboard_shows_the_ledger(page, dash):
    open_dashboard(page, dash, "?range=7d")
    summary = get(dash, "/api/summary?since=7d")
    totals = summary["totals"]
    assert text(page, "total-cost") == format_usd(totals["cost_nanousd"])
    assert text(page, "total-calls") == f"{totals['calls']:,}" == "12"
    assert text(page, "unpriced-count") == str(totals["unpriced_calls"]) == "1"
    assert page.evaluate("document.querySelector('[data-testid=unpriced]').classList.contains('warn')")
    assert "halton-meter pricing import FILE" in text(page, "unpriced-hint")
    assert text(page, "error-count") == "1"
    assert page.evaluate("document.querySelector('[data-testid=status]').dataset.state") == "live"

    # The chart: one colour per series; bars for every series that cost something; heights to scale.
    series = get(dash, "/api/timeseries?since=7d&by=project")
    assert series["bucket"] == "day"
    assert keys(page, "[data-testid=legend] [data-key]") == [s["key"] for s in series["series"]] == [
        "alpha", "beta", "gamma"]
    priced = {s["key"] for s in series["series"] if any(s["cost_nanousd"])}
    assert set(keys(page, "[data-testid=chart] rect[data-key]")) == priced == {"alpha", "beta"}
    costs = {}
    for s in series["series"]:
        for start, cost in zip(series["buckets"], s["cost_nanousd"]):
            costs[start] = costs.get(start, 0) + cost
    heights = {float(k): v for k, v in chart_heights(page).items()}
    assert set(heights) == {start for start, cost in costs.items() if cost}
    assert max(heights, key=heights.get) == max(costs, key=costs.get)
    scale = max(heights.values()) / max(costs.values())
    for start, height in heights.items():
        assert height == pytest.approx(costs[start] * scale, abs=0.5), start

    # Tables: the projects in cost order, the unpriced model flagged with its reason.
    assert keys(page, "[data-testid=table-project] tr[data-key]") == [
        g["key"] for g in summary["groups"]["project"]] == ["alpha", "beta", "gamma"]
    flagged = page.evaluate(f"""(() => {{
        const row = document.querySelector('[data-testid=table-model] tr[data-key="{UNKNOWN_MODEL}"]');
        return row && [row.dataset.unpriced, row.querySelector('.badge').textContent,
                       row.querySelector('[data-testid=unpriced-reason]').textContent]; }})()""")
    reason = next(m["unpriced_reason"] for m in get(dash, "/api/models?since=7d")["models"] if m["model"] == UNKNOWN_MODEL)
    assert flagged == ["1", "unpriced", reason] and UNKNOWN_MODEL in reason
    assert page.evaluate("document.querySelectorAll('[data-testid=table-model] tr[data-unpriced]').length") == 1
    assert keys(page, "[data-testid=table-client] tr[data-key]") == [g["key"] for g in summary["groups"]["client"]]

    # Latest calls: the API's newest first, the provider error marked.
    calls = get(dash, "/api/calls?since=7d&limit=25")["calls"]
    assert keys(page, "[data-testid=calls] tr[data-call-id]", "data-call-id") == [str(c["id"]) for c in calls]
    error_id = next(c["id"] for c in calls if c["outcome"] == "provider_error")
    assert page.evaluate(f"document.querySelector('tr[data-call-id=\"{error_id}\"]').className") == "err"

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, scheme in (("dashboard.png", "light"), ("dashboard-dark.png", "dark")):
        page.call("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
        page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        size = page.screenshot(SCREENSHOTS / name)
        print(f"\ndashboard screenshot: {SCREENSHOTS / name} ({size} bytes)")
        assert size > 20_000 and (SCREENSHOTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.call("Emulation.setEmulatedMedia", {"features": []})
    assert problems(page) == []


def test_money_and_tokens_read_like_the_report(page, dash):
    open_dashboard(page, dash)
    amounts = [0, 1, 464_000, 4_999_999, 5_000_000, 12_345_678, 999_499_999, 999_500_000, 999_999_999,
               1_000_000_000, 1_004_999_999, 1_005_000_000, 12_345_678_901, 1_234_567_890_123,
               98_765_432_109_876_543, -464_000, -12_345_678_901]
    shown = page.evaluate(f"{json.dumps([usd_string(n) for n in amounts])}.map(v => haltonMeter.usd(v))")
    assert shown == [format_usd(n) for n in amounts]
    counts = [0, 999, 1000, 1234, 35_449, 99_949, 99_950, 354_000, 999_499, 999_500, 1_234_567, 81_000_000,
              999_499_999, 999_500_000, 2_500_000_000]
    assert page.evaluate(f"{json.dumps(counts)}.map(n => haltonMeter.tokens(n))") == [
        "0", "999", "1k", "1.2k", "35.4k", "99.9k", "100k", "354k", "999k", "1M", "1.2M", "81M",
        "999M", "1B", "2.5B"]
    assert problems(page) == []


def test_filters_live_in_the_url_and_narrow_every_figure(page, dash):
    open_dashboard(page, dash, "?range=7d")
    all_cost = text(page, "total-cost")
    options = page.evaluate("Array.from(document.querySelector('[data-testid=filter-project]').options, o => o.value)")
    assert options == ["", "alpha", "beta", "gamma"]

    after_render(page, """(() => { const s = document.querySelector('[data-testid=filter-project]');
        s.value = 'beta'; s.dispatchEvent(new Event('change', {bubbles: true})); })()""", "?range=7d&project=beta")
    assert page.evaluate("location.search") == "?range=7d&project=beta"
    beta = get(dash, "/api/summary?since=7d&project=beta")["totals"]
    assert text(page, "total-cost") == format_usd(beta["cost_nanousd"]) != all_cost
    assert text(page, "total-calls") == str(beta["calls"]) == "5"
    assert keys(page, "[data-testid=table-project] tr[data-key]") == ["beta"]
    assert set(keys(page, "[data-testid=chart] rect[data-key]")) == {"beta"}
    assert set(page.evaluate("Array.from(document.querySelectorAll('[data-testid=calls] tr[data-call-id]'), "
                             "r => r.cells[1].textContent)")) == {"beta"}

    # 1 h: the older rows drop out, only the real calls of a moment ago stay.
    after_render(page, "document.querySelector('[data-testid=filter-range] [data-value=\"1h\"]').click()",
                 "?range=1h&project=beta")
    assert page.evaluate("location.search") == "?range=1h&project=beta"
    recent = get(dash, "/api/summary?since=1h&project=beta")["totals"]
    assert recent["calls"] == 2 and recent["cost_nanousd"] < beta["cost_nanousd"]
    assert text(page, "total-cost") == format_usd(recent["cost_nanousd"])
    assert text(page, "total-calls") == "2"

    after_render(page, "document.querySelector('[data-testid=filter-by] [data-value=\"model\"]').click()",
                 "?range=1h&project=beta&by=model")
    assert page.evaluate("location.search") == "?range=1h&project=beta&by=model"
    series = get(dash, "/api/timeseries?since=1h&project=beta&by=model")["series"]
    assert keys(page, "[data-testid=legend] [data-key]") == [s["key"] for s in series]
    assert keys(page, "[data-testid=legend] [data-key]")[0].startswith("gpt-4.1")

    # A bookmark of this URL opens the same view.
    open_dashboard(page, dash, "?range=1h&project=beta&by=model")
    assert page.evaluate("""[document.querySelector('[data-testid=filter-project]').value,
        document.querySelector('[data-testid=filter-range] [aria-pressed=true]').dataset.value,
        document.querySelector('[data-testid=filter-by] [aria-pressed=true]').dataset.value]""") == [
        "beta", "1h", "model"]
    assert text(page, "total-calls") == "2"
    assert problems(page) == []


def test_narrow_window_keeps_the_layout(page, dash):
    page.call("Emulation.setDeviceMetricsOverride", {"width": 900, "height": 1000, "deviceScaleFactor": 1,
                                                     "mobile": False})
    try:
        open_dashboard(page, dash)
        # Nothing wider than the window: no sideways scrolling, in the page or in a table.
        assert page.evaluate("document.documentElement.scrollWidth") <= 900
        assert page.evaluate("Array.from(document.querySelectorAll('.table-wrap'), "
                             "w => w.scrollWidth - w.clientWidth).filter(d => d > 0)") == []
        width = page.evaluate("document.querySelector('[data-testid=chart] svg').getBoundingClientRect().width")
        assert 700 < width < 900
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        size = page.screenshot(SCREENSHOTS / "dashboard-900.png")
        print(f"\ndashboard screenshot: {SCREENSHOTS / 'dashboard-900.png'} ({size} bytes)")
    finally:
        page.call("Emulation.clearDeviceMetricsOverride")
    assert problems(page) == []


def test_new_calls_appear_live(page, dash):
    open_dashboard(page, dash)
    calls_before = int(text(page, "total-calls"))
    send(dash, "api.anthropic.com", "/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5,
         "messages": []}, "alpha")
    new_id = dash.wait_rows("alpha", 7)[-1]["id"]
    page.wait_for(f"document.querySelector('[data-testid=calls] tr[data-call-id]').dataset.callId === '{new_id}'", 6)
    assert page.evaluate(f"document.querySelector('tr[data-call-id=\"{new_id}\"]').classList.contains('fresh')")
    # New spend brings the totals along without a reload.
    page.wait_for(f"document.querySelector('[data-testid=total-calls]').textContent === '{calls_before + 1}'", 6)
    assert problems(page) == []


def test_daemon_down_then_back(page, dash):
    open_dashboard(page, dash)
    assert stop_serve(dash) == 0
    page.wait_for("document.querySelector('[data-testid=status]').dataset.state === 'error'", 8)
    assert "unreachable" in text(page, "status")
    # The figures stay on screen while the daemon is away.
    assert text(page, "total-calls") != "–"
    restarted = start_serve(dash.home, *dash.upstreams, "--api-port", str(dash.api_port))
    dash.process, dash.port, dash.log_lines = restarted.process, restarted.port, restarted.log_lines
    page.wait_for("document.querySelector('[data-testid=status]').dataset.state === 'live'", 8)
    assert problems(page, allow_refused=True) == []
