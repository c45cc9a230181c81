"""What every adapter is: a sans-IO reader of one call's bytes, fed by the relay's tap.

An adapter sees the request head and body, then the response head and body bytes as they were
forwarded, and fills a `CallState`: requested and returned model, stream flag, the provider's
request id, error type, and a normalised `Usage`. No sockets, clocks or database here: the tests
drive adapters with recorded transcripts (tests/adapter_harness.py).

Normalisation rules (reference/providers.md §0 and §8): counters are disjoint — `input_tokens` is
uncached input only, cache reads and writes are separate, `output_tokens` is the billed output
with reasoning included, and `reasoning_tokens` is an informational subset of it, never added.
Streaming counters that providers send as running totals are replaced, never summed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from urllib.parse import parse_qs, urlsplit

from halton_meter.http1 import RequestHead, ResponseHead
from halton_meter.sse import Event, SSEDecoder

MAX_REQUEST_COPY_BYTES = 1 << 20
# When a request body is larger than the copy, its first and last bytes are kept for a model scan.
REQUEST_SCAN_BYTES = 64 << 10
# JSON bodies are parsed whole at the end, on the event loop: keep that parse short (~3 ms).
MAX_JSON_RESPONSE_BYTES = 2 << 20

# usage_status values, as stored on every row.
USAGE_EXACT = "exact"  # the provider's final usage was read
USAGE_PARTIAL = "partial"  # some usage was read but the response ended early: a lower bound
USAGE_UNKNOWN = "unknown"  # a billable call whose usage never arrived (or was never sent)
USAGE_NONE = "none"  # nothing billable: a listing, a batch submission, an error before work

# billing values: how pricing treats the usage.
BILL_TOKENS = "tokens"  # priced from the rate table
BILL_FREE = "free"  # usage recorded, cost 0 by the provider's terms (token counting)
BILL_NONE = "none"  # no usage and no cost (listings, batch submissions)


@dataclass(slots=True)
class Usage:
    """Disjoint token counters of one call, plus the provider's raw usage JSON for audit."""

    input_tokens: int = 0  # uncached input only
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0  # Anthropic 5-minute writes (all writes when no split given)
    cache_write_1h_tokens: int = 0  # Anthropic 1-hour writes
    cache_write_30m_tokens: int = 0  # OpenAI cache writes (gpt-5.6 and later)
    cache_write_12h_tokens: int = 0  # OpenAI 12-hour cache writes
    output_tokens: int = 0  # billed output, reasoning/thinking included
    reasoning_tokens: int | None = None  # informational subset of output_tokens
    billed_items: dict[str, int] = field(default_factory=dict)  # e.g. {"web_search_requests": 2}
    raw: object = None  # the provider's usage object(s), verbatim
    # Set only when several requests are summed (batch results): their smallest and largest
    # prompt, because long-context tiers apply per request, never to the sum.
    request_prompt_range: tuple[int, int] | None = None

    @property
    def cache_write_tokens(self) -> int:
        return (self.cache_write_5m_tokens + self.cache_write_1h_tokens
                + self.cache_write_30m_tokens + self.cache_write_12h_tokens)

    @property
    def prompt_tokens(self) -> int:
        """Every input token of the call: what long-context tiers are tested against."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


@dataclass(slots=True)
class CallState:
    """What an adapter learned about one call so far."""

    provider: str = "unknown"
    endpoint: str | None = None  # e.g. "messages", "chat", "responses", "embeddings"
    billing: str = BILL_NONE
    request_model: str | None = None
    response_model: str | None = None
    is_stream: bool = False
    status: int | None = None
    request_id: str | None = None
    service_tier: str | None = None
    error_type: str | None = None
    usage: Usage | None = None
    usage_final: bool = False  # the provider's last word on usage was read
    usage_status: str = USAGE_NONE  # set by `finish`
    provider_cost_nanousd: int | None = None  # the provider's own charge (OpenRouter, xAI)
    # Parsing machinery, owned by the adapter.
    sse: SSEDecoder | None = None
    json_body: bytearray | None = None
    json_truncated: bool = False
    decoder: object = None  # adapter-specific incremental decoder (JSON array, AWS event stream)


class Adapter:
    """Base adapter: pure functions of bytes. Raising anywhere marks the call `unparsed`.

    Subclasses set `name`, `provider` and `hosts`, implement `matches`, and override the
    `on_*` hooks; the base drives SSE and bounded JSON collection and error bodies.
    """

    name = "generic"
    provider = "unknown"
    hosts: tuple[str, ...] = ()

    def matches(self, method: str, path: str) -> bool:
        """True when this adapter reads calls of `method` to `path` (no query string)."""
        return False

    # ---- request -------------------------------------------------------------------------

    def start(self, request: RequestHead, body: bytes, body_complete: bool) -> CallState:
        state = CallState(provider=self.provider)
        path, query = split_target(request.target)
        payload = None
        if body and body_complete:
            content_type = (request.headers.get("content-type") or "").lower()
            if "json" in content_type or body[:1] in (b"{", b"["):
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = None  # not ours to judge: the provider will answer it
        elif body:
            payload = scan_partial_request(body)
        self.on_request(state, request.method, path, query, payload)
        return state

    def on_request(self, state: CallState, method: str, path: str, query: dict[str, list[str]],
                   payload: object) -> None:
        """Read the request: endpoint, billing, model, stream flag."""
        if isinstance(payload, dict):
            model = payload.get("model")
            if isinstance(model, str):
                state.request_model = model
            state.is_stream = payload.get("stream") is True

    # ---- response ------------------------------------------------------------------------

    def response(self, state: CallState, head: ResponseHead) -> None:
        state.status = head.status
        state.request_id = self.request_id_from_headers(head) or state.request_id
        content_type = (head.headers.get("content-type") or "").lower()
        if content_type.startswith("text/event-stream"):
            state.is_stream = True
            state.sse = SSEDecoder()
        elif "json" in content_type or head.status >= 400:
            state.json_body = bytearray()

    def request_id_from_headers(self, head: ResponseHead) -> str | None:
        return head.headers.get("request-id") or head.headers.get("x-request-id")

    def feed(self, state: CallState, payload: bytes) -> None:
        if state.sse is not None:
            for event in state.sse.feed(payload):
                self.on_event(state, event)
        elif state.json_body is not None:
            self.collect_json(state, payload)

    @staticmethod
    def collect_json(state: CallState, payload: bytes) -> None:
        if state.json_truncated:
            return
        if len(state.json_body) + len(payload) > MAX_JSON_RESPONSE_BYTES:
            state.json_truncated = True
            state.json_body = bytearray()
        else:
            state.json_body += payload

    def finish(self, state: CallState, complete: bool) -> CallState:
        """`complete` is False when the response ended early (cancel, reset): use what was seen."""
        if state.sse is not None:
            for event in state.sse.close():
                self.on_event(state, event)
        elif state.json_body is not None and complete and not state.json_truncated:
            text = bytes(state.json_body)
            state.json_body = None
            if state.status is not None and state.status >= 400:
                # An error page need not be JSON (a gateway's HTML 502): the status still tells.
                try:
                    payload = json.loads(text) if text.strip() else None
                except ValueError:
                    payload = None
                self.on_error_json(state, payload)
            else:
                self.on_json(state, json.loads(text) if text.strip() else None)
        self.close(state, complete)
        if state.status is not None and state.status >= 400 and state.error_type is None:
            state.error_type = error_type_for_status(state.status)
        state.usage_status = self.usage_status(state, complete)
        return state

    def usage_status(self, state: CallState, complete: bool) -> str:
        if state.usage is not None:
            return USAGE_EXACT if complete and state.usage_final else USAGE_PARTIAL
        if state.billing == BILL_NONE or state.status is None or state.status >= 400:
            return USAGE_NONE
        return USAGE_UNKNOWN

    # ---- hooks for subclasses ------------------------------------------------------------

    def on_event(self, state: CallState, event: Event) -> None:
        """One complete SSE event."""

    def on_json(self, state: CallState, payload: object) -> None:
        """The whole JSON body of a successful response."""

    def on_error_json(self, state: CallState, payload: object) -> None:
        """The JSON body of an HTTP error: most providers put a type in `error`."""
        state.error_type = error_type_of(payload) or state.error_type

    def close(self, state: CallState, complete: bool) -> None:
        """The response ended (`complete` False: cut short). Flush adapter-owned decoders."""


# ---- helpers shared by adapters ------------------------------------------------------------


def split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """('/v1/messages', {'beta': ['true']}) from '/v1/messages?beta=true' (or absolute form)."""
    parts = urlsplit(target)
    return parts.path or "/", parse_qs(parts.query, keep_blank_values=True)


_MODEL_FIELD = re.compile(rb'(?<!\\)"model"\s*:\s*"([^"\\]{1,200})"')
_STREAM_TRUE = re.compile(rb'(?<!\\)"stream"\s*:\s*true')


def scan_partial_request(body: bytes) -> dict[str, object]:
    """Model and stream flag from a body too large to parse whole (its first and last bytes).

    The last "model" key wins: SDKs that put it after `messages` put it near the end, and a key
    inside the conversation is earlier. A response's own model corrects any miss.
    """
    found: dict[str, object] = {}
    models = _MODEL_FIELD.findall(body)
    if models:
        found["model"] = models[-1].decode("utf-8", "replace")
    if _STREAM_TRUE.search(body):
        found["stream"] = True
    return found


def error_type_of(payload: object) -> str | None:
    """`error.type` (Anthropic, OpenAI), `error.status` (Google) or `error.code`, if any."""
    if isinstance(payload, list) and payload:  # Google sometimes wraps errors in a list
        payload = payload[0]
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        for key in ("type", "status", "code"):
            value = error.get(key)
            if isinstance(value, str) and value:
                return value
    elif isinstance(error, str) and error:
        return error[:100]
    return None


def error_type_for_status(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 529:
        return "overloaded_error"
    if status >= 500:
        return "api_error"
    return f"http_{status}"


def as_int(value: object) -> int:
    """A usage counter as an int: null, absent or malformed counts as 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value if value > 0 else 0
    if isinstance(value, float) and value.is_integer():
        return int(value) if value > 0 else 0
    return 0


def get_path(payload: object, *keys: str) -> object:
    """payload[k1][k2]…, or None when any step is missing or not an object."""
    for key in keys:
        if not isinstance(payload, dict):
            return None
        payload = payload.get(key)
    return payload


def usd_to_nanousd(value: object) -> int | None:
    """A provider-reported USD amount (float or string) as integer nano-dollars, exactly rounded."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        return None
    if not amount.is_finite():
        return None
    return int((amount * 1_000_000_000).to_integral_value())
