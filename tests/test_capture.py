"""Attribution and body capture through the real proxy: real client processes, TLS minted by our
CA, the fake provider, the SQLite file; plus the `project`, `bodies` and `export` commands."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, messages_body, start_serve, stop_serve, subprocess_env

ANTHROPIC_KEY = "sk-ant-api03-" + "Zq7" * 31 + "AA"
OPENAI_KEY = "sk-proj-" + "Ab3dE" * 10
PROMPT_MARKER = "purple-elephant-prompt-marker"

# A client process of its own, so the proxy can find it from the connection.
CLIENT = r"""
import http.client, json, ssl, sys
port, bundle, tunnel_headers, headers, body = sys.argv[1:6]
conn = http.client.HTTPSConnection("127.0.0.1", int(port), context=ssl.create_default_context(cafile=bundle), timeout=15)
conn.set_tunnel("api.anthropic.com", 443, headers=json.loads(tunnel_headers))
conn.request("POST", "/v1/messages", body=body.encode(), headers={"content-type": "application/json", **json.loads(headers)})
response = conn.getresponse()
response.read()
print(response.status)
"""


def call_from_process(proxy, *, env: dict | None = None, cwd: Path | None = None, proxy_user: str | None = None,
                      headers: dict | None = None, body: bytes | None = None) -> None:
    tunnel = {}
    if proxy_user:
        import base64
        tunnel["Proxy-Authorization"] = "Basic " + base64.b64encode(f"{proxy_user}:".encode()).decode()
    child_env = {k: v for k, v in subprocess_env(proxy.home).items() if k != "HALTON_PROJECT"}
    child_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, str(proxy.port), str(proxy.bundle), json.dumps(tunnel),
         json.dumps({"x-api-key": ANTHROPIC_KEY, **(headers or {})}),
         (body or messages_body()).decode()],
        env=child_env, cwd=str(cwd or REPO), capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "200", result.stderr


def rows(db: Path, where: str = "1", params: tuple = ()) -> list[dict]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in connection.execute(f"SELECT * FROM calls WHERE {where} ORDER BY id", params)]
    finally:
        connection.close()


def wait_for_rows(db: Path, count: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = rows(db) if db.exists() else []
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "halton_meter", *args], env=subprocess_env(home),
                          cwd=str(REPO), capture_output=True, text=True, timeout=60)


@pytest.fixture
def metered(tmp_path, fake):
    """A proxy whose home has config.toml written by the test first (see `start`)."""
    started = []

    def start(config: str = "", *extra: str):
        (tmp_path / "config.toml").write_text(config)
        proxy = start_serve(tmp_path, "--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}",
                            "--upstream-ca", str(fake.ca_path), "--log-level", "DEBUG", *extra)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        assert stop_serve(proxy) == 0


# --- attribution ---------------------------------------------------------------------------


def test_attribution_precedence_from_header_down_to_default(metered, tmp_path):
    work = tmp_path / "work"
    repo = tmp_path / "checkouts" / "billing-service"
    (repo / ".git").mkdir(parents=True)
    (repo / "src").mkdir()
    ruled = work / "acme" / "site"
    ruled.mkdir(parents=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    proxy = metered(f'[[attribution.rules]]\ncwd = "{work / "acme"}"\nproject = "acme"\n')
    env = {"HALTON_PROJECT": "from-env"}
    call_from_process(proxy, env=env, proxy_user="from-creds", headers={"X-Halton-Project": "from-header"})
    call_from_process(proxy, env=env, proxy_user="from-creds")
    call_from_process(proxy, env=env, cwd=repo / "src")
    call_from_process(proxy, cwd=repo / "src")
    call_from_process(proxy, cwd=ruled)
    call_from_process(proxy, cwd=plain)
    found = [(r["project"], r["project_source"]) for r in wait_for_rows(proxy.db, 6)]
    assert found == [("from-header", "header"), ("from-creds", "proxy_auth"), ("from-env", "process_env"),
                     ("billing-service", "git_repo"), ("acme", "rule_cwd"), (None, "default")]


def test_parent_process_environment_names_the_project(metered, tmp_path):
    proxy = metered()
    # The client is a grandchild without the variable; its parent shell carries it.
    script = (f"env -u HALTON_PROJECT {sys.executable} -c '{CLIENT}' {proxy.port} {proxy.bundle} '{{}}' "
              f"'{{\"x-api-key\": \"k\"}}' '{messages_body().decode()}'")
    env = dict(subprocess_env(proxy.home), HALTON_PROJECT="parent-project")
    result = subprocess.run(["sh", "-c", script + "; true"], env=env, capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "200", result.stderr
    assert [(r["project"], r["project_source"]) for r in wait_for_rows(proxy.db, 1)] == [
        ("parent-project", "process_env")]


def test_process_lookup_can_be_turned_off(metered):
    proxy = metered("[attribution]\nprocess_lookup = false\n")
    call_from_process(proxy, env={"HALTON_PROJECT": "ignored"})
    assert [(r["project"], r["project_source"]) for r in wait_for_rows(proxy.db, 1)] == [(None, "default")]


def test_an_invalid_header_project_is_made_a_valid_name(metered):
    proxy = metered()
    call_from_process(proxy, headers={"X-Halton-Project": "My App!"})
    assert wait_for_rows(proxy.db, 1)[0]["project"] == "My-App-"


def test_bad_attribution_rules_are_a_clear_startup_error(tmp_path):
    (tmp_path / "config.toml").write_text('[[attribution.rules]]\ncwd = "relative/path"\nproject = "x"\n')
    result = cli(tmp_path, "serve", "--port", "0")
    assert result.returncode == 1
    assert "attribution rule 1" in result.stderr and "absolute path" in result.stderr


# --- bodies --------------------------------------------------------------------------------


def body_rows(db: Path) -> list[dict]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in connection.execute("SELECT * FROM request_bodies ORDER BY call_id")]
    finally:
        connection.close()


def secret_body(stream: bool = False) -> bytes:
    return json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream, "messages": [
        {"role": "user", "content": f"{PROMPT_MARKER}: my OpenAI key is {OPENAI_KEY} and "
                                    "password=hunter22 please keep it"}]}).encode()


def test_bodies_are_stored_redacted_and_never_logged(metered):
    proxy = metered()
    call_from_process(proxy, body=secret_body(), headers={"X-Halton-Project": "alpha"})
    call_from_process(proxy, body=secret_body(stream=True), headers={"X-Halton-Project": "alpha"})
    calls = wait_for_rows(proxy.db, 2)
    stored = body_rows(proxy.db)
    assert [b["call_id"] for b in stored] == sorted(c["call_id"] for c in calls)
    for body in stored:
        everything = json.dumps(body)
        assert OPENAI_KEY not in everything and ANTHROPIC_KEY not in everything and "hunter22" not in everything
        assert PROMPT_MARKER in body["request_body"]
        assert "[REDACTED:openai_key]" in body["request_body"]
        headers = dict((k.lower(), v) for k, v in json.loads(body["request_headers"]))
        assert headers["x-api-key"] == "[REDACTED:auth_header]"
        assert json.loads(body["redactions"]) == {"auth_header": 1, "openai_key": 1, "password_assignment": 1}
        assert body["request_truncated"] == 0
        assert body["request_bytes"] in (len(secret_body()), len(secret_body(stream=True)))
    plain, streamed = stored if "event:" not in stored[0]["response_body"] else stored[::-1]
    assert json.loads(plain["response_body"])["usage"]["output_tokens"] == 9
    assert "event: message_stop" in streamed["response_body"]
    assert plain["response_bytes"] == len(plain["response_body"].encode())
    # Logs carry neither the prompt nor any key, even at DEBUG.
    time.sleep(0.2)
    for secret in (PROMPT_MARKER, OPENAI_KEY, ANTHROPIC_KEY, "hunter22"):
        assert secret not in proxy.log


def test_gzip_responses_are_stored_decoded(metered):
    proxy = metered()
    call_from_process(proxy, headers={"Accept-Encoding": "gzip"})
    wait_for_rows(proxy.db, 1)
    (stored,) = body_rows(proxy.db)
    assert json.loads(stored["response_body"])["type"] == "message"
    assert ("Content-Encoding", "gzip") in [tuple(h) for h in json.loads(stored["response_headers"])]


def test_large_bodies_are_cut_at_the_limit_and_the_cut_is_recorded(metered):
    proxy = metered("[bodies]\nmax_body_bytes = 2048\n")
    big = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [
        {"role": "user", "content": "x" * 10_000 + f" key {OPENAI_KEY}"}]}).encode()
    call_from_process(proxy, body=big, headers={"x-fake-body-bytes": "50000"})
    wait_for_rows(proxy.db, 1)
    (stored,) = body_rows(proxy.db)
    assert stored["request_truncated"] == 1 and stored["request_bytes"] == len(big)
    assert len(stored["request_body"].encode()) <= 2048
    assert stored["response_truncated"] == 1 and stored["response_bytes"] > 50_000
    assert len(stored["response_body"].encode()) <= 2048


def test_per_project_switches_take_effect_in_the_running_daemon(metered):
    proxy = metered("[bodies]\nenabled = false\n")
    assert cli(proxy.home, "project", "set", "kept", "body-capture", "on").returncode == 0
    time.sleep(0.6)  # the daemon looks for changed settings four times a second
    call_from_process(proxy, headers={"X-Halton-Project": "kept"})
    call_from_process(proxy, headers={"X-Halton-Project": "other"})
    calls = wait_for_rows(proxy.db, 2)
    assert [b["call_id"] for b in body_rows(proxy.db)] == [calls[0]["call_id"]]
    result = cli(proxy.home, "project", "set", "kept", "body-capture", "off")
    assert result.returncode == 0 and "not stored" in result.stdout
    call_from_process(proxy, headers={"X-Halton-Project": "kept"})
    wait_for_rows(proxy.db, 3)
    assert len(body_rows(proxy.db)) == 1


def test_retention_sweep_at_start_and_purge_and_stats(metered, tmp_path):
    from halton_meter.ledger import connect

    db = connect(tmp_path / "db.sqlite")
    old = time.time() - 100 * 86400
    for call_id, at in (("old-call", old), ("recent-call", time.time() - 10 * 86400)):
        db.execute("INSERT INTO request_bodies VALUES (?, ?, '[]', 'b', 1, 0, '[]', 'r', 1, 0, "
                   "'{\"jwt\": 2}')", (call_id, at))
    db.close()
    proxy = metered()  # retention_days = 90: the daemon sweeps on start
    deadline = time.monotonic() + 10
    while [b["call_id"] for b in body_rows(proxy.db)] != ["recent-call"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [b["call_id"] for b in body_rows(proxy.db)] == ["recent-call"]
    call_from_process(proxy, body=secret_body())
    wait_for_rows(proxy.db, 1)
    stats = json.loads(cli(proxy.home, "bodies", "stats", "--json").stdout)
    assert stats["calls_with_bodies"] == 2 and stats["redactions"]["jwt"] == 2
    assert stats["redactions"]["openai_key"] == 1 and stats["redactions_total"] == 5
    text = cli(proxy.home, "bodies", "stats").stdout
    assert "openai_key" in text and "2 call(s) with stored bodies" in text
    result = cli(proxy.home, "bodies", "purge", "--older-than", "5d", "--vacuum")
    assert result.returncode == 0 and "of 1 call(s)" in result.stdout and "VACUUM" in result.stdout
    assert len(body_rows(proxy.db)) == 1
    assert cli(proxy.home, "bodies", "purge", "--older-than", "soon").returncode == 2


def test_bodies_show(metered):
    proxy = metered()
    call_from_process(proxy, body=secret_body(), headers={"X-Halton-Project": "alpha"})
    (call,) = wait_for_rows(proxy.db, 1)
    result = cli(proxy.home, "bodies", "show", call["call_id"][:16])
    assert result.returncode == 0, result.stderr
    assert PROMPT_MARKER in result.stdout and OPENAI_KEY not in result.stdout
    assert "[REDACTED:auth_header]" in result.stdout and "project alpha" in result.stdout
    shown = json.loads(cli(proxy.home, "bodies", "show", call["call_id"], "--json").stdout)
    assert shown["call_id"] == call["call_id"] and shown["redactions"]["openai_key"] == 1
    missing = cli(proxy.home, "bodies", "show", "ffffffff")
    assert missing.returncode == 1 and "no stored bodies" in missing.stderr


# --- project commands and export -----------------------------------------------------------


def test_project_rename_merge_and_aliases_for_calls_still_arriving(metered):
    proxy = metered()
    for name in ("web", "web-old", "api"):
        call_from_process(proxy, headers={"X-Halton-Project": name})
    wait_for_rows(proxy.db, 3)
    assert cli(proxy.home, "project", "merge", "web-old", "web").returncode == 0
    result = cli(proxy.home, "project", "rename", "api", "backend")
    assert result.returncode == 0 and "Renamed project api to backend" in result.stdout
    call_from_process(proxy, headers={"X-Halton-Project": "api"})  # still sent under the old name
    wait_for_rows(proxy.db, 4)
    assert [r["project"] for r in rows(proxy.db)] == ["web", "web", "backend", "backend"]
    listing = json.loads(cli(proxy.home, "project", "list", "--json").stdout)["projects"]
    by_name = {p["project"]: p for p in listing}
    assert set(by_name) == {"web", "backend"}
    assert by_name["web"]["calls"] == 2 and by_name["web"]["aliases"] == ["web-old"]
    assert by_name["backend"]["sources"] == {"header": 2}
    text = cli(proxy.home, "project", "list").stdout
    assert "backend (was api)" in text and "header 2" in text
    clash = cli(proxy.home, "project", "rename", "web", "backend")
    assert clash.returncode == 1 and "project merge web backend" in clash.stderr
    gone = cli(proxy.home, "project", "rename", "api", "x")
    assert gone.returncode == 1 and "renamed or merged into 'backend'" in gone.stderr
    bad = cli(proxy.home, "project", "rename", "web", "no spaces")
    assert bad.returncode == 1 and "not allowed" in bad.stderr


def test_export_csv_and_jsonl(metered, tmp_path):
    proxy = metered()
    call_from_process(proxy, headers={"X-Halton-Project": "alpha"})
    call_from_process(proxy, headers={"X-Halton-Project": "beta"})
    calls = wait_for_rows(proxy.db, 2)
    lines = cli(proxy.home, "export", "--format", "jsonl").stdout.splitlines()
    exported = [json.loads(line) for line in lines]
    assert [e["call_id"] for e in exported] == [c["call_id"] for c in calls]
    assert exported[0]["project"] == "alpha" and exported[0]["input_tokens"] == 12
    assert exported[0]["cost_usd"] == f"0.{calls[0]['cost_nanousd']:09d}" and exported[0]["is_stream"] is False
    table = list(csv.DictReader(io.StringIO(cli(proxy.home, "export", "--format", "csv", "--project", "beta").stdout)))
    assert [r["project"] for r in table] == ["beta"] and table[0]["output_tokens"] == "9"
    assert table[0]["reasoning_tokens"] == "" and table[0]["is_stream"] == "0"
    out = tmp_path / "calls.csv"
    result = cli(proxy.home, "export", "--format", "csv", "--since", "1h", "-o", str(out))
    assert result.returncode == 0 and "Wrote 2 call(s)" in result.stderr
    assert len(out.read_text().splitlines()) == 3
    assert cli(proxy.home, "export", "--format", "csv", "--since", "later").returncode == 2
    empty = cli(proxy.home, "export", "--format", "csv", "--since", "2000-01-01", "--until", "2000-01-02")
    assert empty.stdout.count("\n") == 1  # the header alone


def test_commands_on_a_home_without_a_ledger_say_so(tmp_path):
    stats = cli(tmp_path, "bodies", "stats", "--json")
    assert stats.returncode == 0 and json.loads(stats.stdout)["calls_with_bodies"] == 0
    show = cli(tmp_path, "bodies", "show", "abc")
    assert show.returncode == 1 and "no ledger" in show.stderr
    assert "No projects yet" in cli(tmp_path, "project", "list").stdout
    assert cli(tmp_path, "export", "--format", "jsonl").stdout == ""
    down = cli(tmp_path, "dashboard", "--print")
    assert down.returncode == 1 and "halton-meter start" in down.stderr
    assert not (tmp_path / "db.sqlite").exists()  # reading never creates a ledger


def test_dashboard_prints_the_running_daemons_address(metered):
    proxy = metered()
    port = int((proxy.home / "run" / "api.port").read_text())
    result = cli(proxy.home, "dashboard", "--print")
    assert result.returncode == 0 and result.stdout.strip() == f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("text, words", [
    ('[api]\nallowed_origins = "http://x"\n', "allowed_origins must be a list"),
    ("[bodies]\nmax_body_bytes = 0\n", "max_body_bytes must be a whole number"),
    ("[bodies]\nretention_days = 1.5\n", "retention_days must be a whole number"),
    ("[bodies]\nenable = true\n", "has no setting 'enable'"),
    ('[attribution]\nprocess_lookup = "yes"\n', "process_lookup must be true or false"),
    ("attribution = 3\n", "[attribution] must be a table"),
    ('[[attribution.rules]]\nprocess = "x"\n', "attribution rule 1"),
])
def test_new_config_sections_are_checked(tmp_path, text, words):
    from halton_meter.config import ConfigError, load_settings

    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(tmp_path)
    assert words in str(raised.value)


def test_configured_origin_may_read_the_api_and_others_may_not(tmp_path):
    import http.client

    (tmp_path / "config.toml").write_text('[api]\nallowed_origins = ["http://localhost:3000"]\n')
    proxy = start_serve(tmp_path)
    try:
        port = int((tmp_path / "run" / "api.port").read_text())
        for origin, status in (("http://localhost:3000", 200), ("http://evil.example", 403)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/summary", headers={"Origin": origin})
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == status
            if status == 200:
                assert response.getheader("Access-Control-Allow-Origin") == origin
    finally:
        assert stop_serve(proxy) == 0


# --- review fixes: edges of the pieces above ----------------------------------------------


def test_merge_into_an_old_name_merges_into_what_it_became(tmp_path):
    from halton_meter import projects
    from halton_meter.ledger import connect

    db = connect(tmp_path / "db.sqlite")
    for name in ("a", "x"):
        db.execute("INSERT INTO projects (name, created_at) VALUES (?, 0)", (name,))
        db.execute("INSERT INTO calls (call_id, started_at, host, method, path, outcome, is_stream, "
                   "request_bytes, response_bytes, project) VALUES (?, 0, 'h', 'POST', '/', 'ok', 0, 0, 0, ?)",
                   (f"call-{name}", name))
    out = io.StringIO()
    projects.rename(db, "a", "b", out=out)
    projects.merge(db, "x", "a", out=out)  # `a` is now an alias of `b`
    assert "into b" in out.getvalue()
    assert sorted(db.execute("SELECT alias, project FROM project_aliases")) == [("a", "b"), ("x", "b")]
    assert [r[0] for r in db.execute("SELECT name FROM projects")] == ["b"]
    assert sorted(r[0] for r in db.execute("SELECT project FROM calls")) == ["b", "b"]
    with pytest.raises(projects.ProjectError, match="into itself"):
        projects.merge(db, "b", "a", out=out)


def _capture(request: bytes, limit: int, total: int | None = None):
    from halton_meter.bodies import BodyCapture

    capture = BodyCapture([("content-type", "application/json")], limit)
    capture.add_request(request)
    if total is not None:
        capture.request_bytes = total  # as if the rest had come past the capture bound
    return capture


def test_redaction_growing_a_body_past_the_limit_is_a_recorded_cut():
    from halton_meter.bodies import stored_values

    body = b"password=abc " + b"x" * 80 + b" END"
    row = stored_values("c", 0.0, _capture(body, 100), 100)
    stored, truncated = row[3], row[5]
    assert len(body) <= 100 and truncated == 1 and len(stored.encode()) <= 100 and "abc" not in stored


def test_a_secret_at_the_end_of_a_cut_capture_is_never_stored():
    from halton_meter.bodies import stored_values

    key = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"
    kept = b"x" * 3000 + f" GEMINI key {key}".encode()[:-6]  # the capture ended mid-key
    row = stored_values("c", 0.0, _capture(kept, 4096, total=100_000), 4096)
    stored, truncated = row[3], row[5]
    assert truncated == 1 and key[:20] not in stored and len(stored.encode()) <= len(kept) - 1024


def test_stats_counts_stored_bytes_of_calls_without_a_body(tmp_path):
    from halton_meter import bodies
    from halton_meter.config import BodySettings
    from halton_meter.ledger import connect

    db = connect(tmp_path / "db.sqlite")
    db.execute("INSERT INTO request_bodies VALUES ('get', 0, '[]', NULL, 0, 0, '[]', ?, 10, 0, '{}')", ("r" * 10,))
    out = io.StringIO()
    bodies.stats(db, BodySettings(), as_json=True, out=out)
    assert json.loads(out.getvalue())["stored_bytes"] == 10 + 2 + 2


def test_on_commit_failure_neither_loses_nor_duplicates_rows(tmp_path):
    from halton_meter.ledger import CallRow, Ledger

    ledger = Ledger(tmp_path / "db.sqlite")
    ledger.on_commit = lambda: 1 / 0
    ledger.start()
    for n in range(3):
        ledger.record(CallRow(call_id=f"c{n}", started_at=1.0, host="h", method="POST", path="/"))
    ledger.close()
    assert (ledger.rows_written, ledger.rows_lost) == (3, 0)
    assert len(rows(tmp_path / "db.sqlite")) == 3


def test_a_row_whose_lookup_never_answers_is_recorded_once_as_default():
    from concurrent.futures import Future

    from halton_meter.relay import _PendingRow

    recorded = []
    ledger = type("L", (), {"record": lambda self, call: recorded.append((call.project, call.project_source))})()
    from halton_meter.ledger import CallRow

    pending = _PendingRow(CallRow(call_id="c", started_at=1.0, host="h", method="POST", path="/"), ledger)
    pending.record(None)  # the wait ran out
    late = Future()
    late.set_result(None)
    pending.record(late)  # the lookup answers after all: ignored
    assert recorded == [(None, "default")]


def test_bodies_are_dropped_not_queued_without_bound_when_the_writer_is_behind(tmp_path, monkeypatch):
    from halton_meter import ledger as ledger_module
    from halton_meter.config import BodySettings
    from halton_meter.ledger import CallRow, Ledger

    monkeypatch.setattr(ledger_module, "MAX_QUEUED_BODY_BYTES", 3000)
    ledger = Ledger(tmp_path / "db.sqlite", bodies=BodySettings())
    for n in range(3):  # queued before the writer starts: it is "behind"
        call = CallRow(call_id=f"c{n}", started_at=1.0, host="h", method="POST", path="/")
        call.bodies = _capture(b"x" * 1200, 4096)
        ledger.record(call)
    assert ledger.bodies_dropped == 1
    ledger.start()
    ledger.close()
    assert ledger.rows_written == 3 and len(body_rows(tmp_path / "db.sqlite")) == 2
    assert ledger._queued_body_bytes == 0
