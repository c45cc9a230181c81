"""Bedrock adapters and the AWS event-stream decoder, replayed from byte transcripts.

The event-stream transcripts in tests/transcripts/bedrock_* are built by the small encoder below
(zlib.crc32, as the format specifies); `python -m tests.test_adapters_bedrock` rewrites them, and
a test checks the stored bytes still equal what the encoder builds. The encoder itself is checked
byte for byte against the official smithy event-stream test vectors.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import zlib

import pytest

from halton_meter.adapters import adapter_for
from halton_meter.adapters.base import USAGE_EXACT, USAGE_NONE, USAGE_PARTIAL, USAGE_UNKNOWN
from halton_meter.adapters.bedrock import (HOSTS, MAX_MESSAGE_BYTES, EventStreamDecoder, aws_error_code,
                                           parse_runtime_path)
from tests.adapter_harness import TRANSCRIPTS, chunkings, replay, transcript, usage_tuple

HOST = "bedrock-runtime.us-east-1.amazonaws.com"
EVENTSTREAM = "application/vnd.amazon.eventstream"
MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
MODEL_PATH = "us.anthropic.claude-sonnet-4-5-20250929-v1%3A0"  # botocore escapes the ':'
CONVERSE_REQUEST = {"messages": [{"role": "user", "content": [{"text": "Hi"}]}],
                    "inferenceConfig": {"maxTokens": 512}}
INVOKE_REQUEST = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 512,
                  "messages": [{"role": "user", "content": "Hi"}]}


# ---- a minimal encoder (the format: docs.aws.amazon.com/lexv2/latest/dg/event-stream-encoding) ----

BOOL_TRUE, BOOL_FALSE, BYTE, SHORT, INTEGER, LONG, BYTE_ARRAY, STRING, TIMESTAMP, UUID = range(10)


def encode_header(name: str, value_type: int, value: object = None) -> bytes:
    raw_name = name.encode()
    out = bytes([len(raw_name)]) + raw_name + bytes([value_type])
    if value_type in (BOOL_TRUE, BOOL_FALSE):
        return out
    if value_type in (BYTE_ARRAY, STRING):
        data = value.encode() if isinstance(value, str) else value
        return out + struct.pack(">H", len(data)) + data
    if value_type == UUID:
        return out + value
    size = {BYTE: 1, SHORT: 2, INTEGER: 4, LONG: 8, TIMESTAMP: 8}[value_type]
    return out + value.to_bytes(size, "big", signed=True)


def encode_message(headers: list[tuple] | dict[str, str], payload: bytes = b"") -> bytes:
    """One message; `headers` is a {name: string} dict or a list of (name, type[, value])."""
    items = [(name, STRING, value) for name, value in headers.items()] if isinstance(headers, dict) else headers
    block = b"".join(encode_header(*item) for item in items)
    prelude = struct.pack(">II", 16 + len(block) + len(payload), len(block))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + block + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(event_type: str, body: dict) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_message(headers, json.dumps(body, separators=(",", ":")).encode())


def exception(exception_type: str, message: str) -> bytes:
    headers = {":exception-type": exception_type, ":content-type": "application/json",
               ":message-type": "exception"}
    return encode_message(headers, json.dumps({"message": message}).encode())


def chunk(model_event: dict, padding: str = "") -> bytes:
    """An InvokeModelWithResponseStream `chunk`: a PayloadPart with the model's event in base64.
    Some payloads get a "p" padding field (reported by users, not in AWS's API reference); an
    unknown field must be ignored either way."""
    part = {"bytes": base64.b64encode(json.dumps(model_event).encode()).decode()}
    if padding:
        part["p"] = padding
    return event("chunk", part)


# ---- the transcripts ---------------------------------------------------------------------------

CONVERSE_USAGE_STREAM = {"inputTokens": 25, "outputTokens": 118, "totalTokens": 4239,
                         "cacheReadInputTokens": 4096, "cacheWriteInputTokens": 0}
INVOKE_START_USAGE = {"input_tokens": 20, "cache_creation_input_tokens": 2048, "cache_read_input_tokens": 0,
                      "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2048},
                      "output_tokens": 1}
INVOCATION_METRICS = {"inputTokenCount": 20, "outputTokenCount": 57, "invocationLatency": 1874,
                      "firstByteLatency": 412, "cacheReadInputTokenCount": 0, "cacheWriteInputTokenCount": 2048}


def converse_stream_head() -> list[bytes]:
    return [
        event("messageStart", {"role": "assistant", "p": "abcdefghijklmnopqrstu"}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hello"}, "p": "abcd"}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " there, how can I help?"}}),
    ]


def invoke_stream_messages() -> list[bytes]:
    return [
        chunk({"type": "message_start", "message": {
            "id": "msg_bdrk_01XyZ", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": INVOKE_START_USAGE}},
            padding="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"),
        chunk({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there."}}),
        chunk({"type": "content_block_stop", "index": 0}),
        chunk({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
               "usage": {"output_tokens": 57}}),
        chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": INVOCATION_METRICS}),
    ]


def build_transcripts() -> dict[str, bytes]:
    converse = {
        "output": {"message": {"role": "assistant", "content": [{"text": "Hi."}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 12, "outputTokens": 9, "totalTokens": 3021, "cacheReadInputTokens": 0,
                  "cacheWriteInputTokens": 3000,
                  "cacheDetails": [{"ttl": "1h", "inputTokens": 2000}, {"ttl": "5m", "inputTokens": 1000}]},
        "metrics": {"latencyMs": 812},
    }
    invoke = {
        "id": "msg_bdrk_01BwzJX6", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hi."}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4096,
                  "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                  "output_tokens": 9},
    }
    converse_stream = converse_stream_head() + [
        event("contentBlockStop", {"contentBlockIndex": 0}),
        event("messageStop", {"stopReason": "end_turn"}),
        event("metadata", {"usage": CONVERSE_USAGE_STREAM, "metrics": {"latencyMs": 1503},
                           "serviceTier": {"type": "default"}, "p": "abcdefghijklm"}),
    ]
    exception_stream = converse_stream_head() + [
        exception("throttlingException", "Too many tokens, please wait before trying again."),
    ]
    # Every defined header value type, before and after the ones the adapter reads: sizes must be
    # known to step over them.
    all_types = encode_message([
        ("bool true", BOOL_TRUE), ("bool false", BOOL_FALSE), ("byte", BYTE, -49), ("int16", SHORT, 42),
        (":event-type", STRING, "metadata"), ("int32", INTEGER, 40972), ("int64", LONG, 42424242),
        ("byte buf", BYTE_ARRAY, b"I'm a little teapot!"), (":message-type", STRING, "event"),
        ("timestamp", TIMESTAMP, 1795420800000), ("uuid", UUID, bytes(range(1, 17))),
        (":content-type", STRING, "application/json"),
    ], json.dumps({"usage": CONVERSE_USAGE_STREAM, "metrics": {"latencyMs": 1503}}).encode())
    return {
        "bedrock_converse.json": json.dumps(converse).encode(),
        "bedrock_converse_stream.eventstream": b"".join(converse_stream),
        "bedrock_converse_stream_exception.eventstream": b"".join(exception_stream),
        "bedrock_converse_stream_header_types.eventstream": b"".join(converse_stream_head()) + all_types,
        "bedrock_invoke.json": json.dumps(invoke).encode(),
        "bedrock_invoke_stream.eventstream": b"".join(invoke_stream_messages()),
    }


def test_stored_transcripts_are_what_the_encoder_builds():
    for name, data in build_transcripts().items():
        assert transcript(name) == data, f"{name} is stale: run python -m tests.test_adapters_bedrock"


# ---- the decoder ---------------------------------------------------------------------------------

# Official vectors of smithy-lang/smithy-typescript, packages/eventstream-codec/src/TestVectors.fixture.ts
# (the AWS SDKs' shared event-stream test suite), base64 of the encoded bytes.
VECTORS = {
    "all_headers": "AAAAzAAAAK8PrmTKCmV2ZW50LXR5cGUEAACgDAxjb250ZW50LXR5cGUHABBhcHBsaWNhdGlvbi9qc29uCmJvb2wgZmFsc2UB"
                   "CWJvb2wgdHJ1ZQAEYnl0ZQLPCGJ5dGUgYnVmBgAUSSdtIGEgbGl0dGxlIHRlYXBvdCEJdGltZXN0YW1wCAAAAAAAhF/tBWlu"
                   "dDE2AwAqBWludDY0BQAAAAACh1eyBHV1aWQJAQIDBAUGBwgJCgsMDQ4PEHsnZm9vJzonYmFyJ32rpfEM",
    "empty_message": "AAAAEAAAAAAFwkjrfZjI/w==",
    "payload_one_str_header": "AAAAPQAAACAH/YOWDGNvbnRlbnQtdHlwZQcAEGFwcGxpY2F0aW9uL2pzb257J2Zvbyc6J2Jhcid9jZwIsQ==",
    "corrupted_header_len": "AAAAPQAAACEH/YOWDGNvbnRlbnQtdHlwZQcAEGFwcGxpY2F0aW9uL2pzb257J2Zvbyc6J2Jhcid9jZwIsQ==",
    "corrupted_headers": "AAAAPQAAACAH/YOWDGNvbnRlbnQtdHlwZQcAEGFwcGxpY2F0aW9uL2pzb257YWZvbyc6J2Jhcid9jZwIsQ==",
    "corrupted_length": "AAAAPgAAACAH/YOWDGNvbnRlbnQtdHlwZQcAEGFwcGxpY2F0aW9uL2pzb257J2Zvbyc6J2Jhcid9jZwIsQ==",
    "corrupted_payload": "AAAAHQAAAAD9UoxaWydmb28nOidiYXInfcNlOTY=",
}


def test_decoder_reads_the_official_vectors_with_every_header_type():
    [message] = EventStreamDecoder().feed(base64.b64decode(VECTORS["all_headers"]))
    assert message.headers == {
        "event-type": 40972, "content-type": "application/json", "bool false": False, "bool true": True,
        "byte": -49, "byte buf": b"I'm a little teapot!", "timestamp": 8675309, "int16": 42,
        "int64": 42424242, "uuid": bytes(range(1, 17)),
    }
    assert message.payload == b"{'foo':'bar'}"
    [empty] = EventStreamDecoder().feed(base64.b64decode(VECTORS["empty_message"]))
    assert (empty.headers, empty.payload) == ({}, b"")


@pytest.mark.parametrize("name", ["corrupted_header_len", "corrupted_headers", "corrupted_length",
                                  "corrupted_payload"])
def test_decoder_rejects_the_official_corrupted_vectors(name):
    with pytest.raises(ValueError, match="CRC"):
        EventStreamDecoder().feed(base64.b64decode(VECTORS[name]))


def test_encoder_matches_an_official_vector_byte_for_byte():
    built = encode_message({"content-type": "application/json"}, b"{'foo':'bar'}")
    assert built == base64.b64decode(VECTORS["payload_one_str_header"])


def test_decoder_is_incremental_at_every_split():
    data = transcript("bedrock_converse_stream.eventstream")
    expected = [m.headers[":event-type"] for m in EventStreamDecoder().feed(data)]
    assert expected == ["messageStart", "contentBlockDelta", "contentBlockDelta", "contentBlockStop",
                        "messageStop", "metadata"]
    for label, pieces in chunkings(data, every_split=True):
        decoder = EventStreamDecoder()
        seen = [m.headers[":event-type"] for piece in pieces for m in decoder.feed(piece)]
        assert seen == expected, label
        assert decoder.buffered == 0, label


def test_decoder_refuses_an_oversized_message_from_its_prelude_alone():
    total = MAX_MESSAGE_BYTES + 1
    prelude = struct.pack(">II", total, 0)
    prelude += struct.pack(">I", zlib.crc32(prelude))
    decoder = EventStreamDecoder()
    with pytest.raises(ValueError, match="limit"):
        decoder.feed(prelude)  # raised before any of the 16 MiB is buffered
    assert decoder.buffered == 12
    small = EventStreamDecoder(max_message_bytes=64)
    with pytest.raises(ValueError, match="limit"):
        small.feed(event("metadata", {"usage": CONVERSE_USAGE_STREAM}))


def test_decoder_refuses_impossible_lengths_and_undefined_header_types():
    prelude = struct.pack(">II", 15, 0)
    with pytest.raises(ValueError, match="impossible"):
        EventStreamDecoder().feed(prelude + struct.pack(">I", zlib.crc32(prelude)))
    block = b"\x01x\x0a"  # header "x" of value type 10, which the format does not define
    head = struct.pack(">II", 16 + len(block), len(block))
    head += struct.pack(">I", zlib.crc32(head))
    undefined_type = head + block + struct.pack(">I", zlib.crc32(head + block))
    with pytest.raises(ValueError, match="type 10"):
        EventStreamDecoder().feed(undefined_type)


def test_decoder_keeps_only_the_unfinished_message():
    data = transcript("bedrock_invoke_stream.eventstream")
    decoder = EventStreamDecoder()
    largest = 0
    for start in range(0, len(data), 100):
        decoder.feed(data[start : start + 100])
        largest = max(largest, decoder.buffered)
    biggest_message = max(len(m) for m in invoke_stream_messages())
    assert largest < biggest_message + 100


# ---- routing ---------------------------------------------------------------------------------------


def test_routing_and_model_from_the_path():
    assert all(host.startswith("bedrock-runtime.") for host in HOSTS)
    assert adapter_for(HOST, "POST", f"/model/{MODEL_PATH}/converse").name == "bedrock_converse"
    assert adapter_for(HOST, "POST", f"/model/{MODEL_PATH}/converse-stream").name == "bedrock_converse"
    assert adapter_for(HOST, "POST", f"/model/{MODEL_PATH}/invoke").name == "bedrock_invoke"
    assert adapter_for(HOST, "POST", f"/model/{MODEL_PATH}/invoke-with-response-stream").name == "bedrock_invoke"
    assert adapter_for(HOST, "POST", f"/model/{MODEL_PATH}/count-tokens").provider == "bedrock"
    assert adapter_for(HOST, "POST", f"/model/{MODEL_PATH}/count-tokens").name == "generic"
    assert parse_runtime_path(f"/model/{MODEL_PATH}/converse") == (MODEL, "converse")
    profile = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/" + MODEL
    escaped = profile.replace(":", "%3A").replace("/", "%2F")
    assert parse_runtime_path(f"/model/{escaped}/converse-stream") == (MODEL, "converse-stream")
    assert parse_runtime_path(f"/model/{profile}/invoke") == (MODEL, "invoke")  # "/" left unescaped
    opaque = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5"
    assert parse_runtime_path("/model/" + opaque.replace(":", "%3A").replace("/", "%2F") + "/invoke") == (
        opaque, "invoke")
    assert aws_error_code("ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/") == (
        "ThrottlingException")
    assert aws_error_code("aws.protocoltests#ValidationException") == "ValidationException"


# ---- Converse --------------------------------------------------------------------------------------


def test_converse_whole_response_with_ttl_split():
    data = transcript("bedrock_converse.json")
    for label, pieces in chunkings(data):
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/converse", CONVERSE_REQUEST, pieces,
                            response_headers={"x-amzn-RequestId": "3f1a2b4c-0000-4d5e-9f60-7a8b9c0d1e2f"})
        assert tap.parse_error is None, label
        assert (state.provider, state.endpoint, state.is_stream) == ("bedrock", "converse", False)
        assert state.request_model == MODEL and state.response_model is None
        assert state.request_id == "3f1a2b4c-0000-4d5e-9f60-7a8b9c0d1e2f"
        assert usage_tuple(state) == (12, 0, 3000, 9, -1), label
        assert (state.usage.cache_write_5m_tokens, state.usage.cache_write_1h_tokens) == (1000, 2000)
        assert state.usage_status == USAGE_EXACT


def test_converse_writes_without_details_are_five_minute_writes():
    body = json.loads(transcript("bedrock_converse.json"))
    del body["usage"]["cacheDetails"]
    state, _ = replay(HOST, f"/model/{MODEL_PATH}/converse", CONVERSE_REQUEST, json.dumps(body).encode())
    assert (state.usage.cache_write_5m_tokens, state.usage.cache_write_1h_tokens) == (3000, 0)
    assert state.usage.prompt_tokens == 3012


def test_converse_stream():
    data = transcript("bedrock_converse_stream.eventstream")
    for label, pieces in chunkings(data):
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/converse-stream", CONVERSE_REQUEST, pieces,
                            content_type=EVENTSTREAM, response_headers={"x-amzn-RequestId": "req-stream-1"})
        assert tap.parse_error is None, label
        assert state.is_stream and state.endpoint == "converse"
        assert state.request_model == MODEL and state.response_model is None
        assert state.request_id == "req-stream-1"
        assert usage_tuple(state) == (25, 4096, 0, 118, -1), label
        assert state.usage.raw == CONVERSE_USAGE_STREAM
        assert state.service_tier == "default"
        assert state.usage_status == USAGE_EXACT and state.error_type is None


def test_converse_stream_cancelled_before_metadata_is_unknown():
    data = transcript("bedrock_converse_stream.eventstream")
    cut = data[: len(data) - 40]  # inside the metadata message
    for label, pieces in chunkings(cut, seeds=4):
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/converse-stream", CONVERSE_REQUEST, pieces,
                            content_type=EVENTSTREAM, complete=False)
        assert tap.parse_error is None, label
        assert state.usage is None and state.usage_status == USAGE_UNKNOWN, label


def test_converse_stream_exception_event():
    data = transcript("bedrock_converse_stream_exception.eventstream")
    for label, pieces in chunkings(data):
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/converse-stream", CONVERSE_REQUEST, pieces,
                            content_type=EVENTSTREAM)
        assert tap.parse_error is None, label
        assert state.status == 200 and state.error_type == "throttlingException", label
        assert state.usage is None and state.usage_status == USAGE_UNKNOWN


def test_header_types_the_adapter_does_not_read_are_stepped_over():
    data = transcript("bedrock_converse_stream_header_types.eventstream")
    for label, pieces in chunkings(data):
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/converse-stream", CONVERSE_REQUEST, pieces,
                            content_type=EVENTSTREAM)
        assert tap.parse_error is None, label
        assert usage_tuple(state) == (25, 4096, 0, 118, -1), label
        assert state.usage_status == USAGE_EXACT


def test_corrupted_crc_marks_the_call_unparsed_and_stops_reading():
    data = bytearray(transcript("bedrock_converse_stream.eventstream"))
    data[-60] ^= 0x20  # one bit inside the metadata payload
    for label, pieces in chunkings(bytes(data), seeds=4):
        # replay returning at all means no error escaped the tap into the relay.
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/converse-stream", CONVERSE_REQUEST, pieces,
                            content_type=EVENTSTREAM)
        assert tap.parse_error is not None and "CRC mismatch" in tap.parse_error, label
        # The row keeps what was known before the damage; later bytes were not parsed.
        assert (state.status, state.request_model) == (200, MODEL)
        assert state.usage is None


def test_http_429_throttling_exception():
    body = json.dumps({"message": "Too many requests, please wait before trying again."}).encode()
    headers = {"x-amzn-RequestId": "req-429",
               "x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    for target in (f"/model/{MODEL_PATH}/converse-stream", f"/model/{MODEL_PATH}/invoke"):
        state, tap = replay(HOST, target, CONVERSE_REQUEST, body, status=429, content_type="application/json",
                            response_headers=headers)
        assert tap.parse_error is None
        assert (state.status, state.error_type, state.request_id) == (429, "ThrottlingException", "req-429")
        assert state.usage is None and state.usage_status == USAGE_NONE


def test_http_error_without_the_type_header_falls_back_to_the_status():
    body = json.dumps({"message": "The system encountered an unexpected error during processing."}).encode()
    state, _ = replay(HOST, f"/model/{MODEL_PATH}/converse", CONVERSE_REQUEST, body, status=500)
    assert state.error_type == "api_error"


# ---- InvokeModel ----------------------------------------------------------------------------------

INVOKE_HEADERS = {"x-amzn-RequestId": "req-invoke-1", "X-Amzn-Bedrock-Invocation-Latency": "926",
                  "X-Amzn-Bedrock-Input-Token-Count": "12", "X-Amzn-Bedrock-Output-Token-Count": "9",
                  "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": "4096",
                  "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": "0"}


def test_invoke_with_an_anthropic_body():
    data = transcript("bedrock_invoke.json")
    for label, pieces in chunkings(data):
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/invoke", INVOKE_REQUEST, pieces,
                            response_headers=INVOKE_HEADERS)
        assert tap.parse_error is None, label
        assert (state.endpoint, state.is_stream) == ("invoke", False)
        assert state.request_model == MODEL and state.response_model == "claude-sonnet-4-5-20250929"
        assert state.request_id == "req-invoke-1"
        assert usage_tuple(state) == (12, 4096, 0, 9, -1), label
        assert state.usage_status == USAGE_EXACT


def test_invoke_headers_have_the_last_word_and_serve_other_model_families():
    data = transcript("bedrock_invoke.json")
    state, _ = replay(HOST, f"/model/{MODEL_PATH}/invoke", INVOKE_REQUEST, data,
                      response_headers={**INVOKE_HEADERS, "X-Amzn-Bedrock-Output-Token-Count": "11"})
    assert usage_tuple(state) == (12, 4096, 0, 11, -1)
    llama = json.dumps({"generation": "Hi.", "prompt_token_count": 10, "generation_token_count": 5,
                        "stop_reason": "stop"}).encode()
    headers = {"X-Amzn-Bedrock-Input-Token-Count": "10", "X-Amzn-Bedrock-Output-Token-Count": "5"}
    state, _ = replay(HOST, "/model/meta.llama3-1-8b-instruct-v1%3A0/invoke", {"prompt": "Hi"}, llama,
                      response_headers=headers)
    assert state.request_model == "meta.llama3-1-8b-instruct-v1:0" and state.response_model is None
    assert usage_tuple(state) == (10, 0, 0, 5, -1) and state.usage_status == USAGE_EXACT
    state, _ = replay(HOST, "/model/meta.llama3-1-8b-instruct-v1%3A0/invoke", {"prompt": "Hi"}, llama)
    assert state.usage is None and state.usage_status == USAGE_UNKNOWN


def test_invoke_with_response_stream():
    data = transcript("bedrock_invoke_stream.eventstream")
    for label, pieces in chunkings(data):
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/invoke-with-response-stream", INVOKE_REQUEST, pieces,
                            content_type=EVENTSTREAM, response_headers={"x-amzn-RequestId": "req-invoke-2"})
        assert tap.parse_error is None, label
        assert (state.endpoint, state.is_stream) == ("invoke", True)
        assert state.request_model == MODEL and state.response_model == "claude-sonnet-4-5-20250929"
        assert state.request_id == "req-invoke-2"
        assert usage_tuple(state) == (20, 0, 2048, 57, -1), label
        assert (state.usage.cache_write_5m_tokens, state.usage.cache_write_1h_tokens) == (0, 2048)
        assert state.usage.raw["amazon-bedrock-invocationMetrics"] == INVOCATION_METRICS
        assert state.usage_status == USAGE_EXACT and state.error_type is None


def test_invocation_metrics_are_the_final_word():
    messages = invoke_stream_messages()
    metrics = {**INVOCATION_METRICS, "outputTokenCount": 60, "cacheWriteInputTokenCount": 3000}
    messages[-1] = chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics})
    state, _ = replay(HOST, f"/model/{MODEL_PATH}/invoke-with-response-stream", INVOKE_REQUEST,
                      b"".join(messages), content_type=EVENTSTREAM)
    assert usage_tuple(state) == (20, 0, 3000, 60, -1)
    # The model's 1-hour share is kept; the rest of Bedrock's write count is 5-minute writes.
    assert (state.usage.cache_write_5m_tokens, state.usage.cache_write_1h_tokens) == (952, 2048)


def test_invoke_stream_cancelled_mid_message_is_partial():
    messages = invoke_stream_messages()
    before_delta = sum(len(m) for m in messages[:5])
    cut = b"".join(messages)[: before_delta + len(messages[5]) // 2]  # inside message_delta
    for label, pieces in chunkings(cut):
        state, tap = replay(HOST, f"/model/{MODEL_PATH}/invoke-with-response-stream", INVOKE_REQUEST, pieces,
                            content_type=EVENTSTREAM, complete=False)
        assert tap.parse_error is None, label
        assert state.response_model == "claude-sonnet-4-5-20250929"
        # Input and cache counts are exact from message_start; output is a lower bound.
        assert usage_tuple(state) == (20, 0, 2048, 1, -1), label
        assert state.usage_status == USAGE_PARTIAL


def test_invoke_stream_exception_after_message_start_is_partial():
    messages = invoke_stream_messages()[:3] + [exception("modelStreamErrorException", "Model stream error.")]
    state, tap = replay(HOST, f"/model/{MODEL_PATH}/invoke-with-response-stream", INVOKE_REQUEST,
                        b"".join(messages), content_type=EVENTSTREAM)
    assert tap.parse_error is None
    assert state.error_type == "modelStreamErrorException"
    assert usage_tuple(state) == (20, 0, 2048, 1, -1) and state.usage_status == USAGE_PARTIAL


if __name__ == "__main__":
    for name, content in build_transcripts().items():
        (TRANSCRIPTS / name).write_bytes(content)
        print(f"wrote {name} ({len(content)} bytes)", file=sys.stderr)
