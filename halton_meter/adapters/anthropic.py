"""Anthropic `api.anthropic.com`: Messages (JSON and SSE), count_tokens, legacy Complete, Batches.

Usage fields are disjoint already (reference/providers.md §1, §8): `input_tokens` excludes cache
reads and writes, `output_tokens` includes thinking. In streams, `message_start` carries the full
usage and each `message_delta` carries cumulative values: the latest non-null value of each field
wins, and the 5 m / 1 h cache-write split, which deltas omit, is kept from `message_start`.
"""

from __future__ import annotations

import json
import re

from halton_meter.adapters.base import (BILL_FREE, BILL_NONE, BILL_TOKENS, Adapter, CallState, Usage,
                                        as_int, get_path)
from halton_meter.http1 import ResponseHead
from halton_meter.sse import Event

HOST = "api.anthropic.com"

# Only these events carry usage, model, id or an error; the rest (deltas, pings) are not parsed.
_USAGE_EVENTS = frozenset({"message_start", "message_delta", "message_stop", "error"})
_BATCH_RESULTS = re.compile(r"^/v1/messages/batches/([^/]+)/results$")
MAX_RESULT_LINE_BYTES = 8 << 20


def usage_from_anthropic(raw: dict) -> Usage:
    """Normalise one Anthropic usage object (types/usage.py) into disjoint counters."""
    written = as_int(raw.get("cache_creation_input_tokens"))
    split = raw.get("cache_creation")
    if isinstance(split, dict):
        hour = min(as_int(split.get("ephemeral_1h_input_tokens")), written)
        five_minutes = written - hour  # the split's 5 m figure, and any remainder, bills as 5 m
    else:
        hour, five_minutes = 0, written  # no split: all writes are 5-minute writes (pricing.md §2)
    thinking = get_path(raw, "output_tokens_details", "thinking_tokens")
    items = {}
    tools = raw.get("server_tool_use")
    if isinstance(tools, dict):
        for name, count in tools.items():
            if as_int(count):
                items[name] = as_int(count)
    return Usage(
        input_tokens=as_int(raw.get("input_tokens")),
        cache_read_tokens=as_int(raw.get("cache_read_input_tokens")),
        cache_write_5m_tokens=five_minutes,
        cache_write_1h_tokens=hour,
        output_tokens=as_int(raw.get("output_tokens")),
        reasoning_tokens=as_int(thinking) if thinking is not None else None,
        billed_items=items,
        raw=raw,
    )


def service_tier_of(usage: dict) -> str | None:
    """The price column: `speed: "fast"` (beta) is premium-priced whatever the service tier says."""
    if usage.get("speed") == "fast":
        return "fast"
    tier = usage.get("service_tier")
    return tier if isinstance(tier, str) else None


def read_token_count(state: CallState, payload: object) -> None:
    """`{"input_tokens": N}` from a token-counting endpoint: recorded as input, billed 0."""
    if isinstance(payload, dict) and "input_tokens" in payload:
        state.usage = Usage(input_tokens=as_int(payload["input_tokens"]), raw=payload)
        state.usage_final = True


def merge_delta_usage(current: dict, delta: dict) -> dict:
    """The SDK's accumulator: each non-null delta field replaces the running value."""
    merged = dict(current)
    for key, value in delta.items():
        if value is not None:
            merged[key] = value
    return merged


class AnthropicMessages(Adapter):
    """`POST /v1/messages` (also `?beta=true`), streaming or not."""

    name = "anthropic.messages"
    provider = "anthropic"
    hosts = (HOST,)
    endpoint = "messages"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/messages"

    def on_request(self, state, method, path, query, payload) -> None:
        super().on_request(state, method, path, query, payload)
        state.endpoint = self.endpoint
        state.billing = BILL_TOKENS

    def on_event(self, state: CallState, event: Event) -> None:
        if event.event not in _USAGE_EVENTS:
            return
        if event.event == "message_stop":
            state.usage_final = state.usage is not None
            return
        data = json.loads(event.data)
        if event.event == "message_start":
            self.on_message(state, get_path(data, "message"))
        elif event.event == "message_delta":
            delta = data.get("usage") if isinstance(data, dict) else None
            if isinstance(delta, dict):
                current = state.usage.raw if state.usage is not None else {}
                state.usage = usage_from_anthropic(merge_delta_usage(current, delta))
                state.service_tier = service_tier_of(state.usage.raw) or state.service_tier
        else:  # an error after HTTP 200, e.g. overloaded_error (what a 529 would have been)
            state.error_type = get_path(data, "error", "type") or "error"

    def on_json(self, state: CallState, payload: object) -> None:
        self.on_message(state, payload)
        state.usage_final = state.usage is not None

    def on_message(self, state: CallState, message: object) -> None:
        if not isinstance(message, dict):
            return
        if isinstance(message.get("model"), str):
            state.response_model = message["model"]
        if state.request_id is None and isinstance(message.get("id"), str):
            state.request_id = message["id"]
        usage = message.get("usage")
        if isinstance(usage, dict):
            state.usage = usage_from_anthropic(usage)
            state.service_tier = service_tier_of(usage) or state.service_tier


class AnthropicCountTokens(Adapter):
    """`POST /v1/messages/count_tokens`: free by Anthropic's terms, recorded with its count."""

    name = "anthropic.count_tokens"
    provider = "anthropic"
    hosts = (HOST,)

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/messages/count_tokens"

    def on_request(self, state, method, path, query, payload) -> None:
        super().on_request(state, method, path, query, payload)
        state.endpoint, state.billing = "count_tokens", BILL_FREE

    def on_json(self, state: CallState, payload: object) -> None:
        read_token_count(state, payload)


class AnthropicComplete(Adapter):
    """Legacy `POST /v1/complete`: its responses carry no usage, so tokens stay unknown."""

    name = "anthropic.complete"
    provider = "anthropic"
    hosts = (HOST,)

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/complete"

    def on_request(self, state, method, path, query, payload) -> None:
        super().on_request(state, method, path, query, payload)
        state.endpoint, state.billing = "complete", BILL_TOKENS

    def on_event(self, state: CallState, event: Event) -> None:
        if event.event == "completion" and state.response_model is None:
            self.on_json(state, json.loads(event.data))
        elif event.event == "error":
            state.error_type = get_path(json.loads(event.data), "error", "type") or "error"

    def on_json(self, state: CallState, payload: object) -> None:
        if isinstance(payload, dict):
            if isinstance(payload.get("model"), str):
                state.response_model = payload["model"]
            if state.request_id is None and isinstance(payload.get("id"), str):
                state.request_id = payload["id"]


class AnthropicBatchCreate(Adapter):
    """`POST /v1/messages/batches`: the submission is recorded; tokens are billed with results."""

    name = "anthropic.batch_create"
    provider = "anthropic"
    hosts = (HOST,)

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/messages/batches"

    def on_request(self, state, method, path, query, payload) -> None:
        state.endpoint, state.billing = "batch_create", BILL_NONE
        requests = payload.get("requests") if isinstance(payload, dict) else None
        if isinstance(requests, list) and requests:
            model = get_path(requests[0], "params", "model")
            state.request_model = model if isinstance(model, str) else None
        elif isinstance(payload, dict) and isinstance(payload.get("model"), str):
            state.request_model = payload["model"]  # partial scan of a large submission

    def on_json(self, state: CallState, payload: object) -> None:
        if isinstance(payload, dict) and isinstance(payload.get("id"), str):
            state.request_id = payload["id"]  # the batch id: its results are matched by it


class AnthropicBatchResults(Adapter):
    """`GET /v1/messages/batches/{id}/results`: JSONL of results; succeeded ones carry usage.

    The batch's tokens are summed here at batch rates (`service_tier` "batch"); the ledger
    counts a second download of the same batch id as a duplicate, not as new spend.
    """

    name = "anthropic.batch_results"
    provider = "anthropic"
    hosts = (HOST,)

    def matches(self, method: str, path: str) -> bool:
        return method == "GET" and _BATCH_RESULTS.match(path) is not None

    def on_request(self, state, method, path, query, payload) -> None:
        state.endpoint, state.billing = "batch_results", BILL_TOKENS
        state.request_id = _BATCH_RESULTS.match(path).group(1)
        state.service_tier = "batch"

    def response(self, state: CallState, head: ResponseHead) -> None:
        batch_id = state.request_id
        super().response(state, head)
        state.request_id = batch_id  # the batch id, not this download's request id
        if head.status < 400:
            state.json_body = None
            state.decoder = _ResultLines()

    def feed(self, state: CallState, payload: bytes) -> None:
        if isinstance(state.decoder, _ResultLines):
            for line in state.decoder.feed(payload):
                self._on_result(state, line)
        else:
            super().feed(state, payload)

    def close(self, state: CallState, complete: bool) -> None:
        if isinstance(state.decoder, _ResultLines):
            tail = state.decoder.close()
            if tail and complete:
                self._on_result(state, tail)
            if complete and state.usage is not None:
                state.usage_final = True

    def _on_result(self, state: CallState, line: bytes) -> None:
        record = json.loads(line)
        message = get_path(record, "result", "message")
        if get_path(record, "result", "type") != "succeeded" or not isinstance(message, dict):
            return
        usage = message.get("usage")
        if not isinstance(usage, dict):
            return
        model = message.get("model")
        if isinstance(model, str):
            if state.response_model is None:
                state.response_model = model
            elif state.response_model != model:
                # One row has one model: a batch mixing models cannot be priced as one.
                state.response_model = "mixed-models"
        state.usage = add_usage(state.usage, usage_from_anthropic(usage))


def add_usage(total: Usage | None, more: Usage) -> Usage:
    """Sum of two calls' usage (batch results are separate calls, unlike stream deltas)."""
    prompt = more.prompt_tokens
    if total is None:
        more.raw = [more.raw]
        more.request_prompt_range = (prompt, prompt)
        return more
    low, high = total.request_prompt_range or (total.prompt_tokens, total.prompt_tokens)
    items = dict(total.billed_items)
    for name, count in more.billed_items.items():
        items[name] = items.get(name, 0) + count
    reasoning = None
    if total.reasoning_tokens is not None or more.reasoning_tokens is not None:
        reasoning = (total.reasoning_tokens or 0) + (more.reasoning_tokens or 0)
    raw = total.raw if isinstance(total.raw, list) else [total.raw]
    if len(raw) < 1000:  # the audit copy stays bounded; the counters do not
        raw.append(more.raw)
    return Usage(
        input_tokens=total.input_tokens + more.input_tokens,
        cache_read_tokens=total.cache_read_tokens + more.cache_read_tokens,
        cache_write_5m_tokens=total.cache_write_5m_tokens + more.cache_write_5m_tokens,
        cache_write_1h_tokens=total.cache_write_1h_tokens + more.cache_write_1h_tokens,
        output_tokens=total.output_tokens + more.output_tokens,
        reasoning_tokens=reasoning,
        billed_items=items,
        raw=raw,
        request_prompt_range=(min(low, prompt), max(high, prompt)),
    )


class _ResultLines:
    """Splits a JSONL body into lines, whatever the chunking; an oversized line is an error."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        *lines, rest = self._buffer.split(b"\n")
        if len(rest) > MAX_RESULT_LINE_BYTES:
            raise ValueError("batch result line over 8 MiB")
        self._buffer = bytearray(rest)
        return [bytes(line) for line in lines if line.strip()]

    def close(self) -> bytes:
        tail, self._buffer = bytes(self._buffer).strip(), bytearray()
        return tail


ADAPTERS = (
    AnthropicMessages(),
    AnthropicCountTokens(),
    AnthropicComplete(),
    AnthropicBatchCreate(),
    AnthropicBatchResults(),
)
