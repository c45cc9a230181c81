"""Gemini API and Vertex AI Gemini adapters, driven by recorded transcripts through the tap."""

from __future__ import annotations

import json

import pytest

from halton_meter.adapters import adapter_for
from halton_meter.adapters.base import BILL_FREE, BILL_TOKENS, MAX_JSON_RESPONSE_BYTES
from halton_meter.adapters.gemini import (TAIL_BYTES, depth_after, extract_object, extract_string,
                                          tier_of, usage_from_metadata)
from halton_meter.http1 import Headers, RequestHead, ResponseHead
from tests.adapter_harness import chunkings, replay, transcript, usage_tuple

HOST = "generativelanguage.googleapis.com"
VERTEX_HOST = "us-central1-aiplatform.googleapis.com"
VERTEX_BASE = "/v1/projects/acme-prod/locations/us-central1/publishers/google/models"
REQUEST = {"contents": [{"role": "user", "parts": [{"text": "Hola"}]}],
           "generationConfig": {"thinkingConfig": {"thinkingBudget": 1024}}}
SSE = "text/event-stream"
JSON = "application/json; charset=UTF-8"


def replay_all(host: str, target: str, name: str, content_type: str, **options):
    """Replays every chunking of a transcript; yields (chunking, state), none unparsed."""
    data = transcript(name)
    for label, chunks in chunkings(data):
        state, tap = replay(host, target, REQUEST, chunks, content_type=content_type, **options)
        assert tap.parse_error is None, (label, tap.parse_error)
        yield label, state


def last_usage_metadata(name: str) -> dict:
    data = transcript(name)
    if name.endswith(".sse"):
        objects = [json.loads(line[len(b"data: "):]) for line in data.split(b"\r\n")
                   if line.startswith(b"data: ")]
    else:
        objects = json.loads(data)
        objects = objects if isinstance(objects, list) else [objects]
    return [o for o in objects if "usageMetadata" in o][-1]["usageMetadata"]


# ---- generateContent -------------------------------------------------------------------------


def test_generate_content_with_cache_thoughts_and_tool_use():
    for label, state in replay_all(HOST, "/v1beta/models/gemini-2.5-flash:generateContent",
                                   "gemini_generate.json", JSON):
        # input 9120 - 8192 cached + 45 tool use; output 212 candidates + 1337 thoughts.
        assert usage_tuple(state) == (973, 8192, 0, 1549, 1337), label
        assert state.usage_status == "exact"
        assert state.provider == "gemini"
        assert state.endpoint == "generate_content"
        assert state.billing == BILL_TOKENS
        assert state.request_model == "gemini-2.5-flash"
        assert state.response_model == "gemini-2.5-flash"
        assert state.request_id == "8PIqaZbqK_O-qtsPiMXJsAk"
        assert state.is_stream is False
        assert state.error_type is None
    assert state.usage.raw == json.loads(transcript("gemini_generate.json"))["usageMetadata"]


def test_generate_content_gzip():
    state, tap = replay(HOST, "/v1beta/models/gemini-2.5-flash:generateContent", REQUEST,
                        transcript("gemini_generate.json"), content_type=JSON, gzip_response=True)
    assert tap.parse_error is None
    assert usage_tuple(state) == (973, 8192, 0, 1549, 1337)
    assert state.usage_status == "exact"


@pytest.mark.parametrize("version", ["v1", "v1beta", "v1alpha"])
def test_api_versions(version):
    state, _ = replay(HOST, f"/{version}/models/gemini-2.5-flash:generateContent", REQUEST,
                      transcript("gemini_generate.json"), content_type=JSON)
    assert state.provider == "gemini"
    assert usage_tuple(state) == (973, 8192, 0, 1549, 1337)


def test_missing_usage_is_unknown_not_zero():
    body = json.dumps({"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"},
                                       "finishReason": "STOP"}],
                       "modelVersion": "gemini-2.5-flash", "responseId": "r1"}).encode()
    state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:generateContent", REQUEST, body,
                      content_type=JSON)
    assert state.usage is None
    assert state.usage_status == "unknown"
    assert state.request_id == "r1"


def test_unknown_model_is_recorded_as_given():
    body = json.dumps({"candidates": [], "usageMetadata": {"promptTokenCount": 5,
                       "candidatesTokenCount": 2, "totalTokenCount": 7},
                       "modelVersion": "models/gemini-9-ultra-exp-1231"}).encode()
    state, _ = replay(HOST, "/v1beta/models/gemini-9-ultra-exp:generateContent", REQUEST, body,
                      content_type=JSON)
    assert state.request_model == "gemini-9-ultra-exp"
    assert state.response_model == "gemini-9-ultra-exp-1231"  # the "models/" prefix dropped
    assert usage_tuple(state) == (5, 0, 0, 2, -1)


def test_tuned_model_keeps_its_collection():
    state, _ = replay(HOST, "/v1beta/tunedModels/sentiment-v3-x9k2p:generateContent", REQUEST,
                      transcript("gemini_generate.json"), content_type=JSON)
    assert state.request_model == "tunedModels/sentiment-v3-x9k2p"
    assert state.provider == "gemini"


def test_request_id_header_wins_over_response_id():
    state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:generateContent", REQUEST,
                      transcript("gemini_generate.json"), content_type=JSON,
                      response_headers={"x-request-id": "hdr-1"})
    assert state.request_id == "hdr-1"


def test_large_body_is_read_from_its_tail():
    # An image answer past the 2 MiB parse bound: usage comes from the kept tail.
    image = "iVBORw0KGgo" * 300_000
    body = json.dumps({"candidates": [{"content": {"parts": [
        {"inlineData": {"mimeType": "image/png", "data": image}}], "role": "model"},
        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 1290,
                          "totalTokenCount": 1302},
        "modelVersion": "gemini-2.5-flash-image", "responseId": "img-1"}, indent=2).encode()
    assert len(body) > MAX_JSON_RESPONSE_BYTES
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    state, tap = replay(HOST, "/v1beta/models/gemini-2.5-flash-image:generateContent", REQUEST,
                        chunks, content_type=JSON)
    assert tap.parse_error is None
    assert usage_tuple(state) == (12, 0, 0, 1290, -1)
    assert state.usage_status == "exact"
    assert state.response_model == "gemini-2.5-flash-image"
    assert state.request_id == "img-1"

    # Memory: the copy never exceeds the parse bound plus a chunk, and only the tail is kept.
    adapter = adapter_for(HOST, "POST", "/v1beta/models/gemini-2.5-flash-image:generateContent")
    head = RequestHead("POST", "/v1beta/models/gemini-2.5-flash-image:generateContent",
                       "HTTP/1.1", Headers([("Host", HOST)]))
    state = adapter.start(head, b"{}", True)
    adapter.response(state, ResponseHead("HTTP/1.1", 200, "OK",
                                         Headers([("Content-Type", JSON)]), b""))
    for chunk in chunks:
        adapter.feed(state, chunk)
        assert len(state.json_body) <= MAX_JSON_RESPONSE_BYTES + len(chunk)
    assert len(state.json_body) <= TAIL_BYTES


# ---- the inclusive-candidates guard and the arithmetic -----------------------------------------


@pytest.mark.parametrize("meta, expected", [
    # candidates exclude thoughts: total = prompt + candidates + thoughts
    ({"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 5,
      "totalTokenCount": 20}, (10, 0, 0, 10, 5)),
    # candidates already include thoughts: total = prompt + candidates (LiteLLM's guard)
    ({"promptTokenCount": 10, "candidatesTokenCount": 10, "thoughtsTokenCount": 5,
      "totalTokenCount": 20}, (10, 0, 0, 10, 5)),
    # the guard counts tool-use input, which total also includes
    ({"promptTokenCount": 10, "toolUsePromptTokenCount": 5, "candidatesTokenCount": 10,
      "thoughtsTokenCount": 5, "totalTokenCount": 25}, (15, 0, 0, 10, 5)),
    ({"promptTokenCount": 10, "toolUsePromptTokenCount": 5, "candidatesTokenCount": 10,
      "thoughtsTokenCount": 5, "totalTokenCount": 30}, (15, 0, 0, 15, 5)),
    # no total: thoughts are added
    ({"promptTokenCount": 10, "candidatesTokenCount": 10, "thoughtsTokenCount": 5},
     (10, 0, 0, 15, 5)),
    # cached is a subset of prompt
    ({"promptTokenCount": 5000, "cachedContentTokenCount": 4096, "candidatesTokenCount": 7,
      "totalTokenCount": 5007}, (904, 4096, 0, 7, -1)),
])
def test_usage_arithmetic(meta, expected):
    usage = usage_from_metadata(meta)
    reasoning = -1 if usage.reasoning_tokens is None else usage.reasoning_tokens
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
            usage.output_tokens, reasoning) == expected
    assert usage.raw is meta


def test_inclusive_candidates_through_the_adapter():
    body = json.dumps({"candidates": [], "usageMetadata": {
        "promptTokenCount": 900, "candidatesTokenCount": 240, "thoughtsTokenCount": 200,
        "totalTokenCount": 1140}}).encode()
    state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:generateContent", REQUEST, body,
                      content_type=JSON)
    assert usage_tuple(state) == (900, 0, 0, 240, 200)  # not 440


# ---- streaming: SSE --------------------------------------------------------------------------


def test_sse_stream_takes_the_last_running_total():
    name = "gemini_stream_running_totals.sse"
    for label, state in replay_all(
            HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", name, SSE):
        # last chunk: prompt 1250 (1024 cached), candidates 41, thoughts 388. A sum over the five
        # chunks would give input 1130, cache 5120, output 2043.
        assert usage_tuple(state) == (226, 1024, 0, 429, 388), label
        assert state.usage_status == "exact"
        assert state.is_stream is True
        assert state.response_model == "gemini-2.5-flash"
        assert state.request_id == "tWxQaOv5Iu6rqtsP7KaB0Ak"
    assert state.usage.raw == last_usage_metadata(name)


def test_sse_stream_of_the_reference_example():
    # providers.md §9: the last usageMetadata wins, input 900, output 40 + 200.
    for label, state in replay_all(
            HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            "gemini_stream.sse", SSE):
        assert usage_tuple(state) == (900, 0, 0, 240, 200), label
        assert state.usage_status == "exact"


def test_sse_stream_cancelled_is_partial_with_last_seen_usage():
    data = transcript("gemini_stream_running_totals.sse")
    frames = data.split(b"\r\n\r\n")
    cut = len(b"\r\n\r\n".join(frames[:3])) + 4 + 40  # three whole events and part of a fourth
    for label, chunks in chunkings(data[:cut], seeds=4):
        state, tap = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                            REQUEST, chunks, content_type=SSE, complete=False)
        assert tap.parse_error is None
        assert usage_tuple(state) == (226, 1024, 0, 409, 388), label  # 21 candidates + 388
        assert state.usage_status == "partial"


def test_sse_stream_cancelled_before_any_usage_is_unknown():
    state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                      REQUEST, [b'data: {"candidates": [{"content": {"parts": [{"text": "Ho'],
                      content_type=SSE, complete=False)
    assert state.usage is None
    assert state.usage_status == "unknown"


def test_function_call_arguments_cannot_pass_for_usage_or_errors():
    name = "gemini_stream_function_call.sse"
    for label, state in replay_all(
            HOST, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", name, SSE):
        # input 3021 + 310 tool use; output 18 + 77 thoughts. The args' 999999 are not usage.
        assert usage_tuple(state) == (3331, 0, 0, 95, 77), label
        assert state.error_type is None
        assert state.usage_status == "exact"
        assert state.request_id == "fc-resp-1"


def test_sse_mid_stream_error():
    data = (transcript("gemini_stream_running_totals.sse").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
            + b'data: {"error": {"code": 503, "message": "The model is overloaded.", '
              b'"status": "UNAVAILABLE"}}\r\n\r\n')
    for label, chunks in chunkings(data, seeds=4):
        state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                          REQUEST, chunks, content_type=SSE)
        assert state.error_type == "UNAVAILABLE", label
        assert state.status == 200
        assert usage_tuple(state) == (226, 1024, 0, 390, 388)
        assert state.usage_status == "partial"


# ---- streaming: JSON array (no alt=sse) ------------------------------------------------------


def test_json_array_stream_takes_the_last_running_total():
    name = "gemini_stream_array.json"
    for label, state in replay_all(
            HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent", name, JSON):
        assert usage_tuple(state) == (226, 1024, 0, 429, 388), label
        assert state.usage_status == "exact"
        assert state.is_stream is True
        assert state.response_model == "gemini-2.5-flash"
        assert state.request_id == "tWxQaOv5Iu6rqtsP7KaB0Ak"
    assert state.usage.raw == last_usage_metadata(name)


def test_json_array_stream_gzip():
    state, tap = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent", REQUEST,
                        transcript("gemini_stream_array.json"), content_type=JSON,
                        gzip_response=True)
    assert tap.parse_error is None
    assert usage_tuple(state) == (226, 1024, 0, 429, 388)
    assert state.usage_status == "exact"


def test_response_content_type_decides_the_stream_format():
    # alt=sse asked, but a JSON array came back: read as an array.
    state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                      REQUEST, transcript("gemini_stream_array.json"), content_type=JSON)
    assert usage_tuple(state) == (226, 1024, 0, 429, 388)
    # no alt=sse, but SSE came back: read as SSE.
    state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent", REQUEST,
                      transcript("gemini_stream_running_totals.sse"), content_type=SSE)
    assert usage_tuple(state) == (226, 1024, 0, 429, 388)
    assert state.usage_status == "exact"


def test_json_array_stream_cancelled_is_partial():
    data = transcript("gemini_stream_array.json")
    cut = data.index(b'"text": " plus')  # inside the fourth element
    for label, chunks in chunkings(data[:cut], seeds=4):
        state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                          REQUEST, chunks, content_type=JSON, complete=False)
        assert usage_tuple(state) == (226, 1024, 0, 409, 388), label
        assert state.usage_status == "partial"


def test_json_array_that_never_closes_is_partial_even_if_the_body_ended():
    data = transcript("gemini_stream_array.json")
    state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent", REQUEST,
                      data[:data.rindex(b"}")], content_type=JSON)
    assert usage_tuple(state) == (226, 1024, 0, 418, 388)  # the fourth element's totals
    assert state.usage_status == "partial"


def test_json_array_mid_stream_error():
    for label, state in replay_all(
            HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            "gemini_stream_array_error.json", JSON):
        assert state.error_type == "INTERNAL", label
        assert usage_tuple(state) == (640, 0, 0, 131, 120)
        assert state.usage_status == "partial"


# ---- errors ----------------------------------------------------------------------------------


def test_error_429_resource_exhausted():
    for label, state in replay_all(HOST, "/v1beta/models/gemini-2.5-pro:generateContent",
                                   "gemini_error_429.json", JSON, status=429):
        assert state.error_type == "RESOURCE_EXHAUSTED", label
        assert state.status == 429
        assert state.usage is None
        assert state.usage_status == "none"


def test_error_429_wrapped_in_a_list_on_a_stream_request():
    for label, state in replay_all(HOST, "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                                   "gemini_error_429_list.json", JSON, status=429):
        assert state.error_type == "RESOURCE_EXHAUSTED", label
        assert state.usage_status == "none"


def test_error_500_html_is_not_a_parse_failure():
    state, tap = replay(HOST, "/v1beta/models/gemini-2.5-pro:generateContent", REQUEST,
                        transcript("gemini_error_500.html"), status=500,
                        content_type="text/html; charset=UTF-8")
    assert tap.parse_error is None
    assert state.error_type == "api_error"
    assert state.usage_status == "none"


# ---- countTokens and embeddings ---------------------------------------------------------------


def test_count_tokens_is_free_input():
    for label, state in replay_all(HOST, "/v1beta/models/gemini-2.5-flash:countTokens",
                                   "gemini_count_tokens.json", JSON):
        assert state.endpoint == "count_tokens", label
        assert state.billing == BILL_FREE
        assert usage_tuple(state) == (4310, 0, 0, 0, -1)
        assert state.usage_status == "exact"
        assert state.request_model == "gemini-2.5-flash"
        assert state.usage.raw["totalTokens"] == 4310


@pytest.mark.parametrize("method, name, endpoint", [
    ("embedContent", "gemini_embed_content.json", "embed_content"),
    ("batchEmbedContents", "gemini_batch_embed_contents.json", "batch_embed_contents"),
])
def test_embeddings_have_no_usage(method, name, endpoint):
    state, tap = replay(HOST, f"/v1beta/models/gemini-embedding-001:{method}",
                        {"content": {"parts": [{"text": "x"}]}}, transcript(name),
                        content_type=JSON)
    assert tap.parse_error is None
    assert state.endpoint == endpoint
    assert state.billing == BILL_TOKENS
    assert state.request_model == "gemini-embedding-001"
    assert state.usage is None
    assert state.usage_status == "unknown"


def test_embeddings_usage_is_read_if_a_response_carries_it():
    body = json.dumps({"embeddings": [{"values": [0.1, -0.2]}],
                       "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}}).encode()
    state, _ = replay(HOST, "/v1beta/models/gemini-embedding-2:batchEmbedContents",
                      {"requests": []}, body, content_type=JSON)
    assert usage_tuple(state) == (8, 0, 0, 0, -1)
    assert state.usage_status == "exact"


# ---- routing and service tiers ---------------------------------------------------------------


@pytest.mark.parametrize("method, target", [
    ("GET", "/v1beta/models"),
    ("GET", "/v1beta/models/gemini-2.5-flash"),
    ("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent"),
    ("POST", "/v1beta/cachedContents"),
    ("POST", "/upload/v1beta/files"),
    ("POST", "/v2/models/gemini-2.5-flash:generateContent"),
])
def test_other_paths_are_not_read_by_the_gemini_adapter(method, target):
    assert adapter_for(HOST, method, target).name != "gemini"


def test_gemini_service_tier_header():
    state, _ = replay(HOST, "/v1beta/models/gemini-3-flash-preview:generateContent", REQUEST,
                      transcript("gemini_generate.json"), content_type=JSON,
                      response_headers={"x-gemini-service-tier": "flex"})
    assert state.service_tier == "flex"


@pytest.mark.parametrize("value, tier", [
    ("ON_DEMAND", None), ("ON_DEMAND_PRIORITY", "priority"), ("ON_DEMAND_FLEX", "flex"),
    ("PROVISIONED_THROUGHPUT", "provisioned_throughput"), ("standard", None),
    ("priority", "priority"), ("SOME_NEW_TIER", "some_new_tier"),
])
def test_tier_names(value, tier):
    assert tier_of(value) == tier


# ---- Vertex AI -------------------------------------------------------------------------------


def test_vertex_stream_with_count_free_chunks_and_priority_traffic():
    target = f"{VERTEX_BASE}/gemini-2.5-flash:streamGenerateContent?alt=sse"
    for label, state in replay_all(VERTEX_HOST, target, "vertex_gemini_stream.sse", SSE):
        assert state.provider == "vertex", label
        assert usage_tuple(state) == (812, 0, 0, 567, 503)
        assert state.service_tier == "priority"
        assert state.usage_status == "exact"
        assert state.request_model == "gemini-2.5-flash"
        assert state.request_id == "Wv0qaYKtBaSM2PgP8L6x4QU"


def test_vertex_stream_cancelled_before_counts_is_unknown():
    data = transcript("vertex_gemini_stream.sse")
    cut = data.index("crème".encode())  # only the first chunk (trafficType, no counts) arrived
    state, _ = replay(VERTEX_HOST, f"{VERTEX_BASE}/gemini-2.5-flash:streamGenerateContent?alt=sse",
                      REQUEST, data[:cut], content_type=SSE, complete=False)
    assert state.usage is None
    assert state.usage_status == "unknown"
    assert state.service_tier == "priority"


def test_vertex_generate_provisioned_throughput():
    for label, state in replay_all("aiplatform.googleapis.com",
                                   "/v1beta1/projects/p/locations/global/publishers/google/models/"
                                   "gemini-2.5-flash:generateContent",
                                   "vertex_gemini_generate.json", JSON):
        assert usage_tuple(state) == (4096, 16384, 0, 352, 256), label
        assert state.service_tier == "provisioned_throughput"
        assert state.provider == "vertex"


def test_vertex_express_mode_short_path_and_gzip():
    state, _ = replay("aiplatform.googleapis.com",
                      "/v1/publishers/google/models/gemini-2.5-flash:generateContent", REQUEST,
                      transcript("vertex_gemini_generate.json"), content_type=JSON,
                      gzip_response=True)
    assert state.provider == "vertex"
    assert usage_tuple(state) == (4096, 16384, 0, 352, 256)


def test_vertex_json_array_stream():
    elements = [json.loads(line[len(b"data: "):])
                for line in transcript("vertex_gemini_stream.sse").split(b"\r\n")
                if line.startswith(b"data: ")]
    data = ("[" + "\n,\r\n".join(json.dumps(e, indent=2, ensure_ascii=False)
                                 for e in elements) + "]").encode()
    for label, chunks in chunkings(data, seeds=4):
        state, _ = replay(VERTEX_HOST, f"{VERTEX_BASE}/gemini-2.5-flash:streamGenerateContent",
                          REQUEST, chunks, content_type=JSON)
        assert usage_tuple(state) == (812, 0, 0, 567, 503), label
        assert state.usage_status == "exact"


def test_vertex_count_tokens():
    state, _ = replay(VERTEX_HOST, f"{VERTEX_BASE}/gemini-2.5-pro:countTokens", REQUEST,
                      transcript("vertex_gemini_count_tokens.json"), content_type=JSON)
    assert state.billing == BILL_FREE
    assert usage_tuple(state) == (131, 0, 0, 0, -1)


def test_vertex_anthropic_is_not_read_as_gemini():
    target = ("/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
              "claude-sonnet-4-5@20250929:streamRawPredict")
    assert adapter_for("us-east5-aiplatform.googleapis.com", "POST", target).name != "vertex_gemini"


def test_vertex_error_429():
    state, _ = replay(VERTEX_HOST, f"{VERTEX_BASE}/gemini-2.5-pro:generateContent", REQUEST,
                      transcript("gemini_error_429.json"), content_type=JSON, status=429)
    assert state.error_type == "RESOURCE_EXHAUSTED"
    assert state.usage_status == "none"


def test_function_call_arguments_in_a_chunk_without_usage():
    first = transcript("gemini_stream_running_totals.sse").split(b"\r\n\r\n")[0]
    call = {"candidates": [{"content": {"parts": [{"functionCall": {"name": "log", "args": {
        "usageMetadata": {"promptTokenCount": 999999, "candidatesTokenCount": 999999}}}}],
        "role": "model"}, "index": 0}], "modelVersion": "gemini-2.5-flash"}
    data = first + b"\r\n\r\ndata: " + json.dumps(call).encode() + b"\r\n\r\n"
    state, _ = replay(HOST, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                      REQUEST, data, content_type=SSE)
    assert usage_tuple(state) == (226, 1024, 0, 390, 388)


# ---- cutting values out of chunk text --------------------------------------------------------


def test_extract_reads_only_keys_of_the_outermost_object():
    nested = ('{"candidates": [{"content": {"parts": [{"functionCall": {"args": '
              '{"usageMetadata": {"promptTokenCount": 9}, "modelVersion": "fake"}}}]}}]}')
    assert extract_object(nested, "usageMetadata") is None
    assert extract_string(nested, "modelVersion") is None
    top = ('{"candidates": [{"content": {"parts": [{"text": "\\"usageMetadata\\": {}"}]}}], '
           '"usageMetadata": {"promptTokenCount": 7}, "modelVersion": "gemini-2.5-flash", '
           '"responseId": "a\\"b} ]"}')
    assert extract_object(top, "usageMetadata") == {"promptTokenCount": 7}
    assert extract_string(top, "modelVersion") == "gemini-2.5-flash"
    assert extract_string(top, "responseId") == 'a"b} ]'
    wrapped = '{"response": {"usageMetadata": {"promptTokenCount": 3}}, "traceId": "t"}'
    assert extract_object(wrapped, "usageMetadata") is None
    assert extract_object(wrapped, "usageMetadata", max_depth=2) == {"promptTokenCount": 3}
    assert extract_string(wrapped, "traceId") == "t"


def test_extract_ignores_quoted_keys_and_cut_values():
    assert extract_object('{"text": "say \\"usageMetadata\\": {\\"x\\": 1}"}',
                          "usageMetadata") is None
    assert extract_object('{"usageMetadata": {"promptTokenCount": 1', "usageMetadata") is None
    # a key that only ends with the name: its "opening" quote is an escaped one
    assert extract_object('{"say \\"usageMetadata": {"x": 1}}', "usageMetadata") is None


@pytest.mark.parametrize("rest, depth", [
    ("}", 1), (', "a": "}}]]"}', 1), (', "a": "\\"}{"}', 1), ("}]}", 3), ('}, "b": {"c": 1}}', 2),
])
def test_depth_after(rest, depth):
    assert depth_after("xx" + rest, 2) == depth
