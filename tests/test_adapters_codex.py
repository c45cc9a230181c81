"""Codex on chatgpt.com and the Grok CLI proxy, on recorded transcripts."""

import pytest

from halton_meter.adapters import adapter_for
from tests.adapter_harness import chunkings, replay, transcript, usage_tuple
from tests.test_adapters_openai import cut_before, replay_json, replay_stream, stream_cases

CHATGPT, GROK_CLI = "chatgpt.com", "cli-chat-proxy.grok.com"
CODEX = "/backend-api/codex/responses"
REQUEST = {"model": "gpt-5.5-codex", "stream": True, "store": False, "instructions": "…",
           "input": [], "prompt_cache_key": "019a2b3c-4d5e-6f70-8192-a3b4c5d6e7f8"}
CODEX_HEADERS = {"originator": "codex_cli_rs", "User-Agent": "codex_cli_rs/0.80.0 (Linux; x86_64)"}


@pytest.mark.parametrize("label,chunks", stream_cases("codex_responses_stream.sse"))
def test_codex_stream_reads_response_completed(label, chunks):
    state = replay_stream(CHATGPT, CODEX, REQUEST, chunks, request_headers=CODEX_HEADERS,
                          response_headers={"x-oai-request-id": "oai-req-7c1d"})
    assert usage_tuple(state) == (1372, 19968, 0, 286, 192)
    assert (state.provider, state.endpoint, state.usage_status) == ("codex", "responses", "exact")
    assert state.request_id == "oai-req-7c1d"
    assert state.response_model == "gpt-5.5-codex"
    assert state.usage.raw == {"input_tokens": 21340, "input_tokens_details": {"cached_tokens": 19968},
                               "output_tokens": 286, "output_tokens_details": {"reasoning_tokens": 192},
                               "total_tokens": 21626}


@pytest.mark.parametrize("headers,expected", [
    ({"x-request-id": "req_a", "x-oai-request-id": "oai_b"}, "req_a"),
    ({}, "resp_0c9d8e7f6a5b4c3d"),
])
def test_codex_request_id_sources(headers, expected):
    state = replay_stream(CHATGPT, CODEX, REQUEST, [transcript("codex_responses_stream.sse")],
                          response_headers=headers)
    assert state.request_id == expected


@pytest.mark.parametrize("complete", [True, False])
def test_codex_stream_without_response_completed_is_unknown(complete):
    data = cut_before("codex_responses_stream.sse", b"event: response.completed")
    for label, chunks in chunkings(data):
        state = replay_stream(CHATGPT, CODEX, REQUEST, chunks, complete=complete)
        assert state.usage is None and state.usage_status == "unknown", label
        assert state.response_model == "gpt-5.5-codex"


def test_codex_compact():
    state = replay_json(CHATGPT, CODEX + "/compact", {"model": "gpt-5.5-codex", "input": []},
                        "codex_compact.json")
    assert (state.endpoint, state.provider, state.usage_status) == ("compact", "codex", "exact")
    assert usage_tuple(state) == (8368, 172032, 0, 3100, 1024)


def test_codex_usage_limit_error():
    state = replay_json(CHATGPT, CODEX, REQUEST, "codex_error_429.json", status=429)
    assert state.error_type == "usage_limit_reached"
    assert state.usage_status == "none"


def test_other_chatgpt_paths_are_generic():
    adapter = adapter_for(CHATGPT, "GET", "/backend-api/codex/models")
    assert adapter.name == "generic" and adapter.provider == "codex"


# ---- Grok CLI (wire format unconfirmed: metered with xAI's shapes) ---------------------------


@pytest.mark.parametrize("label,chunks", stream_cases("xai_responses_stream.sse"))
def test_grok_cli_responses_with_xai_shapes(label, chunks):
    state = replay_stream(GROK_CLI, "/v1/responses", {"model": "grok-4.7", "stream": True}, chunks)
    assert usage_tuple(state) == (152, 2048, 0, 410, 380)
    assert (state.provider, state.endpoint, state.usage_status) == ("grok_cli", "responses", "exact")
    assert state.provider_cost_nanousd == 6_593_000


def test_grok_cli_chat_folds_reasoning_like_xai():
    state = replay_json(GROK_CLI, "/v1/chat/completions", {"model": "grok-4.7"}, "xai_chat.json")
    assert usage_tuple(state) == (36, 64, 0, 60, 50)
    assert state.provider == "grok_cli"


def test_grok_cli_gzip_json():
    state, tap = replay(GROK_CLI, "/v1/chat/completions", {"model": "grok-4.7"},
                        transcript("xai_chat.json"), gzip_response=True)
    assert tap.parse_error is None and state.provider_cost_nanousd == 464_000
