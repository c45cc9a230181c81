"""Anthropic and Anthropic-on-Vertex adapters on recorded transcripts, re-chunked every way."""

import json

import pytest

from halton_meter.adapters.base import BILL_FREE, BILL_NONE
from tests.adapter_harness import chunkings, replay, transcript, usage_tuple

HOST = "api.anthropic.com"
MESSAGES = {"model": "claude-opus-4-7", "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("label,chunks", list(chunkings(transcript("anthropic_stream.sse"), every_split=True)))
def test_stream_takes_cumulative_output_not_a_sum(label, chunks):
    state, tap = replay(HOST, "/v1/messages?beta=true", MESSAGES, chunks)
    assert tap.parse_error is None
    # message_start says output 1, message_delta 57: cumulative, so 57 (not 58).
    assert usage_tuple(state) == (20, 0, 2048, 57, -1)
    assert (state.usage.cache_write_5m_tokens, state.usage.cache_write_1h_tokens) == (0, 2048)
    assert state.usage_status == "exact"
    assert (state.endpoint, state.is_stream, state.request_model, state.response_model) == (
        "messages", True, "claude-opus-4-7", "claude-opus-4-7")
    assert state.request_id == "msg_02"


@pytest.mark.parametrize("label,chunks", list(chunkings(transcript("anthropic_thinking_stream.sse"))))
def test_thinking_web_search_and_null_delta_fields(label, chunks):
    state, _ = replay(HOST, "/v1/messages", MESSAGES, chunks,
                      response_headers={"request-id": "req_011"})
    usage = state.usage
    # Nulls in a delta keep the running value; thinking is inside output, never added.
    assert usage_tuple(state) == (1500, 40000, 3000, 812, 600)
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (1000, 2000)
    assert usage.billed_items == {"web_search_requests": 2}
    assert state.service_tier == "standard"
    assert state.request_id == "req_011"  # the header wins over the message id
    assert state.response_model == "claude-sonnet-4-5-20250929"
    assert usage.raw["output_tokens"] == 812


def test_cancelled_stream_is_partial_with_exact_input():
    data = transcript("anthropic_thinking_stream.sse")
    cut = data.index("Ответ".encode())  # after the first delta, before the final one
    state, _ = replay(HOST, "/v1/messages", MESSAGES, [data[:cut]], complete=False)
    assert state.usage_status == "partial"
    assert usage_tuple(state) == (1500, 40000, 3000, 120, -1)


def test_cancelled_before_message_start_is_unknown():
    state, _ = replay(HOST, "/v1/messages", MESSAGES, [b"event: message_st"], complete=False)
    assert state.usage is None and state.usage_status == "unknown"


def test_stream_without_message_stop_is_partial_even_if_the_body_ended():
    data = transcript("anthropic_stream.sse")
    state, _ = replay(HOST, "/v1/messages", MESSAGES, [data[: data.index(b"event: message_stop")]])
    assert state.usage_status == "partial" and state.usage.output_tokens == 57


def test_error_event_after_200():
    state, _ = replay(HOST, "/v1/messages", MESSAGES, transcript("anthropic_overloaded_stream.sse"))
    assert state.error_type == "overloaded_error"
    assert state.usage_status == "partial" and state.usage.input_tokens == 10


@pytest.mark.parametrize("gzip_response", [False, True])
def test_non_streaming_message(gzip_response):
    state, _ = replay(HOST, "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5},
                      transcript("anthropic_message.json"), gzip_response=gzip_response)
    assert usage_tuple(state) == (12, 4096, 0, 9, -1)
    assert state.usage_status == "exact" and not state.is_stream
    assert (state.request_model, state.response_model) == ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929")
    assert state.usage.raw["some_new_field"] == {"x": 1}  # unknown keys kept, never fatal


def test_cache_writes_without_split_are_five_minute_writes():
    body = {"id": "m", "model": "claude-haiku-4-5", "usage": {"input_tokens": 1, "output_tokens": 2,
                                                              "cache_creation_input_tokens": 700}}
    state, _ = replay(HOST, "/v1/messages", {"model": "claude-haiku-4-5"}, json.dumps(body).encode())
    assert (state.usage.cache_write_5m_tokens, state.usage.cache_write_1h_tokens) == (700, 0)


@pytest.mark.parametrize("status,body,expected", [
    (429, b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"},"request_id":"req_1"}',
     "rate_limit_error"),
    (529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', "overloaded_error"),
    (500, b"<html>upstream died</html>", "api_error"),
    (503, b"", "api_error"),
])
def test_error_bodies(status, body, expected):
    state, tap = replay(HOST, "/v1/messages", MESSAGES, body, status=status,
                        content_type="application/json" if body.startswith(b"{") else "text/html")
    assert tap.parse_error is None  # an HTML error page is still a clean provider error
    assert state.error_type == expected
    assert state.usage_status == "none"


def test_count_tokens_is_free_and_recorded():
    state, _ = replay(HOST, "/v1/messages/count_tokens?beta=true", {"model": "claude-opus-4-7"},
                      b'{"input_tokens": 2095}')
    assert (state.endpoint, state.billing, state.usage.input_tokens) == ("count_tokens", BILL_FREE, 2095)
    assert state.usage_status == "exact"


def test_legacy_complete_has_unknown_usage():
    body = b'{"type":"completion","id":"compl_1","completion":" Hi","stop_reason":"stop_sequence","model":"claude-2.1"}'
    state, _ = replay(HOST, "/v1/complete", {"model": "claude-2.1", "prompt": "\n\nHuman: hi\n\nAssistant:"}, body)
    assert state.usage is None and state.usage_status == "unknown"
    assert (state.endpoint, state.response_model) == ("complete", "claude-2.1")


def test_batch_submission_records_no_cost():
    request = {"requests": [{"custom_id": "a", "params": {"model": "claude-haiku-4-5", "max_tokens": 5,
                                                          "messages": []}}]}
    state, _ = replay(HOST, "/v1/messages/batches", request,
                      b'{"id":"msgbatch_01","type":"message_batch","processing_status":"in_progress"}')
    assert (state.endpoint, state.billing, state.usage_status) == ("batch_create", BILL_NONE, "none")
    assert (state.request_id, state.request_model) == ("msgbatch_01", "claude-haiku-4-5")


@pytest.mark.parametrize("label,chunks", list(chunkings(transcript("anthropic_batch_results.jsonl"))))
def test_batch_results_sum_succeeded_usage_at_batch_tier(label, chunks):
    state, _ = replay(HOST, "/v1/messages/batches/msgbatch_01/results", None, chunks, method="GET",
                      content_type="application/binary", response_headers={"request-id": "req_dl"})
    assert usage_tuple(state) == (350, 30, 0, 55, -1)
    assert (state.request_id, state.service_tier, state.response_model) == (
        "msgbatch_01", "batch", "claude-haiku-4-5-20251001")
    assert state.usage_status == "exact" and len(state.usage.raw) == 3


def test_large_request_body_still_yields_the_model():
    big = {"max_tokens": 5, "messages": [{"role": "user", "content": "x" * (3 << 20)}],
           "model": "claude-opus-4-7", "stream": True}
    state, _ = replay(HOST, "/v1/messages", big, [b"event: ping\ndata: {}\n\n"], complete=False)
    assert (state.request_model, state.is_stream) == ("claude-opus-4-7", True)


VERTEX = "us-east5-aiplatform.googleapis.com"


def test_vertex_anthropic_stream_takes_the_model_from_the_path():
    target = ("/v1/projects/p1/locations/us-east5/publishers/anthropic/models/"
              "claude-sonnet-4-5@20250929:streamRawPredict")
    state, _ = replay(VERTEX, target, {"anthropic_version": "vertex-2023-10-16", "stream": True},
                      transcript("anthropic_stream.sse"))
    assert state.provider == "vertex" and state.request_model == "claude-sonnet-4-5@20250929"
    assert usage_tuple(state) == (20, 0, 2048, 57, -1) and state.usage_status == "exact"


def test_vertex_anthropic_count_tokens_is_free():
    target = "/v1/projects/p1/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict"
    state, _ = replay(VERTEX, target, {"model": "claude-sonnet-4-5@20250929"}, b'{"input_tokens": 31}')
    assert (state.billing, state.usage.input_tokens, state.request_model) == (
        BILL_FREE, 31, "claude-sonnet-4-5@20250929")


def test_unmatched_provider_path_gets_the_hosts_generic_adapter():
    state, _ = replay(HOST, "/v1/models", None, b'{"data": []}', method="GET")
    assert (state.provider, state.endpoint, state.usage_status) == ("anthropic", None, "none")


def test_fast_speed_selects_the_premium_column():
    body = {"id": "m", "model": "claude-opus-4-6", "usage": {"input_tokens": 1000, "output_tokens": 1000,
                                                             "service_tier": "standard", "speed": "fast"}}
    state, _ = replay(HOST, "/v1/messages?beta=true", {"model": "claude-opus-4-6"}, json.dumps(body).encode())
    assert state.service_tier == "fast"  # priced from a `fast` column, else unpriced — never standard


def test_batch_results_keep_each_requests_prompt_size_for_tiers():
    state, _ = replay(HOST, "/v1/messages/batches/msgbatch_01/results", None,
                      transcript("anthropic_batch_results.jsonl"), method="GET", content_type="application/binary")
    assert state.usage.request_prompt_range == (60, 210)  # prompts incl. 10 cache-read tokens each
