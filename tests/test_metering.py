"""End to end: real clients' calls through `serve` to the fake provider become priced ledger rows.

One proxy for the module with every metered host sent to the fake; each test uses its own project
name and checks the row the proxy wrote: tokens, cost to the nano-dollar, outcome, ids, client.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from tests.conftest import start_serve, stop_serve, subprocess_env

METERED_HOSTS = ("api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com",
                 "cloudcode-pa.googleapis.com", "chatgpt.com", "api.deepseek.com", "api.x.ai",
                 "us-east5-aiplatform.googleapis.com")


@pytest.fixture(scope="module")
def metered(fake, tmp_path_factory):
    home = tmp_path_factory.mktemp("metered")
    args = []
    for host in METERED_HOSTS:
        args += ["--upstream", f"{host}=127.0.0.1:{fake.port}"]
    running = start_serve(home, *args, "--upstream-ca", str(fake.ca_path))
    yield running
    assert stop_serve(running) == 0
    assert "Traceback" not in running.log and "proxy_error" not in running.log, running.log[-3000:]


def call(proxy, host, path, body, project, *, headers=None, user_agent="OpenAI/Python 3.3.1"):
    conn = proxy.connection(host)
    fields = {"Content-Type": "application/json", "User-Agent": user_agent, "X-Halton-Project": project,
              **(headers or {})}
    conn.request("POST", path, body=json.dumps(body).encode(), headers=fields)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def only_row(proxy, project):
    rows = proxy.wait_rows(project)
    assert len(rows) == 1, rows
    return rows[0]


def tokens(row):
    return (row["input_tokens"], row["cache_read_tokens"],
            row["cache_write_5m_tokens"] + row["cache_write_1h_tokens"], row["output_tokens"])


def test_anthropic_stream_alias_priced_on_the_dated_model(metered):
    status, _ = call(metered, "api.anthropic.com", "/v1/messages?beta=true",
                     {"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": True, "messages": []},
                     "e2e-anthropic", user_agent="claude-cli/2.1.3 (external, cli)")
    assert status == 200
    row = only_row(metered, "e2e-anthropic")
    assert (row["provider"], row["endpoint"], row["outcome"], row["usage_status"]) == (
        "anthropic", "messages", "ok", "exact")
    assert (row["request_model"], row["response_model"], row["price_model"]) == (
        "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5")
    assert tokens(row) == (20, 0, 0, 6)
    assert row["cost_nanousd"] == 20 * 3000 + 6 * 15000  # $3 / $15 per Mtok
    assert row["client"] == "claude-code" and row["is_stream"] == 1
    assert row["request_id"].startswith("req_fake_")
    assert row["pricing_id"] is not None and row["unpriced_reason"] is None


def test_openai_chat_stream_with_include_usage(metered):
    call(metered, "api.openai.com", "/v1/chat/completions",
         {"model": "gpt-4.1", "stream": True, "stream_options": {"include_usage": True}, "messages": []},
         "e2e-chat")
    row = only_row(metered, "e2e-chat")
    assert (row["provider"], row["response_model"], row["usage_status"]) == ("openai", "gpt-4.1-2025-04-14", "exact")
    assert tokens(row) == (50, 0, 0, 6)
    assert row["cost_nanousd"] == 50 * 2000 + 6 * 8000
    assert row["client"] == "openai-python"


def test_openai_chat_stream_without_include_usage_is_unknown_not_zero(metered):
    call(metered, "api.openai.com", "/v1/chat/completions",
         {"model": "gpt-4.1", "stream": True, "messages": []}, "e2e-chat-nousage")
    row = only_row(metered, "e2e-chat-nousage")
    assert (row["usage_status"], row["cost_nanousd"], row["outcome"]) == ("unknown", None, "ok")


def test_responses_with_cached_and_reasoning_tokens(metered):
    call(metered, "api.openai.com", "/v1/responses", {"model": "gpt-5.5", "input": "hi"}, "e2e-responses")
    row = only_row(metered, "e2e-responses")
    assert tokens(row) == (388, 512, 0, 40) and row["reasoning_tokens"] == 16
    assert row["cost_nanousd"] == 388 * 5000 + 512 * 500 + 40 * 30000


@pytest.mark.parametrize("suffix,project", [(":streamGenerateContent?alt=sse", "e2e-gemini-sse"),
                                            (":streamGenerateContent", "e2e-gemini-array"),
                                            (":generateContent", "e2e-gemini-json")])
def test_gemini_streams_and_json_take_the_last_running_total(metered, suffix, project):
    call(metered, "generativelanguage.googleapis.com", f"/v1beta/models/gemini-2.5-flash{suffix}",
         {"contents": [{"parts": [{"text": "hi"}]}]}, project,
         user_agent="google-genai-sdk/2.19.0 gl-python/3.12.1")
    row = only_row(metered, project)
    # 900 prompt of which 512 cached; 40 candidates + 200 thoughts (billed as output).
    assert tokens(row) == (388, 512, 0, 240) and row["reasoning_tokens"] == 200
    assert row["cost_nanousd"] == 388 * 300 + 512 * 30 + 240 * 2500
    assert (row["request_model"], row["client"]) == ("gemini-2.5-flash", "google-genai-python")


def test_code_assist_wrapped_stream(metered):
    call(metered, "cloudcode-pa.googleapis.com", "/v1internal:streamGenerateContent?alt=sse",
         {"model": "gemini-2.5-pro", "project": "p", "request": {"contents": []}}, "e2e-code-assist",
         user_agent="GeminiCLI/0.20.0/gemini-2.5-pro (linux; x64; terminal)")
    row = only_row(metered, "e2e-code-assist")
    assert (row["provider"], row["client"], row["request_model"]) == ("code_assist", "gemini-cli", "gemini-2.5-pro")
    assert tokens(row) == (388, 512, 0, 240)
    assert row["cost_nanousd"] == 388 * 1250 + 512 * 125 + 240 * 10000


def test_codex_responses_on_chatgpt(metered):
    call(metered, "chatgpt.com", "/backend-api/codex/responses",
         {"model": "gpt-5.5", "stream": True, "input": [], "store": False}, "e2e-codex",
         user_agent="codex_cli_rs/0.61.0 (Ubuntu 24.4.0; x86_64) xterm-256color")
    row = only_row(metered, "e2e-codex")
    assert (row["provider"], row["client"], row["usage_status"]) == ("codex", "codex", "exact")
    assert tokens(row) == (388, 512, 0, 40)


def test_vertex_anthropic_model_from_the_path(metered):
    call(metered, "us-east5-aiplatform.googleapis.com",
         "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict",
         {"anthropic_version": "vertex-2023-10-16", "stream": True, "max_tokens": 5, "messages": []}, "e2e-vertex")
    row = only_row(metered, "e2e-vertex")
    assert (row["provider"], row["request_model"], row["price_model"]) == (
        "vertex", "claude-sonnet-4-5@20250929", "claude-sonnet-4-5")
    assert row["cost_nanousd"] == 20 * 3000 + 6 * 15000


def test_unknown_model_is_unpriced_not_free(metered):
    call(metered, "api.anthropic.com", "/v1/messages",
         {"model": "claude-private-experiment", "max_tokens": 5, "messages": []}, "e2e-unknown")
    row = only_row(metered, "e2e-unknown")
    assert row["usage_status"] == "exact" and tokens(row) == (12, 0, 0, 9)
    assert row["cost_nanousd"] is None
    assert "claude-private-experiment" in row["unpriced_reason"]


def test_rate_limit_is_a_provider_error_with_its_type(metered):
    status, _ = call(metered, "api.openai.com", "/v1/chat/completions", {"model": "gpt-4.1", "messages": []},
                     "e2e-429", headers={"x-fake-status": "429"})
    assert status == 429
    row = only_row(metered, "e2e-429")
    assert (row["outcome"], row["status"], row["error_type"], row["usage_status"]) == (
        "provider_error", 429, "rate_limit_exceeded", "none")
    assert row["cost_nanousd"] is None and row["unpriced_reason"] is None


def test_gzip_json_response_is_metered(metered):
    status, data = call(metered, "api.anthropic.com", "/v1/messages",
                        {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}, "e2e-gzip",
                        headers={"Accept-Encoding": "gzip"})
    assert status == 200 and json.loads(gzip.decompress(data))["usage"]["output_tokens"] == 9
    row = only_row(metered, "e2e-gzip")
    assert tokens(row) == (12, 0, 0, 9) and row["cost_nanousd"] == 12 * 1000 + 9 * 5000


def test_cancelled_anthropic_stream_keeps_partial_usage(metered):
    conn = metered.connection("api.anthropic.com")
    conn.request("POST", "/v1/messages", body=json.dumps(
        {"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True, "messages": []}).encode(),
        headers={"Content-Type": "application/json", "X-Halton-Project": "e2e-cancel",
                 "x-fake-hold-s": "5"})
    response = conn.getresponse()
    assert b"message_start" in response.read1(65536)
    conn.sock.close()  # the user pressed Ctrl-C
    conn.close()
    row = only_row(metered, "e2e-cancel")
    assert (row["outcome"], row["usage_status"]) == ("client_cancelled", "partial")
    assert row["input_tokens"] == 20 and row["cost_nanousd"] == 20 * 3000 + 1 * 15000


def test_report_over_the_metered_calls(metered):
    call(metered, "api.deepseek.com", "/chat/completions", {"model": "deepseek-v4-pro", "messages": []},
         "e2e-report")
    only_row(metered, "e2e-report")
    result = subprocess.run([sys.executable, "-m", "halton_meter", "report", "--json", "--project", "e2e-report"],
                            capture_output=True, text=True, env=subprocess_env(metered.home), timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["totals"]["calls"] == 1
    # deepseek-v4-pro: 50 uncached input at $1.32 (peak) or $0.66 (off-peak), 6 output at $3.96 / $1.98.
    assert report["totals"]["cost_nanousd"] in (50 * 1320 + 6 * 3960, 50 * 660 + 6 * 1980)
