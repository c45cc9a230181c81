"""OpenAI-compatible providers (xAI, Groq, DeepSeek, Mistral, OpenRouter) on recorded transcripts."""

import json

import pytest

from halton_meter.adapters import adapter_for
from halton_meter.adapters.compat import ticks_to_nanousd
from tests.adapter_harness import chunkings, replay, transcript, usage_tuple
from tests.test_adapters_openai import cut_before, replay_json, replay_stream, stream_cases

XAI, GROQ, DEEPSEEK = "api.x.ai", "api.groq.com", "api.deepseek.com"
MISTRAL, OPENROUTER = "api.mistral.ai", "openrouter.ai"


def chat(model: str, **more) -> dict:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}], **more}


# ---- xAI ------------------------------------------------------------------------------------


def test_xai_chat_reasoning_outside_completion_is_added():
    state = replay_json(XAI, "/v1/chat/completions", {"model": "grok-4.7"}, "xai_chat.json")
    # total 160 = 100 prompt + 10 completion + 50 reasoning: billed output is 60.
    assert usage_tuple(state) == (36, 64, 0, 60, 50)
    assert state.provider == "xai" and state.response_model == "grok-4.7"
    assert state.provider_cost_nanousd == 464_000  # 4,640,000 ticks = $0.000464
    assert state.usage.raw["cost_in_usd_ticks"] == 4_640_000


@pytest.mark.parametrize("total,output", [(110, 10), (None, 10), (999, 10)])
def test_xai_fold_is_guarded_by_total_tokens(total, output):
    body = json.loads(transcript("xai_chat.json"))
    if total is None:
        del body["usage"]["total_tokens"]
    else:
        body["usage"]["total_tokens"] = total
    state, _ = replay(XAI, "/v1/chat/completions", {"model": "grok-4.7"}, json.dumps(body).encode())
    assert state.usage.output_tokens == output and state.usage.reasoning_tokens == 50


@pytest.mark.parametrize("label,chunks", stream_cases("xai_chat_stream.sse"))
def test_xai_chat_stream_usage_before_a_trailing_empty_chunk(label, chunks):
    state = replay_stream(XAI, "/v1/chat/completions", chat("grok-4.7"), chunks)
    # 1229 = 812 + 95 + 322: reasoning outside completion.
    assert usage_tuple(state) == (44, 768, 0, 417, 322)
    assert state.usage_status == "exact"
    assert state.provider_cost_nanousd == 2_876_500  # 28,765,005 ticks, half to even
    assert state.request_id == "3f9d2c1e-7a41-4b8e-9d60-2f8b1c0e5a77"


@pytest.mark.parametrize("label,chunks", stream_cases("xai_chat_stream_cumulative.sse"))
def test_xai_cumulative_usage_on_every_chunk_takes_the_last(label, chunks):
    state = replay_stream(XAI, "/v1/chat/completions", chat("grok-beta"), chunks)
    assert usage_tuple(state) == (38, 0, 0, 5, -1)  # not 1+2+3+4+5
    assert state.usage_status == "exact"


def test_xai_cumulative_stream_cancelled_is_partial_lower_bound():
    data = cut_before("xai_chat_stream_cumulative.sse", b'data: {"id":"e409f4cc-6be8-4920-8de4-'
                      b'9849e7c66cd9","object":"chat.completion.chunk","created":1732551988,'
                      b'"model":"grok-beta","choices":[{"index":0,"delta":{"content":" a"')
    state = replay_stream(XAI, "/v1/chat/completions", chat("grok-beta"), [data], complete=False)
    assert usage_tuple(state) == (38, 0, 0, 3, -1)
    assert state.usage_status == "partial"


@pytest.mark.parametrize("label,chunks", stream_cases("xai_responses_stream.sse"))
def test_xai_responses_stream_reasoning_already_inside(label, chunks):
    state = replay_stream(XAI, "/v1/responses", {"model": "grok-4.7", "stream": True}, chunks)
    # total 2610 = 2200 + 410: reasoning 380 is inside output, nothing is added.
    assert usage_tuple(state) == (152, 2048, 0, 410, 380)
    assert state.provider_cost_nanousd == 6_593_000
    assert (state.provider, state.endpoint, state.usage_status) == ("xai", "responses", "exact")
    assert state.request_id == "9c1b7e2a-55d3-4f0e-a1c2-3b4d5e6f7a8b"


def test_xai_responses_json_reasoning_outside_output_is_added():
    state = replay_json(XAI, "/v1/responses", {"model": "grok-4.7"}, "xai_responses.json")
    assert usage_tuple(state) == (300, 0, 0, 120, 100)
    assert state.provider_cost_nanousd == 123_457  # 1,234,567 ticks rounds up


def test_xai_error_body_uses_its_code():
    state = replay_json(XAI, "/v1/chat/completions", chat("grok-4.7"), "xai_error_400.json",
                        status=400)
    assert state.error_type == "Client specified an invalid argument"
    assert state.usage_status == "none"


@pytest.mark.parametrize("ticks,nano", [
    (0, 0), (4_640_000, 464_000), (15, 2), (25, 2), (35, 4), (14, 1), (16, 2),
    (28_765_005, 2_876_500), ("1234567", 123_457), (7.0, 1), (None, None), (-5, None), (True, None),
])
def test_ticks_to_nanousd_rounds_half_to_even(ticks, nano):
    assert ticks_to_nanousd(ticks) == nano


# ---- Groq -----------------------------------------------------------------------------------


@pytest.mark.parametrize("label,chunks", stream_cases("groq_chat_stream.sse"))
def test_groq_usage_in_x_groq_on_the_final_chunk(label, chunks):
    state = replay_stream(GROQ, "/openai/v1/chat/completions", chat("openai/gpt-oss-120b"), chunks)
    assert usage_tuple(state) == (40, 0, 0, 12, -1)
    assert state.usage_status == "exact"
    assert state.request_id == "req_01k9x2abc"  # x_groq.id over the chatcmpl id
    assert state.usage.raw["queue_time"] == 0.020134


def test_groq_header_request_id_wins_over_x_groq_id():
    state = replay_stream(GROQ, "/openai/v1/chat/completions", chat("openai/gpt-oss-120b"),
                          [transcript("groq_chat_stream.sse")],
                          response_headers={"x-request-id": "req_header"})
    assert state.request_id == "req_header"


@pytest.mark.parametrize("label,chunks", stream_cases("groq_chat_stream_both.sse"))
def test_groq_usage_in_both_places_is_read_once(label, chunks):
    request = chat("openai/gpt-oss-120b", stream_options={"include_usage": True})
    state = replay_stream(GROQ, "/openai/v1/chat/completions", request, chunks)
    assert usage_tuple(state) == (266, 1024, 0, 88, 40)  # not doubled
    assert state.usage_status == "exact"


@pytest.mark.parametrize("label,chunks", stream_cases("groq_stream_error.sse"))
def test_groq_x_groq_error_sets_error_type(label, chunks):
    state = replay_stream(GROQ, "/openai/v1/chat/completions", chat("openai/gpt-oss-120b"), chunks)
    assert state.error_type == "over_capacity"
    assert state.usage is None and state.usage_status == "unknown"


def test_groq_json():
    state = replay_json(GROQ, "/openai/v1/chat/completions", {"model": "llama-3.3-70b-versatile"},
                        "groq_chat.json")
    assert usage_tuple(state) == (120, 0, 0, 30, -1)
    assert (state.provider, state.request_id, state.service_tier) == ("groq", "req_01k9json",
                                                                      "on_demand")


def test_groq_embeddings():
    state = replay_json(GROQ, "/openai/v1/embeddings", {"model": "nomic-embed-text-v1_5"},
                        "groq_embeddings.json")
    assert usage_tuple(state) == (6, 0, 0, 0, -1) and state.endpoint == "embeddings"


@pytest.mark.parametrize("label,chunks", list(chunkings(
    cut_before("groq_chat_stream.sse", b'data: {"id":"chatcmpl-6f1e2d3c-4b5a-4978-8a1b-2c3d4e5f6a7b",'
               b'"object":"chat.completion.chunk","created":1795420800,"model":"openai/gpt-oss-120b",'
               b'"system_fingerprint":"fp_a1b2c3d4e5","x_groq":{"id":"req_01k9x2abc","usage"'))))
def test_groq_stream_cancelled_before_the_final_chunk_is_unknown(label, chunks):
    state = replay_stream(GROQ, "/openai/v1/chat/completions", chat("openai/gpt-oss-120b"), chunks,
                          complete=False)
    assert state.usage is None and state.usage_status == "unknown"
    assert state.response_model == "openai/gpt-oss-120b"


# ---- DeepSeek -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_deepseek_hit_and_miss_with_cached_tokens_present(path):
    state = replay_json(DEEPSEEK, path, {"model": "deepseek-v4-flash"}, "deepseek_chat.json")
    # prompt 1000 = 960 hit + 40 miss; cached_tokens 960 repeats the hit count, never subtracted.
    assert usage_tuple(state) == (40, 960, 0, 20, -1)
    assert (state.provider, state.endpoint) == ("deepseek", "chat")


def test_deepseek_hit_and_miss_alone():
    body = json.loads(transcript("deepseek_chat.json"))
    del body["usage"]["prompt_tokens_details"]
    state, _ = replay(DEEPSEEK, "/chat/completions", {"model": "deepseek-v4-flash"},
                      json.dumps(body).encode())
    assert usage_tuple(state) == (40, 960, 0, 20, -1)


@pytest.mark.parametrize("label,chunks", stream_cases("deepseek_chat_stream.sse"))
def test_deepseek_reasoner_stream(label, chunks):
    state = replay_stream(DEEPSEEK, "/chat/completions", chat("deepseek-reasoner"), chunks)
    assert usage_tuple(state) == (180, 1920, 0, 640, 512)
    assert state.usage_status == "exact"
    assert state.usage.raw["prompt_cache_miss_tokens"] == 180


def test_deepseek_gzip_json():
    state, tap = replay(DEEPSEEK, "/chat/completions", {"model": "deepseek-v4-flash"},
                        transcript("deepseek_chat.json"), gzip_response=True)
    assert tap.parse_error is None and usage_tuple(state) == (40, 960, 0, 20, -1)


# ---- Mistral --------------------------------------------------------------------------------


@pytest.mark.parametrize("label,chunks", stream_cases("mistral_chat_stream.sse"))
def test_mistral_stream_usage_on_the_last_chunk(label, chunks):
    state = replay_stream(MISTRAL, "/v1/chat/completions", chat("mistral-large-latest"), chunks)
    assert usage_tuple(state) == (26, 0, 0, 15, -1)
    assert (state.provider, state.usage_status, state.request_id) == (
        "mistral", "exact", "cmpl-e5cc70bb28c444948073e77776eb30ef")


@pytest.mark.parametrize("path,name,expected,endpoint", [
    ("/v1/chat/completions", "mistral_chat.json", (1088, 512, 0, 50, -1), "chat"),
    ("/v1/fim/completions", "mistral_fim.json", (18, 0, 0, 42, -1), "fim"),
    ("/v1/embeddings", "mistral_embeddings.json", (9, 0, 0, 0, -1), "embeddings"),
])
def test_mistral_json(path, name, expected, endpoint):
    state = replay_json(MISTRAL, path, {"model": "mistral-medium"}, name)
    assert usage_tuple(state) == expected and state.endpoint == endpoint


def test_mistral_error_at_the_top_level():
    state = replay_json(MISTRAL, "/v1/chat/completions", chat("mistral-large-latest"),
                        "mistral_error_422.json", status=422)
    assert state.error_type == "invalid_request_message_order"


# ---- OpenRouter -----------------------------------------------------------------------------


@pytest.mark.parametrize("label,chunks", stream_cases("openrouter_chat_stream.sse"))
def test_openrouter_stream_usage_and_cost_in_the_last_chunk(label, chunks):
    request = chat("anthropic/claude-sonnet-4.5")  # no include_usage: OpenRouter sends it anyway
    state = replay_stream(OPENROUTER, "/api/v1/chat/completions", request, chunks)
    assert usage_tuple(state) == (224, 4096, 1800, 412, 0)
    assert state.usage.cache_write_5m_tokens == 1800  # an Anthropic model's writes
    assert state.provider_cost_nanousd == 10_592_100
    assert (state.provider, state.response_model, state.request_id) == (
        "openrouter", "anthropic/claude-sonnet-4.5", "gen-1795420800-AbCdEfGhIjKl")


def test_openrouter_generation_id_header():
    state = replay_stream(OPENROUTER, "/api/v1/chat/completions", chat("anthropic/claude-sonnet-4.5"),
                          [transcript("openrouter_chat_stream.sse")],
                          response_headers={"X-Generation-Id": "gen-from-header"})
    assert state.request_id == "gen-from-header"


def test_openrouter_json():
    state = replay_json(OPENROUTER, "/api/v1/chat/completions", {"model": "openai/gpt-5.5"},
                        "openrouter_chat.json")
    assert usage_tuple(state) == (194, 0, 0, 2, 0)
    assert state.provider_cost_nanousd == 950_000_000  # $0.95
    assert state.response_model == "openai/gpt-5.5"


def test_openrouter_completions():
    state = replay_json(OPENROUTER, "/api/v1/completions", {"model": "meta-llama/llama-3.1-8b-instruct"},
                        "openrouter_completions.json")
    assert usage_tuple(state) == (10, 0, 0, 20, 0)
    assert (state.endpoint, state.provider_cost_nanousd) == ("completions", 1200)


@pytest.mark.parametrize("label,chunks", stream_cases("openrouter_stream_error.sse"))
def test_openrouter_mid_stream_error(label, chunks):
    state = replay_stream(OPENROUTER, "/api/v1/chat/completions", chat("openai/gpt-5.5"), chunks)
    assert state.error_type == "api_error"  # {"code": 502, …}
    assert state.usage is None and state.usage_status == "unknown"


def test_openrouter_429_numeric_code_falls_back_to_the_status():
    body = json.dumps({"error": {"code": 429, "message": "Rate limit exceeded"}}).encode()
    state, tap = replay(OPENROUTER, "/api/v1/chat/completions", chat("openai/gpt-5.5"), body,
                        status=429)
    assert tap.parse_error is None and state.error_type == "rate_limit_error"


# ---- routing --------------------------------------------------------------------------------


@pytest.mark.parametrize("host,method,target,name", [
    (XAI, "POST", "/v1/chat/completions", "xai.chat"),
    (XAI, "POST", "/v1/responses", "xai.responses"),
    (XAI, "POST", "/v1/images/generations", "generic"),
    (GROQ, "POST", "/openai/v1/chat/completions", "groq.chat"),
    (GROQ, "POST", "/openai/v1/responses", "groq.responses"),
    (GROQ, "GET", "/openai/v1/models", "generic"),
    (DEEPSEEK, "POST", "/chat/completions", "deepseek.chat"),
    (DEEPSEEK, "POST", "/beta/completions", "deepseek.chat"),
    (MISTRAL, "POST", "/v1/fim/completions", "mistral.chat"),
    (OPENROUTER, "POST", "/api/v1/chat/completions", "openrouter.chat"),
    (OPENROUTER, "GET", "/api/v1/generation", "generic"),
])
def test_routing(host, method, target, name):
    assert adapter_for(host, method, target).name == name
