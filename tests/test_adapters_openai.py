"""OpenAI adapters (api.openai.com) on recorded transcripts, replayed whole and re-chunked.

Every streaming transcript is replayed with LF and CRLF line ends under every chunking the
harness yields; each case asserts the exact normalised counters.
"""

import json
from types import SimpleNamespace

import pytest

from halton_meter.adapters import adapter_for
from halton_meter.adapters import openai as openai_adapters
from halton_meter.adapters.base import BILL_FREE, BILL_NONE, BILL_TOKENS
from tests.adapter_harness import chunkings, replay, transcript, usage_tuple

HOST = "api.openai.com"
CHAT = {"model": "gpt-5.4", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "gpt-5.5", "stream": True, "input": "hi"}


# ---- helpers shared with test_adapters_compat.py and test_adapters_codex.py -----------------


def stream_cases(name: str) -> list[tuple[str, list[bytes]]]:
    """(label, chunks) for a streaming transcript: LF and CRLF line ends, every chunking."""
    lf = transcript(name).replace(b"\r\n", b"\n")
    cases = []
    for ending, data in (("lf", lf), ("crlf", lf.replace(b"\n", b"\r\n"))):
        cases += [(f"{ending}/{label}", chunks) for label, chunks in chunkings(data)]
    return cases


def replay_stream(host: str, target: str, request: object, chunks: list[bytes], **options):
    state, tap = replay(host, target, request, chunks, content_type="text/event-stream", **options)
    assert tap.parse_error is None, tap.parse_error
    return state


def replay_json(host: str, target: str, request: object, name: str, **options):
    state, tap = replay(host, target, request, transcript(name), content_type="application/json",
                        **options)
    assert tap.parse_error is None, tap.parse_error
    return state


def cut_before(name: str, marker: bytes) -> bytes:
    """A transcript's bytes up to (not including) the first `marker`: a cancelled stream."""
    data = transcript(name)
    assert marker in data
    return data[: data.index(marker)]


def usage_json(name: str, *path: str) -> dict:
    """The provider's usage object as recorded in a JSON transcript."""
    value = json.loads(transcript(name))
    for key in path:
        value = value[key]
    return value


# ---- Chat Completions -----------------------------------------------------------------------


@pytest.mark.parametrize("label,chunks", stream_cases("openai_chat_stream_usage.sse"))
def test_chat_stream_with_include_usage_reads_the_final_usage_chunk(label, chunks):
    state = replay_stream(HOST, "/v1/chat/completions", CHAT, chunks)
    # cached 1920 is inside prompt 2006; reasoning 192 is inside completion 300.
    assert usage_tuple(state) == (86, 1920, 0, 300, 192)
    assert state.usage_status == "exact"
    assert (state.provider, state.endpoint, state.billing, state.is_stream) == (
        "openai", "chat", BILL_TOKENS, True)
    assert (state.request_model, state.response_model) == ("gpt-5.4", "gpt-5.4-2026-03-05")
    assert state.request_id == "chatcmpl-CxR7a2Lq9vTq"
    assert state.service_tier == "default"
    assert state.usage.raw["prompt_tokens_details"] == {"cached_tokens": 1920, "audio_tokens": 0}
    assert state.error_type is None  # '"error":' inside generated text is not an error


@pytest.mark.parametrize("label,chunks", stream_cases("openai_chat_stream_no_usage.sse"))
def test_chat_stream_without_include_usage_is_unknown_never_zero(label, chunks):
    request = {"model": "gpt-4.1", "stream": True, "messages": []}
    state = replay_stream(HOST, "/v1/chat/completions", request, chunks)
    assert state.usage is None
    assert state.usage_status == "unknown"
    assert state.response_model == "gpt-4.1-2025-04-14"
    assert state.request_id == "chatcmpl-CxR9bNoUsage"


def test_chat_json_and_the_header_request_id_wins():
    state = replay_json(HOST, "/v1/chat/completions", {"model": "gpt-5.4", "messages": []},
                        "openai_chat.json", response_headers={"x-request-id": "req_7f3e"})
    assert usage_tuple(state) == (176, 1024, 0, 300, 128)
    assert state.usage_status == "exact" and state.is_stream is False
    assert state.request_id == "req_7f3e"
    assert state.response_model == "gpt-5.4-2026-03-05" and state.service_tier == "default"
    assert state.usage.raw == usage_json("openai_chat.json", "usage")


def test_chat_json_gzip_compressed():
    state, tap = replay(HOST, "/v1/chat/completions", {"model": "gpt-5.4"},
                        transcript("openai_chat.json"), gzip_response=True)
    assert tap.parse_error is None
    assert usage_tuple(state) == (176, 1024, 0, 300, 128)
    assert state.request_id == "chatcmpl-1"


def test_cache_writes_are_inside_the_prompt_and_split_30m_12h():
    state = replay_json(HOST, "/v1/chat/completions", {"model": "gpt-5.6"},
                        "openai_chat_cache_write.json")
    usage = state.usage
    # 10000 prompt = 4000 uncached + 2000 read + 4000 written (1000 for 30 min, 3000 for 12 h).
    assert usage_tuple(state) == (4000, 2000, 4000, 500, 0)
    assert (usage.cache_write_30m_tokens, usage.cache_write_12h_tokens) == (1000, 3000)
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (0, 0)
    assert usage.prompt_tokens == 10000
    assert state.service_tier == "priority"


def test_cache_writes_without_a_split_are_all_30m():
    body = json.loads(transcript("openai_chat_cache_write.json"))
    del body["usage"]["prompt_tokens_details"]["cache_write_tokens_details"]
    state, _ = replay(HOST, "/v1/chat/completions", {"model": "gpt-5.6"}, json.dumps(body).encode())
    assert (state.usage.cache_write_30m_tokens, state.usage.cache_write_12h_tokens) == (4000, 0)
    assert state.usage.input_tokens == 4000


@pytest.mark.parametrize("label,chunks", stream_cases("openai_completions_stream.sse"))
def test_legacy_completions_stream(label, chunks):
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "Roses", "stream": True,
               "stream_options": {"include_usage": True}}
    state = replay_stream(HOST, "/v1/completions", request, chunks)
    assert usage_tuple(state) == (12, 0, 0, 7, -1)
    assert (state.endpoint, state.usage_status, state.request_id) == (
        "completions", "exact", "cmpl-9xYzLegacy")


def test_legacy_completions_json():
    state = replay_json(HOST, "/v1/completions", {"model": "gpt-3.5-turbo-instruct"},
                        "openai_completions.json")
    assert usage_tuple(state) == (5, 0, 0, 7, -1)
    assert state.endpoint == "completions"


def test_embeddings_count_prompt_tokens_only():
    state = replay_json(HOST, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"},
                        "openai_embeddings.json")
    assert usage_tuple(state) == (8, 0, 0, 0, -1)
    assert (state.endpoint, state.usage_status, state.response_model) == (
        "embeddings", "exact", "text-embedding-3-small")


# ---- Responses ------------------------------------------------------------------------------


@pytest.mark.parametrize("label,chunks", stream_cases("openai_responses_stream.sse"))
def test_responses_stream_reads_response_completed(label, chunks):
    state = replay_stream(HOST, "/v1/responses", RESPONSES, chunks)
    usage = state.usage
    # 9000 input = 2856 uncached + 4096 read + 2048 written (512 for 30 min, 1536 for 12 h).
    assert usage_tuple(state) == (2856, 4096, 2048, 640, 512)
    assert (usage.cache_write_30m_tokens, usage.cache_write_12h_tokens) == (512, 1536)
    assert state.usage_status == "exact"
    assert (state.endpoint, state.response_model, state.request_id) == (
        "responses", "gpt-5.5-2026-04-23", "resp_68f0a1b2c3")
    assert state.service_tier == "default"  # the terminal event's tier, not created's "auto"
    assert usage.raw["total_tokens"] == 9640


def test_responses_stream_header_request_id_wins():
    chunks = [transcript("openai_responses_stream.sse")]
    state = replay_stream(HOST, "/v1/responses", RESPONSES, chunks,
                          response_headers={"x-request-id": "req_hdr1"})
    assert state.request_id == "req_hdr1"


@pytest.mark.parametrize("label,chunks", stream_cases("openai_responses_failed.sse"))
def test_response_failed_with_usage_keeps_usage_and_error_code(label, chunks):
    state = replay_stream(HOST, "/v1/responses", RESPONSES, chunks)
    assert usage_tuple(state) == (1500, 0, 0, 37, 0)
    assert state.usage_status == "exact"
    assert state.error_type == "server_error"


@pytest.mark.parametrize("label,chunks", stream_cases("openai_responses_error_event.sse"))
def test_error_event_sets_the_error_code(label, chunks):
    state = replay_stream(HOST, "/v1/responses", RESPONSES, chunks)
    assert state.error_type == "rate_limit_exceeded"
    assert state.usage is None and state.usage_status == "unknown"
    assert state.response_model == "gpt-5.5-2026-04-23"


@pytest.mark.parametrize("label,chunks",
                         stream_cases("openai_responses_incomplete_no_event_lines.sse"))
def test_response_incomplete_without_event_lines(label, chunks):
    state = replay_stream(HOST, "/v1/responses", RESPONSES, chunks)
    assert usage_tuple(state) == (188, 512, 0, 64, 48)
    assert state.usage_status == "exact" and state.error_type is None
    assert state.request_id == "resp_68f0incomplete"


@pytest.mark.parametrize("gzipped", [False, True])
def test_responses_json(gzipped):
    state, tap = replay(HOST, "/v1/responses", {"model": "gpt-5.5", "input": "hi"},
                        transcript("openai_responses.json"), gzip_response=gzipped)
    assert tap.parse_error is None
    assert usage_tuple(state) == (320, 0, 0, 75, 64)
    assert (state.usage_status, state.service_tier, state.request_id) == (
        "exact", "flex", "resp_68f0json")


def test_responses_compact_is_billed_like_a_response():
    state = replay_json(HOST, "/v1/responses/compact", {"model": "gpt-5.5", "input": []},
                        "openai_responses_compact.json")
    assert (state.endpoint, state.billing, state.usage_status) == ("compact", BILL_TOKENS, "exact")
    assert usage_tuple(state) == (7253, 40960, 0, 2210, 0)
    assert state.request_model == "gpt-5.5"


def test_responses_input_tokens_is_free():
    state = replay_json(HOST, "/v1/responses/input_tokens", {"model": "gpt-5.5", "input": "hi"},
                        "openai_responses_input_tokens.json")
    assert (state.endpoint, state.billing, state.usage_status) == ("count_tokens", BILL_FREE, "exact")
    assert usage_tuple(state) == (1834, 0, 0, 0, -1)
    assert state.usage.raw == {"object": "response.input_tokens", "input_tokens": 1834}


# ---- cancelled streams, errors, routing -----------------------------------------------------


@pytest.mark.parametrize("label,chunks", list(chunkings(
    cut_before("openai_chat_stream_usage.sse", b'data: {"id":"chatcmpl-CxR7a2Lq9vTq","object":'
               b'"chat.completion.chunk","created":1795420800,"model":"gpt-5.4-2026-03-05",'
               b'"service_tier":"default","system_fingerprint":null,"choices":[],'))))
def test_chat_stream_cancelled_before_usage_is_unknown(label, chunks):
    state = replay_stream(HOST, "/v1/chat/completions", CHAT, chunks, complete=False)
    assert state.usage is None and state.usage_status == "unknown"
    assert state.response_model == "gpt-5.4-2026-03-05"


def test_chat_stream_cut_after_usage_but_before_done_is_partial():
    data = cut_before("openai_chat_stream_usage.sse", b"data: [DONE]")
    state = replay_stream(HOST, "/v1/chat/completions", CHAT, [data], complete=False)
    assert usage_tuple(state) == (86, 1920, 0, 300, 192)
    assert state.usage_status == "partial"


@pytest.mark.parametrize("label,chunks", list(chunkings(
    cut_before("openai_responses_stream.sse", b"event: response.completed")[:-40])))
def test_responses_stream_cancelled_is_unknown(label, chunks):
    state = replay_stream(HOST, "/v1/responses", RESPONSES, chunks, complete=False)
    assert state.usage is None and state.usage_status == "unknown"
    assert state.request_id == "resp_68f0a1b2c3"


def test_429_with_openai_error_json():
    state = replay_json(HOST, "/v1/chat/completions", CHAT, "openai_error_429.json", status=429)
    # type is "tokens"; the code says what happened.
    assert state.error_type == "rate_limit_exceeded"
    assert state.usage is None and state.usage_status == "none"


def test_500_without_json_is_an_api_error_not_unparsed():
    state, tap = replay(HOST, "/v1/responses", RESPONSES, transcript("openai_error_500.html"),
                        status=500, content_type="text/html")
    assert tap.parse_error is None
    assert (state.status, state.error_type, state.usage_status) == (500, "api_error", "none")


def test_500_with_a_json_content_type_but_html_body():
    state, tap = replay(HOST, "/v1/chat/completions", CHAT, transcript("openai_error_500.html"),
                        status=502, content_type="application/json")
    assert tap.parse_error is None and state.error_type == "api_error"


def test_unknown_model_is_recorded_as_sent():
    body = json.loads(transcript("openai_chat.json"))
    body["model"] = "gpt-9-preview-0001"
    state, _ = replay(HOST, "/v1/chat/completions", {"model": "gpt-9-preview"},
                      json.dumps(body).encode())
    assert (state.request_model, state.response_model) == ("gpt-9-preview", "gpt-9-preview-0001")
    assert state.usage_status == "exact"


def test_batch_submission_records_no_usage():
    state = replay_json(HOST, "/v1/batches", {"input_file_id": "file-9Kx2",
                                              "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"}, "openai_batch.json")
    assert (state.endpoint, state.billing, state.usage_status) == ("batch_create", BILL_NONE, "none")
    assert state.request_id == "batch_68f0abc" and state.usage is None


@pytest.mark.parametrize("method,target", [
    ("POST", "/v1/images/generations"), ("GET", "/v1/responses/resp_1"), ("GET", "/v1/models"),
    ("POST", "/v1/audio/transcriptions"), ("GET", "/v1/chat/completions"),
])
def test_other_openai_paths_fall_to_the_generic_adapter(method, target):
    adapter = adapter_for(HOST, method, target)
    assert adapter.name == "generic" and adapter.provider == "openai"


def test_query_string_does_not_change_routing():
    assert adapter_for(HOST, "POST", "/v1/responses?beta=true").name == "openai.responses"
    assert adapter_for(HOST, "POST", "/v1/chat/completions?x=1").name == "openai.chat"


# ---- the performance rule: parse only what can change the row --------------------------------


def counting_json(monkeypatch) -> list[str]:
    parsed: list[str] = []

    def loads(text, *args, **kwargs):
        parsed.append(text)
        return json.loads(text, *args, **kwargs)

    monkeypatch.setattr(openai_adapters, "json", SimpleNamespace(loads=loads))
    return parsed


def long_chat_stream(chunks: int) -> bytes:
    head = ('{"id":"chatcmpl-long","object":"chat.completion.chunk","created":1795420800,'
            '"model":"gpt-5.4-2026-03-05","service_tier":"default","system_fingerprint":null,'
            '"choices":[{"index":0,"delta":{"content":"tok%d "},"logprobs":null,'
            '"finish_reason":null}],"usage":null,"obfuscation":"Xy7"}')
    events = [f"data: {head % n}\n\n" for n in range(chunks)]
    usage = ('{"id":"chatcmpl-long","object":"chat.completion.chunk","created":1795420800,'
             '"model":"gpt-5.4-2026-03-05","choices":[],"usage":{"prompt_tokens":10,'
             f'"completion_tokens":{chunks},"total_tokens":{10 + chunks}}}}}')
    events += [f"data: {usage}\n\n", "data: [DONE]\n\n"]
    return "".join(events).encode()


def test_chat_stream_parses_only_the_first_and_the_usage_chunk(monkeypatch):
    parsed = counting_json(monkeypatch)
    data = long_chat_stream(2000)
    pieces = [data[i : i + 1400] for i in range(0, len(data), 1400)]
    state = replay_stream(HOST, "/v1/chat/completions", CHAT, pieces)
    assert usage_tuple(state) == (10, 0, 0, 2000, -1)
    assert len(parsed) == 2


def test_responses_stream_parses_only_created_and_terminal_events(monkeypatch):
    parsed = counting_json(monkeypatch)
    state = replay_stream(HOST, "/v1/responses", RESPONSES, [transcript("openai_responses_stream.sse")])
    assert state.usage_status == "exact"
    assert [json.loads(text)["type"] for text in parsed] == ["response.created", "response.completed"]


def test_gzip_stream_is_read_too():
    data = transcript("openai_chat_stream_usage.sse")
    state, tap = replay(HOST, "/v1/chat/completions", CHAT, data, gzip_response=True,
                        content_type="text/event-stream")
    assert tap.parse_error is None and usage_tuple(state) == (86, 1920, 0, 300, 192)
