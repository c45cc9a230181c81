"""OpenAI API adapters (api.openai.com) and the OpenAI usage shapes compat.py and codex.py reuse:
`chat_usage` / `ChatAdapter` for Chat Completions-shaped calls, `responses_usage` /
`ResponsesAdapter` for the Responses API."""

from __future__ import annotations

import json

from halton_meter.adapters.base import (BILL_FREE, BILL_NONE, BILL_TOKENS, Adapter, CallState,
                                        Usage, as_int, error_type_for_status, error_type_of,
                                        get_path)
from halton_meter.http1 import ResponseHead
from halton_meter.sse import Event

HOST = "api.openai.com"


# ---- usage shapes (reference/providers.md §2.1, §2.2, §8) -----------------------------------


def chat_usage(raw: dict) -> Usage:
    """A Chat Completions, legacy Completions or Embeddings `usage`, as disjoint counters.

    `cached_tokens` and `cache_write_tokens` are parts of `prompt_tokens`; `reasoning_tokens` is
    part of `completion_tokens` and stays informational.
    """
    return _normalise(raw, as_int(raw.get("prompt_tokens")), raw.get("prompt_tokens_details"),
                      as_int(raw.get("completion_tokens")), raw.get("completion_tokens_details"))


def responses_usage(raw: dict) -> Usage:
    """A Responses API `usage` (also compaction's): the same rules under Responses names."""
    return _normalise(raw, as_int(raw.get("input_tokens")), raw.get("input_tokens_details"),
                      as_int(raw.get("output_tokens")), raw.get("output_tokens_details"))


def cache_writes(prompt_details: object) -> tuple[int, int]:
    """(30-minute, 12-hour) cache writes from `cache_write_tokens` and its optional TTL split.

    Without `cache_write_tokens_details` every write is a 30-minute one (the default TTL of
    `prompt_cache_options`); the split is LiteLLM's reading (observed, not in the SDK read).
    """
    total = as_int(get_path(prompt_details, "cache_write_tokens"))
    split = get_path(prompt_details, "cache_write_tokens_details")
    write_12h = as_int(get_path(split, "ttl_12h_tokens"))
    if not total:
        total = as_int(get_path(split, "ttl_30m_tokens")) + write_12h
    write_12h = min(write_12h, total)
    return total - write_12h, write_12h


def _normalise(raw: dict, prompt: int, prompt_details: object, completion: int,
               completion_details: object) -> Usage:
    cache_read = as_int(get_path(prompt_details, "cached_tokens"))
    write_30m, write_12h = cache_writes(prompt_details)
    uncached = prompt - cache_read - write_30m - write_12h
    if uncached < 0:
        # Cache counts larger than the prompt: this provider reported input without its cached
        # part (vercel/ai's xAI Responses converter guards the same case). Keep it as uncached.
        uncached = prompt
    reasoning = get_path(completion_details, "reasoning_tokens")
    return Usage(
        input_tokens=uncached,
        cache_read_tokens=cache_read,
        cache_write_30m_tokens=write_30m,
        cache_write_12h_tokens=write_12h,
        output_tokens=completion,
        reasoning_tokens=None if reasoning is None else as_int(reasoning),
        raw=raw,
    )


# ---- small readers shared by the OpenAI-shaped adapters -------------------------------------


def openai_error_type(error: object) -> str | None:
    """An OpenAI error object's `code`, else its `type`, else a numeric `code` as a status.

    The code comes first because it is the precise one: a 429 says `type: "requests"` or
    `"tokens"` but `code: "rate_limit_exceeded"` / `"insufficient_quota"`, and Responses streams
    carry only a code (`response.failed`, `error` events — §2.7). OpenRouter's error objects
    carry an HTTP status as `code` (`{"code": 502, "message": …}`).
    """
    if isinstance(error, dict):
        for key in ("code", "type"):
            value = error.get(key)
            if isinstance(value, str) and value:
                return value[:100]
        code = error.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            return error_type_for_status(code)
    elif isinstance(error, str) and error:
        return error[:100]
    return None


def read_identity(state: CallState, body: dict) -> None:
    """Returned model, service tier, and the body id when no header gave a request id."""
    model = body.get("model")
    if isinstance(model, str) and model:
        state.response_model = model
    tier = body.get("service_tier")
    if isinstance(tier, str) and tier:
        state.service_tier = tier
    if state.request_id is None:
        body_id = body.get("id")
        if isinstance(body_id, str) and body_id:
            state.request_id = body_id


def carries(data: str, key: str) -> bool:
    """True when `key` (quoted) occurs in `data` as an object key whose value is not null.

    A pre-filter run on every chunk before any `json.loads`: quotes inside JSON strings are
    escaped, so generated text cannot fake a key; a false positive only costs one parse.
    """
    start = 0
    while (found := data.find(key, start)) >= 0:
        start = found + len(key)
        rest = data[start:start + 40].lstrip()
        if rest[:1] == ":" and not rest[1:].lstrip().startswith("null"):
            return True
    return False


# ---- adapters ------------------------------------------------------------------------------


class OpenAIAdapter(Adapter):
    """One OpenAI-shaped API surface: a table of POST paths to (endpoint, billing)."""

    name = "openai"
    provider = "openai"
    hosts: tuple[str, ...] = (HOST,)
    endpoints: dict[str, tuple[str, str]] = {}

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path in self.endpoints

    def on_request(self, state: CallState, method: str, path: str, query: dict[str, list[str]],
                   payload: object) -> None:
        super().on_request(state, method, path, query, payload)
        state.endpoint, state.billing = self.endpoints.get(path, (None, BILL_TOKENS))

    def on_error_json(self, state: CallState, payload: object) -> None:
        error_type = openai_error_type(get_path(payload, "error"))
        if error_type is None and get_path(payload, "object") == "error":
            error_type = openai_error_type(payload)  # Mistral and vLLM put code/type at the top
        state.error_type = error_type or error_type_of(payload) or state.error_type


class _ChunkProgress:
    """Per-stream memory of a chat adapter: whether the first chunk was read yet."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False


class ChatAdapter(OpenAIAdapter):
    """Chat Completions shape: a JSON body, or `data:` chunks ending with `data: [DONE]`.

    A stream's usage is on its last chunk only with `stream_options.include_usage` (§2.1);
    without it no usage ever arrives and the row says unknown. When several chunks carry usage
    (old xAI streams repeat running totals) the last one replaces the others.
    """

    name = "openai.chat"
    endpoints = {
        "/v1/chat/completions": ("chat", BILL_TOKENS),
        "/v1/completions": ("completions", BILL_TOKENS),
        "/v1/embeddings": ("embeddings", BILL_TOKENS),
    }

    def response(self, state: CallState, head: ResponseHead) -> None:
        super().response(state, head)
        if state.sse is not None:
            state.decoder = _ChunkProgress()

    def on_event(self, state: CallState, event: Event) -> None:
        data = event.data
        progress = state.decoder
        if progress.started:
            # Performance rule: only chunks that can change the row are parsed.
            if not (carries(data, '"usage"') or carries(data, '"error"')
                    or carries(data, '"x_groq"')):
                return
        elif data[:1] != "{":
            return  # "[DONE]" with nothing before it
        chunk = json.loads(data)
        if isinstance(chunk, dict):
            progress.started = True
            self.on_chunk(state, chunk)

    def on_json(self, state: CallState, payload: object) -> None:
        if isinstance(payload, dict):
            self.on_chunk(state, payload)

    def on_chunk(self, state: CallState, chunk: dict) -> None:
        """One parsed chunk, or the whole body of a non-streaming answer."""
        read_identity(state, chunk)
        error = chunk.get("error")
        if error:
            state.error_type = openai_error_type(error) or state.error_type
        raw = self.usage_of(chunk)
        if raw is not None:
            self.read_usage(state, raw)

    def usage_of(self, chunk: dict) -> dict | None:
        usage = chunk.get("usage")
        return usage if isinstance(usage, dict) else None

    def read_usage(self, state: CallState, raw: dict) -> None:
        state.usage = chat_usage(raw)
        state.usage_final = True


# Events worth a parse: the first carries model and id, the terminal ones usage and errors.
_TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_PARSED_EVENTS = _TERMINAL_EVENTS | {"response.created", "error"}
_PARSED_MARKERS = tuple(f'"{name}"' for name in sorted(_PARSED_EVENTS))


class ResponsesAdapter(OpenAIAdapter):
    """Responses API: a `response` object, or typed SSE events with usage only in the terminal
    `response.completed` / `.incomplete` / `.failed` (§2.2). A stream without one is unknown.
    """

    name = "openai.responses"
    endpoints = {
        "/v1/responses": ("responses", BILL_TOKENS),
        # "Token accounting for the compaction pass": billable like a response (§2.2).
        "/v1/responses/compact": ("compact", BILL_TOKENS),
        # Token counting: treated as free like Anthropic's count_tokens (unconfirmed, §2.2).
        "/v1/responses/input_tokens": ("count_tokens", BILL_FREE),
    }

    def on_event(self, state: CallState, event: Event) -> None:
        kind = event.event
        if kind == "message":  # no `event:` line: judge by the quoted type names in the data
            if not any(marker in event.data for marker in _PARSED_MARKERS):
                return
        elif kind not in _PARSED_EVENTS:
            return
        payload = json.loads(event.data)
        if not isinstance(payload, dict):
            return
        kind = payload.get("type") or kind
        if kind == "error":
            state.error_type = stream_error_type(payload)
        elif kind in _TERMINAL_EVENTS or kind == "response.created":
            response = payload.get("response")
            if isinstance(response, dict):
                self.on_response(state, response, kind in _TERMINAL_EVENTS)

    def on_json(self, state: CallState, payload: object) -> None:
        if not isinstance(payload, dict):
            return
        if state.endpoint == "count_tokens":
            # {"object": "response.input_tokens", "input_tokens": N}: the body is the usage.
            if "input_tokens" in payload:
                state.usage = Usage(input_tokens=as_int(payload.get("input_tokens")), raw=payload)
                state.usage_final = True
            return
        self.on_response(state, payload, True)

    def on_response(self, state: CallState, response: dict, terminal: bool) -> None:
        """A `response` (or `response.compaction`) object; only a terminal one has usage."""
        read_identity(state, response)
        error = response.get("error")
        if error:
            state.error_type = openai_error_type(error) or state.error_type
        elif terminal and response.get("status") == "failed":
            state.error_type = state.error_type or "response_failed"
        raw = response.get("usage")
        if terminal and isinstance(raw, dict):
            self.read_usage(state, raw)

    def read_usage(self, state: CallState, raw: dict) -> None:
        state.usage = responses_usage(raw)
        state.usage_final = True


def stream_error_type(payload: dict) -> str:
    """An `error` SSE event: `{"type":"error","code",…}` (SDK), or an OpenAI error object under
    `error` (seen from other servers of the same API)."""
    return openai_error_type({"code": payload.get("code")}) or openai_error_type(
        payload.get("error")) or "error"


class BatchCreate(OpenAIAdapter):
    """`POST /v1/batches`: a submission, not billable by itself; its usage arrives later in the
    output file (§2.6), which is not read here."""

    name = "openai.batches"
    endpoints = {"/v1/batches": ("batch_create", BILL_NONE)}

    def on_json(self, state: CallState, payload: object) -> None:
        if isinstance(payload, dict):
            read_identity(state, payload)


ADAPTERS = (ChatAdapter(), ResponsesAdapter(), BatchCreate())
