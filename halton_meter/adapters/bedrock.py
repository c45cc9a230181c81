"""Amazon Bedrock runtime: the AWS event-stream decoder and the Converse / InvokeModel adapters.

Bedrock streams are `application/vnd.amazon.eventstream`: binary, length-prefixed, CRC-checked
messages (docs.aws.amazon.com/lexv2/latest/dg/event-stream-encoding.html; the same framing as
botocore/eventstream.py). The model is in the URL; usage is Converse `TokenUsage`, an Anthropic
Messages body, or Bedrock's own `amazon-bedrock-invocationMetrics` / `x-amzn-bedrock-*` counts.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from dataclasses import dataclass
from urllib.parse import unquote

from halton_meter.adapters.anthropic import merge_delta_usage, usage_from_anthropic
from halton_meter.adapters.base import (BILL_TOKENS, Adapter, CallState, Usage, as_int, get_path,
                                        split_target)
from halton_meter.http1 import RequestHead, ResponseHead

# AWS regions where Bedrock runtime answers at "bedrock-runtime.{region}.amazonaws.com".
REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "us-gov-east-1", "us-gov-west-1",
    "ca-central-1", "sa-east-1", "eu-central-1", "eu-central-2", "eu-west-1", "eu-west-2",
    "eu-west-3", "eu-north-1", "eu-south-1", "eu-south-2", "ap-northeast-1", "ap-northeast-2",
    "ap-northeast-3", "ap-south-1", "ap-south-2", "ap-southeast-1", "ap-southeast-2",
    "ap-southeast-3", "ap-southeast-4", "ap-southeast-5", "ap-southeast-7", "me-central-1",
    "me-south-1", "il-central-1", "af-south-1", "mx-central-1",
    # Listed with bedrock-runtime in docs.aws.amazon.com/bedrock/latest/userguide/
    # endpoints-region-availability (Calgary, Taipei, New Zealand).
    "ca-west-1", "ap-east-2", "ap-southeast-6",
)
HOSTS = tuple(f"bedrock-runtime.{region}.amazonaws.com" for region in REGIONS)

# botocore refuses payloads over 16 MiB (_MAX_PAYLOAD_LENGTH); no Bedrock event comes close.
MAX_MESSAGE_BYTES = 16 << 20

_PRELUDE = struct.Struct(">III")  # total length, headers length, prelude CRC
_U32 = struct.Struct(">I")
_PRELUDE_BYTES = 12
_OVERHEAD_BYTES = 16  # prelude + message CRC: an empty message
# Header value types and their fixed sizes (botocore EventStreamHeaderParser._HEADER_TYPE_MAP):
# 0 true, 1 false (no bytes), 2 byte, 3 short, 4 integer, 5 long, 8 timestamp (ms, int64),
# 9 uuid (16 bytes); 6 byte array and 7 string carry a u16 length.
_FIXED_SIZES = {2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


# ---- the event-stream decoder -------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class EventMessage:
    """One decoded message: headers by name (str, bytes, int or bool) and the raw payload."""

    headers: dict[str, object]
    payload: bytes


class EventStreamDecoder:
    """Sans-IO decoder: `feed(bytes)` returns the messages completed by those bytes.

    Holds at most one unfinished message. A bad CRC, an impossible length or a message over
    `max_message_bytes` raises ValueError (the tap then marks the call unparsed); the prelude is
    checked before its message is buffered, so a corrupt length never makes the decoder wait
    for, or keep, gigabytes.
    """

    __slots__ = ("_buffer", "_pending", "max_message_bytes")

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._pending = 0  # total length of the message whose prelude was already checked
        self.max_message_bytes = max_message_bytes

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished message (non-zero at the end: the stream was cut)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[EventMessage]:
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        if size < self._pending or size < _PRELUDE_BYTES:
            return []  # the common case on a slow stream: nothing completed yet
        messages: list[EventMessage] = []
        start = 0
        with memoryview(buffer) as view:
            while True:
                total = self._pending
                if not total:
                    if size - start < _PRELUDE_BYTES:
                        break
                    total = self._pending = self._check_prelude(view, start)
                if size - start < total:
                    break
                messages.append(_decode_message(view, start, total))
                self._pending = 0
                start += total
        if start:
            del buffer[:start]
        return messages

    def _check_prelude(self, view: memoryview, start: int) -> int:
        total, headers_length, prelude_crc = _PRELUDE.unpack_from(view, start)
        if zlib.crc32(view[start : start + 8]) != prelude_crc:
            raise ValueError("event stream prelude CRC mismatch")
        if total < _OVERHEAD_BYTES or headers_length > total - _OVERHEAD_BYTES:
            raise ValueError(
                f"event stream lengths are impossible (total {total}, headers {headers_length})")
        if total > self.max_message_bytes:
            raise ValueError(f"event stream message of {total} bytes is over the "
                             f"{self.max_message_bytes}-byte limit")
        return total


def _decode_message(view: memoryview, start: int, total: int) -> EventMessage:
    end = start + total
    (headers_length,) = _U32.unpack_from(view, start + 4)
    (message_crc,) = _U32.unpack_from(view, end - 4)
    if zlib.crc32(view[start : end - 4]) != message_crc:
        raise ValueError("event stream message CRC mismatch")
    headers_end = start + _PRELUDE_BYTES + headers_length
    headers = parse_headers(bytes(view[start + _PRELUDE_BYTES : headers_end]))
    return EventMessage(headers, bytes(view[headers_end : end - 4]))


def parse_headers(data: bytes) -> dict[str, object]:
    """The header block of one message. Every defined value type is read (or sized) so that
    the headers after it are found; an undefined type cannot be sized and raises."""
    headers: dict[str, object] = {}
    end = len(data)
    pos = 0
    while pos < end:
        name_end = pos + 1 + data[pos]
        if name_end >= end:
            raise ValueError("event stream header is cut short")
        name = data[pos + 1 : name_end].decode("utf-8")
        value_type = data[name_end]
        pos = name_end + 1
        value: object
        if value_type == 7 or value_type == 6:
            if pos + 2 > end:
                raise ValueError("event stream header is cut short")
            length = (data[pos] << 8) | data[pos + 1]
            raw = data[pos + 2 : pos + 2 + length]
            pos += 2 + length
            value = raw.decode("utf-8") if value_type == 7 else raw
        elif value_type <= 1:
            value = value_type == 0
        elif value_type in _FIXED_SIZES:
            size = _FIXED_SIZES[value_type]
            raw = data[pos : pos + size]
            pos += size
            value = raw if value_type == 9 else int.from_bytes(raw, "big", signed=True)
        else:
            raise ValueError(f"event stream header type {value_type} is not defined")
        if pos > end:
            raise ValueError("event stream header runs past its block")
        if name in headers:
            raise ValueError("event stream header appears twice")  # the spec allows one of each
        headers[name] = value
    return headers


# ---- paths, models and errors ---------------------------------------------------------------

# `.+` and not `[^/]+`: a client that does not escape the "/" inside an ARN model id still matches.
_RUNTIME_PATH = re.compile(r"^/model/(?P<model>.+)/(?P<operation>converse|converse-stream"
                           r"|invoke|invoke-with-response-stream)$")
# Public model ids hide in these ARNs; application profiles and provisioned models stay opaque.
_PUBLIC_MODEL_ARN = re.compile(
    r"^arn:aws[a-z-]*:bedrock:[^:]*:[^:]*:(?:foundation-model|inference-profile)/(.+)$")


def parse_runtime_path(path: str) -> tuple[str, str] | None:
    """(model id, operation) of a Bedrock runtime path, or None."""
    found = _RUNTIME_PATH.match(path)
    if found is None:
        return None
    model = unquote(found["model"])
    arn = _PUBLIC_MODEL_ARN.match(model)
    return (arn[1] if arn else model), found["operation"]


def aws_error_code(value: str) -> str:
    """'ThrottlingException' from 'ThrottlingException:http://internal…' or 'aws.x#Name'.

    The restJson1 rule every AWS SDK applies to `x-amzn-ErrorType` (smithy-rs
    `sanitize_error_code`): drop a ':'-suffix, then a '#'-prefix.
    """
    value = value.split(":", 1)[0]
    return value.rsplit("#", 1)[-1].strip()[:100]


_HEADER_COUNTS = (
    ("x-amzn-bedrock-input-token-count", "inputTokenCount"),
    ("x-amzn-bedrock-output-token-count", "outputTokenCount"),
    ("x-amzn-bedrock-cache-read-input-token-count", "cacheReadInputTokenCount"),
    ("x-amzn-bedrock-cache-write-input-token-count", "cacheWriteInputTokenCount"),
)


def header_counts(head: ResponseHead) -> dict[str, int]:
    """InvokeModel's token-count headers, keyed as in `amazon-bedrock-invocationMetrics`."""
    counts = {}
    for header, key in _HEADER_COUNTS:
        value = (head.headers.get(header) or "").strip()
        if value.isdigit():
            counts[key] = int(value)
    return counts


# ---- usage normalisation ----------------------------------------------------------------------


def converse_usage(raw: dict) -> Usage:
    """Converse `TokenUsage`: `inputTokens` is the uncached input, the cache fields are separate.

    AWS documents `cacheReadInputTokens` / `cacheWriteInputTokens` as fields of their own beside
    `inputTokens` (API_runtime_TokenUsage); LiteLLM adds them back to `inputTokens` to get the
    prompt size (llms/bedrock/chat/converse_transformation.py `_transform_usage`), opencode made the
    same fix "matching AWS prompt-caching semantics" (anomalyco/opencode#38427), and Anthropic's own
    `input_tokens` excludes the cache (providers.md §1). So the counters are already disjoint.
    `cacheDetails` splits the writes by TTL ("5m" / "1h"); without it all are 5-minute writes.
    """
    usage = Usage(raw=raw)
    usage.input_tokens = as_int(raw.get("inputTokens"))
    usage.output_tokens = as_int(raw.get("outputTokens"))
    usage.cache_read_tokens = as_int(raw.get("cacheReadInputTokens"))
    writes = as_int(raw.get("cacheWriteInputTokens"))
    one_hour = 0
    details = raw.get("cacheDetails")
    if isinstance(details, list):
        detailed = one_hour = 0
        for detail in details:
            if isinstance(detail, dict):
                count = as_int(detail.get("inputTokens"))
                detailed += count
                if detail.get("ttl") == "1h":
                    one_hour += count
        writes = writes or detailed
    _set_cache_writes(usage, writes, one_hour)
    return usage


def apply_invocation_metrics(usage: Usage, metrics: dict) -> None:
    """Bedrock's own counts (`amazon-bedrock-invocationMetrics`, or InvokeModel's headers):
    the last word on what was billed. Absent keys leave the model's figures alone; the cache-write
    total keeps the 1-hour share the model reported, since Bedrock gives no TTL split here."""
    if "inputTokenCount" in metrics:
        usage.input_tokens = as_int(metrics["inputTokenCount"])
    if "outputTokenCount" in metrics:
        usage.output_tokens = as_int(metrics["outputTokenCount"])
    if "cacheReadInputTokenCount" in metrics:
        usage.cache_read_tokens = as_int(metrics["cacheReadInputTokenCount"])
    if "cacheWriteInputTokenCount" in metrics:
        writes = as_int(metrics["cacheWriteInputTokenCount"])
        _set_cache_writes(usage, writes, usage.cache_write_1h_tokens)


def _set_cache_writes(usage: Usage, writes: int, one_hour: int) -> None:
    one_hour = min(one_hour, writes)
    usage.cache_write_1h_tokens = one_hour
    usage.cache_write_5m_tokens = writes - one_hour


# ---- adapters -------------------------------------------------------------------------------


class _BedrockRuntime(Adapter):
    """What Converse and InvokeModel share: the model and stream flag from the URL, AWS error
    headers, `x-amzn-requestid`, and the event-stream body with its exception messages."""

    provider = "bedrock"
    hosts = HOSTS
    endpoint = "bedrock"
    operations: tuple[str, str] = ("", "")  # (whole response, event stream)

    def matches(self, method: str, path: str) -> bool:
        found = parse_runtime_path(path)
        return method == "POST" and found is not None and found[1] in self.operations

    def start(self, request: RequestHead, body: bytes, body_complete: bool) -> CallState:
        # Everything needed is in the URL: skip parsing a request body that can be megabytes of
        # base64 images.
        state = CallState(provider=self.provider)
        path, query = split_target(request.target)
        self.on_request(state, request.method, path, query, None)
        return state

    def on_request(self, state: CallState, method: str, path: str, query: dict[str, list[str]],
                   payload: object) -> None:
        state.endpoint = self.endpoint
        state.billing = BILL_TOKENS
        found = parse_runtime_path(path)
        if found is not None:
            state.request_model, operation = found
            state.is_stream = operation == self.operations[1]

    def request_id_from_headers(self, head: ResponseHead) -> str | None:
        return head.headers.get("x-amzn-requestid") or super().request_id_from_headers(head)

    def response(self, state: CallState, head: ResponseHead) -> None:
        super().response(state, head)
        if head.status >= 400:
            # restJson1: the type is in a header, the body is just {"message": …}.
            error_type = head.headers.get("x-amzn-errortype")
            if error_type and aws_error_code(error_type):
                state.error_type = aws_error_code(error_type)
            return
        if "vnd.amazon.eventstream" in (head.headers.get("content-type") or "").lower():
            state.is_stream = True
            state.json_body = None
            state.decoder = EventStreamDecoder()

    def feed(self, state: CallState, payload: bytes) -> None:
        if isinstance(state.decoder, EventStreamDecoder):
            for message in state.decoder.feed(payload):
                self.on_message(state, message)
        else:
            super().feed(state, payload)

    def on_error_json(self, state: CallState, payload: object) -> None:
        super().on_error_json(state, payload)
        if state.error_type is None and isinstance(payload, dict):
            code = payload.get("__type") or payload.get("code")
            if isinstance(code, str) and aws_error_code(code):
                state.error_type = aws_error_code(code)

    def on_message(self, state: CallState, message: EventMessage) -> None:
        headers = message.headers
        kind = headers.get(":message-type")
        if kind == "exception":
            # e.g. throttlingException, modelStreamErrorException (API_runtime_ResponseStream).
            state.error_type = _header_text(headers, ":exception-type") or "exception"
        elif kind == "error":
            state.error_type = _header_text(headers, ":error-code") or "error"
        elif kind == "event":
            event_type = headers.get(":event-type")
            if isinstance(event_type, str):
                self.on_stream_event(state, event_type, message.payload)

    def on_stream_event(self, state: CallState, event_type: str, payload: bytes) -> None:
        """One `:message-type event` message; the payload is still raw JSON bytes."""


class BedrockConverse(_BedrockRuntime):
    """`POST /model/{modelId}/converse` and `/converse-stream`: usage in `usage` or in the stream's
    `metadata` event (API_runtime_ConverseStreamMetadataEvent). Converse returns no model name."""

    name = "bedrock_converse"
    endpoint = "converse"
    operations = ("converse", "converse-stream")

    def on_json(self, state: CallState, payload: object) -> None:
        if isinstance(payload, dict):
            self._read_usage(state, payload)

    def on_stream_event(self, state: CallState, event_type: str, payload: bytes) -> None:
        if event_type == "metadata":
            event = json.loads(payload)
            if isinstance(event, dict):
                self._read_usage(state, event)

    @staticmethod
    def _read_usage(state: CallState, payload: dict) -> None:
        tier = get_path(payload, "serviceTier", "type")
        if isinstance(tier, str):
            state.service_tier = tier
        usage = payload.get("usage")
        if isinstance(usage, dict):
            state.usage = converse_usage(usage)
            state.usage_final = True


class BedrockInvoke(_BedrockRuntime):
    """`POST /model/{modelId}/invoke` and `/invoke-with-response-stream` with the model's native
    body. Anthropic bodies are read as the Messages API is (anthropic.py: message_start usage, then
    cumulative message_delta usage); Bedrock's own counts (invocation metrics in the last chunk,
    token headers on InvokeModel) then have the last word, and are all there is for other model
    families. `usage.raw` keeps both: {"usage": Anthropic's, "amazon-bedrock-invocationMetrics" or
    "headers": Bedrock's}."""

    name = "bedrock_invoke"
    endpoint = "invoke"
    operations = ("invoke", "invoke-with-response-stream")

    def response(self, state: CallState, head: ResponseHead) -> None:
        super().response(state, head)
        if head.status < 400 and not state.is_stream:
            counts = header_counts(head)
            if counts:
                _set_usage(state, None, "headers", counts)
                state.usage_final = True

    def on_json(self, state: CallState, payload: object) -> None:
        if not isinstance(payload, dict):
            return
        if isinstance(payload.get("model"), str):
            state.response_model = payload["model"]
        raw = payload.get("usage")
        if isinstance(raw, dict) and ("input_tokens" in raw or "output_tokens" in raw):
            _set_usage(state, raw, "headers", _raw_part(state, "headers"))
            state.usage_final = True

    def on_stream_event(self, state: CallState, event_type: str, payload: bytes) -> None:
        if event_type != "chunk":
            return
        part = json.loads(payload)  # PayloadPart: {"bytes": "<base64>"}, maybe a "p" padding field
        encoded = part.get("bytes") if isinstance(part, dict) else None
        if not isinstance(encoded, str):
            return
        try:
            event = json.loads(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            return  # a chunk this model family does not write as JSON: not ours to read
        if isinstance(event, dict):
            self.on_model_event(state, event)

    def on_model_event(self, state: CallState, event: dict) -> None:
        metrics_key = "amazon-bedrock-invocationMetrics"
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    state.response_model = message["model"]
                if isinstance(message.get("usage"), dict):
                    _set_usage(state, message["usage"], metrics_key, _raw_part(state, metrics_key))
        elif kind == "message_delta":
            delta = event.get("usage")
            if isinstance(delta, dict):
                merged = merge_delta_usage(_raw_part(state, "usage") or {}, delta)
                _set_usage(state, merged, metrics_key, _raw_part(state, metrics_key))
        elif kind == "message_stop" and state.usage is not None:
            state.usage_final = True  # the last message_delta was Anthropic's final count
        elif kind == "error":
            error_type = get_path(event, "error", "type")
            state.error_type = error_type if isinstance(error_type, str) else "error"
        metrics = event.get(metrics_key)
        if isinstance(metrics, dict):
            _set_usage(state, _raw_part(state, "usage"), metrics_key, metrics)
            state.usage_final = True


def _raw_part(state: CallState, key: str) -> dict | None:
    raw = state.usage.raw if state.usage is not None else None
    return raw.get(key) if isinstance(raw, dict) else None


def _set_usage(state: CallState, anthropic: dict | None, bedrock_key: str,
               bedrock: dict | None) -> None:
    """The call's usage from the model's own usage object, then Bedrock's counts over it."""
    usage = usage_from_anthropic(anthropic) if anthropic is not None else Usage()
    if bedrock:
        apply_invocation_metrics(usage, bedrock)
    parts = (("usage", anthropic), (bedrock_key, bedrock))
    usage.raw = {key: value for key, value in parts if value}
    state.usage = usage


def _header_text(headers: dict[str, object], name: str) -> str | None:
    value = headers.get(name)
    return value[:100] if isinstance(value, str) and value else None


ADAPTERS = (BedrockConverse(), BedrockInvoke())
