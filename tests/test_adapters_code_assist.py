"""Code Assist (Gemini CLI's backend) adapter, driven by recorded transcripts through the tap."""

from __future__ import annotations

import json

import pytest

from halton_meter.adapters import adapter_for
from halton_meter.adapters.base import BILL_FREE, BILL_NONE, BILL_TOKENS
from halton_meter.adapters.code_assist import endpoint_name
from tests.adapter_harness import chunkings, replay, transcript, usage_tuple

HOST = "cloudcode-pa.googleapis.com"
SSE = "text/event-stream"
JSON = "application/json; charset=UTF-8"
GENERATE = {"model": "gemini-2.5-pro", "project": "example-project-123456",
            "user_prompt_id": "6f1c0e2b-5d1a-4c1e-9f7e-3b2a1d0c9e8f########1", "request": {
                "contents": [{"role": "user", "parts": [{"text": "Fix src/main.ts"}]}],
                "generationConfig": {"thinkingConfig": {"includeThoughts": True}},
                "session_id": "6f1c0e2b-5d1a-4c1e-9f7e-3b2a1d0c9e8f"}}


def test_stream_unwraps_responses_and_takes_the_last_running_total():
    data = transcript("code_assist_stream.sse")
    for label, chunks in chunkings(data):
        state, tap = replay(HOST, "/v1internal:streamGenerateContent?alt=sse", GENERATE, chunks,
                            content_type=SSE)
        assert tap.parse_error is None, label
        # prompt 15873 (12288 cached), candidates 37, thoughts 211; the three chunks summed would
        # be input 10755, cache 36864, output 693.
        assert usage_tuple(state) == (3585, 12288, 0, 248, 211), label
        assert state.usage_status == "exact"
        assert state.provider == "code_assist"
        assert state.endpoint == "generate_content"
        assert state.billing == BILL_TOKENS
        assert state.is_stream is True
        assert state.request_model == "gemini-2.5-pro"
        assert state.response_model == "gemini-2.5-pro"
        assert state.request_id == "4d7b1c2a9e0f3b65"  # the wrapper's traceId
    last = json.loads(data.split(b"\r\n\r\n")[-2][len(b"data: "):])
    assert state.usage.raw == last["response"]["usageMetadata"]


def test_stream_cancelled_is_partial():
    data = transcript("code_assist_stream.sse")
    cut = data.rindex(b"data: ") + 30
    for label, chunks in chunkings(data[:cut], seeds=4):
        state, _ = replay(HOST, "/v1internal:streamGenerateContent?alt=sse", GENERATE, chunks,
                          content_type=SSE, complete=False)
        assert usage_tuple(state) == (3585, 12288, 0, 230, 211), label  # 19 + 211
        assert state.usage_status == "partial"


def test_stream_as_json_array():
    elements = [json.loads(frame[len(b"data: "):])
                for frame in transcript("code_assist_stream.sse").split(b"\r\n\r\n") if frame]
    data = ("[" + "\n,\r\n".join(json.dumps(e, indent=2, ensure_ascii=False)
                                 for e in elements) + "]").encode()
    for label, chunks in chunkings(data, seeds=4):
        state, _ = replay(HOST, "/v1internal:streamGenerateContent", GENERATE, chunks,
                          content_type=JSON)
        assert usage_tuple(state) == (3585, 12288, 0, 248, 211), label
        assert state.usage_status == "exact"


def test_generate_content():
    data = transcript("code_assist_generate.json")
    for label, chunks in chunkings(data):
        state, _ = replay(HOST, "/v1internal:generateContent",
                          {**GENERATE, "model": "gemini-2.5-flash"}, chunks, content_type=JSON)
        assert usage_tuple(state) == (2210, 0, 0, 1167, 1024), label
        assert state.usage_status == "exact"
        assert state.request_model == "gemini-2.5-flash"
        assert state.response_model == "gemini-2.5-flash"
        assert state.request_id == "a1b2c3d4e5f60718"
        assert state.is_stream is False
    assert state.usage.raw == json.loads(data)["response"]["usageMetadata"]


def test_generate_content_gzip():
    state, tap = replay(HOST, "/v1internal:generateContent", GENERATE,
                        transcript("code_assist_generate.json"), content_type=JSON,
                        gzip_response=True)
    assert tap.parse_error is None
    assert usage_tuple(state) == (2210, 0, 0, 1167, 1024)


def test_count_tokens_model_comes_from_the_inner_request():
    # gemini-cli converter.ts: {request: {model: "models/…", contents}} and {totalTokens}.
    body = {"request": {"model": "models/gemini-2.5-pro",
                        "contents": [{"role": "user", "parts": [{"text": "x"}]}]}}
    state, _ = replay(HOST, "/v1internal:countTokens", body,
                      transcript("code_assist_count_tokens.json"), content_type=JSON)
    assert state.endpoint == "count_tokens"
    assert state.billing == BILL_FREE
    assert state.request_model == "gemini-2.5-pro"
    assert usage_tuple(state) == (15873, 0, 0, 0, -1)
    assert state.usage_status == "exact"


def test_missing_usage_is_unknown():
    body = json.dumps({"response": {"candidates": [], "modelVersion": "gemini-2.5-pro"},
                       "traceId": "t9"}).encode()
    state, _ = replay(HOST, "/v1internal:generateContent", GENERATE, body, content_type=JSON)
    assert state.usage is None
    assert state.usage_status == "unknown"
    assert state.request_id == "t9"


def test_unknown_model_is_recorded_as_given():
    state, _ = replay(HOST, "/v1internal:generateContent",
                      {**GENERATE, "model": "gemini-9-preview-internal"},
                      transcript("code_assist_generate.json"), content_type=JSON)
    assert state.request_model == "gemini-9-preview-internal"


@pytest.mark.parametrize("method, target, endpoint", [
    ("POST", "/v1internal:loadCodeAssist", "load_code_assist"),
    ("POST", "/v1internal:onboardUser", "onboard_user"),
    ("POST", "/v1internal:retrieveUserQuota", "retrieve_user_quota"),
    ("GET", "/v1internal/event:receive", "event_receive"),
])
def test_setup_calls_are_not_billable(method, target, endpoint):
    state, tap = replay(HOST, target, None if method == "GET" else {"metadata": {}},
                        transcript("code_assist_load.json"), method=method, content_type=JSON)
    assert tap.parse_error is None
    assert state.provider == "code_assist"
    assert state.endpoint == endpoint
    assert state.billing == BILL_NONE
    assert state.usage is None
    assert state.usage_status == "none"


def test_error_429():
    for label, chunks in chunkings(transcript("gemini_error_429.json"), seeds=4):
        state, _ = replay(HOST, "/v1internal:streamGenerateContent?alt=sse", GENERATE, chunks,
                          content_type=JSON, status=429)
        assert state.error_type == "RESOURCE_EXHAUSTED", label
        assert state.usage_status == "none"


def test_error_500_not_json():
    state, tap = replay(HOST, "/v1internal:generateContent", GENERATE,
                        transcript("gemini_error_500.html"), content_type="text/html", status=500)
    assert tap.parse_error is None
    assert state.error_type == "api_error"


def test_mid_stream_error():
    first = transcript("code_assist_stream.sse").split(b"\r\n\r\n")[0]
    data = (first + b"\r\n\r\n" + b'data: {"error": {"code": 429, "message": "Quota exceeded '
            b'for quota metric", "status": "RESOURCE_EXHAUSTED"}}\r\n\r\n')
    state, _ = replay(HOST, "/v1internal:streamGenerateContent?alt=sse", GENERATE, data,
                      content_type=SSE)
    assert state.error_type == "RESOURCE_EXHAUSTED"
    assert usage_tuple(state) == (3585, 12288, 0, 215, 211)
    assert state.usage_status == "partial"


def test_other_hosts_and_paths():
    assert adapter_for(HOST, "POST", "/v1internalx:generateContent").name != "code_assist"
    assert adapter_for(HOST, "POST", "/v1:generateContent").name != "code_assist"


@pytest.mark.parametrize("method, name", [
    ("listExperiments", "list_experiments"), ("event:receive", "event_receive"),
    ("getCodeAssistGlobalUserSetting", "get_code_assist_global_user_setting"),
])
def test_endpoint_names(method, name):
    assert endpoint_name(method) == name
