"""Gemini API and Vertex AI Gemini adapters: generateContent in its three response forms (JSON,
SSE, streamed JSON array), countTokens and embeddings, with `usageMetadata` normalised once here
(reference/providers.md §3). Code Assist (code_assist.py) reuses `GenerateContentAdapter`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

from halton_meter.adapters.base import (BILL_FREE, BILL_TOKENS, MAX_JSON_RESPONSE_BYTES,
                                        Adapter, CallState, Usage, as_int, error_type_of)
from halton_meter.adapters.vertex import HOSTS as VERTEX_HOSTS
from halton_meter.http1 import ResponseHead
from halton_meter.jsonstream import JsonArraySplitter
from halton_meter.sse import Event

# What kind of call a Google method is.
KIND_GENERATE = "generate"
KIND_COUNT = "count"
KIND_EMBED = "embed"
KIND_OTHER = "other"

_METHODS: dict[str, tuple[str, str, str]] = {  # method -> (kind, endpoint, billing)
    "generateContent": (KIND_GENERATE, "generate_content", BILL_TOKENS),
    "streamGenerateContent": (KIND_GENERATE, "generate_content", BILL_TOKENS),
    "countTokens": (KIND_COUNT, "count_tokens", BILL_FREE),
    "embedContent": (KIND_EMBED, "embed_content", BILL_TOKENS),
    "batchEmbedContents": (KIND_EMBED, "batch_embed_contents", BILL_TOKENS),
}

# A JSON body past MAX_JSON_RESPONSE_BYTES (inline images can be megabytes) is not parsed whole:
# its last bytes are kept, where Google serialises usageMetadata, modelVersion and responseId.
TAIL_BYTES = 64 << 10

# usageMetadata keys that carry counts; a usageMetadata without any (Vertex sends chunks with
# only `trafficType`) must not replace the counts already read.
_COUNT_KEYS = frozenset({"promptTokenCount", "candidatesTokenCount", "totalTokenCount",
                         "thoughtsTokenCount", "cachedContentTokenCount",
                         "toolUsePromptTokenCount"})

# Vertex `trafficType` (genai-sdk TrafficType) and the Gemini API's `x-gemini-service-tier`
# response header (ai.google.dev/gemini-api/docs/priority-inference) in one vocabulary, the one
# pricing's `_priority` / `_flex` columns use. Standard traffic is None.
_TIERS = {
    "ON_DEMAND": None,
    "TRAFFIC_TYPE_UNSPECIFIED": None,
    "STANDARD": None,
    "ON_DEMAND_PRIORITY": "priority",
    "ON_DEMAND_FLEX": "flex",
}


@dataclass(slots=True)
class GoogleCall:
    """Per-call parsing state, kept in `CallState.decoder`."""

    kind: str = KIND_OTHER
    splitter: JsonArraySplitter | None = None  # a streamed JSON array is being read
    body_read: bool = False  # a JSON body (or its tail) was read to its end
    stream_error: bool = False  # an error object arrived inside a 200 response
    tier_from_header: bool = False


class GenerateContentAdapter(Adapter):
    """Reads Google GenerateContentResponse bodies; subclasses map paths and request bodies.

    Each streamed chunk is a whole response whose usageMetadata holds running totals: the last
    one wins. Chunks are not parsed whole (only error objects are): the usageMetadata object and
    a few strings are cut out of the text and parsed alone, whatever text or image they carry.
    """

    id_keys: tuple[str, ...] = ("responseId",)
    # How deep the response's own keys sit in a chunk: 1 in the response object itself. A key
    # found deeper belongs to something else (a function call's arguments can hold any key).
    max_key_depth = 1

    # ---- request -------------------------------------------------------------------------

    _PATH: re.Pattern[str]  # the subclass's URL shape: (…model…, method) groups

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and self._PATH.fullmatch(path) is not None

    def route(self, state: CallState, path: str, payload: object) -> str | None:
        """Set endpoint, billing and model from the request; returns the Google method name."""
        raise NotImplementedError

    def on_request(self, state: CallState, method: str, path: str, query: dict[str, list[str]],
                   payload: object) -> None:
        call = GoogleCall()
        state.decoder = call
        google_method = self.route(state, path, payload)
        if google_method in _METHODS:
            call.kind, state.endpoint, state.billing = _METHODS[google_method]
        state.is_stream = google_method == "streamGenerateContent"

    def unwrap(self, payload: dict) -> dict:
        """The GenerateContentResponse inside one response object (Code Assist wraps it)."""
        return payload

    # ---- response ------------------------------------------------------------------------

    def response(self, state: CallState, head: ResponseHead) -> None:
        super().response(state, head)
        call = _call(state)
        tier = head.headers.get("x-gemini-service-tier")
        if tier:
            state.service_tier = tier_of(tier)
            call.tier_from_header = True
        if state.sse is None and head.status < 400 and state.is_stream:
            # Without alt=sse the stream is one JSON array, sent element by element. Chosen by
            # what came back, not by the query: the content type is application/json either way.
            state.json_body = None
            call.splitter = JsonArraySplitter()
        elif state.sse is None and state.json_body is None:
            state.json_body = bytearray()  # a 2xx without a JSON content type: read it anyway

    def feed(self, state: CallState, payload: bytes) -> None:
        call = _call(state)
        if call.splitter is not None:
            for element in call.splitter.feed(payload):
                self.read_chunk(state, call, element.decode("utf-8", "replace"))
        elif state.json_body is not None:
            body = state.json_body
            body += payload
            if not state.json_truncated and len(body) > MAX_JSON_RESPONSE_BYTES:
                state.json_truncated = True
            if state.json_truncated and len(body) > TAIL_BYTES:
                del body[:-TAIL_BYTES]
        else:
            super().feed(state, payload)

    def finish(self, state: CallState, complete: bool) -> CallState:
        body = state.json_body
        if body is not None:
            state.json_body = None  # parsed here, leniently: the base would raise on HTML
            if complete:
                self.read_json_body(state, bytes(body))
        return super().finish(state, complete)

    def read_json_body(self, state: CallState, body: bytes) -> None:
        call = _call(state)
        if state.json_truncated:
            if state.status is not None and state.status < 400:
                self.read_chunk(state, call, body.decode("utf-8", "replace"), whole=False)
                call.body_read = True
            return
        try:
            payload = json.loads(body) if body.strip() else None
        except ValueError:
            payload = None  # an HTML error page from a front end, or a cut body
        if state.status is not None and state.status >= 400:
            self.on_error_json(state, payload)
        elif payload is not None:
            self.on_json(state, payload)

    def on_event(self, state: CallState, event: Event) -> None:
        self.read_chunk(state, _call(state), event.data)

    def on_json(self, state: CallState, payload: object) -> None:
        call = _call(state)
        call.body_read = True
        if call.kind == KIND_GENERATE:
            self.read_object(state, call, payload)
        elif isinstance(payload, dict) and "error" in payload:
            self.read_object(state, call, payload)
        elif call.kind == KIND_COUNT:
            self.read_count(state, payload)
        elif call.kind == KIND_EMBED:
            self.read_embed(state, payload)

    def close(self, state: CallState, complete: bool) -> None:
        call = _call(state)
        if call.splitter is not None:
            call.splitter.close()
            whole = call.splitter.finished
        elif state.sse is not None:
            whole = True  # SSE has no end marker here: the body's clean end is the last word
        else:
            whole = call.body_read
        state.usage_final = (state.usage is not None and complete and whole
                             and not call.stream_error)

    # ---- reading response objects --------------------------------------------------------

    def read_chunk(self, state: CallState, call: GoogleCall, text: str, whole: bool = True) -> None:
        """One response object as text (an SSE data field, an array element, a body's tail)."""
        if whole and _ERROR_FIRST.match(text):
            try:
                payload = json.loads(text)
            except ValueError:
                pass
            else:
                self.read_object(state, call, payload)
                return
        depth = self.max_key_depth
        meta = extract_object(text, "usageMetadata", depth)
        if meta is not None:
            self.take_usage(state, call, meta)
        if state.response_model is None:
            model = extract_string(text, "modelVersion", depth)
            if model:
                state.response_model = model_name(model)
        if state.request_id is None:
            for key in self.id_keys:
                request_id = extract_string(text, key, depth)
                if request_id:
                    state.request_id = request_id
                    break

    def read_object(self, state: CallState, call: GoogleCall, payload: object) -> None:
        """One parsed response object, or a list of them (Google wraps some errors in one)."""
        if isinstance(payload, list):
            for item in payload:
                self.read_object(state, call, item)
            return
        if not isinstance(payload, dict):
            return
        if payload.get("error") is not None:
            state.error_type = error_type_of(payload) or state.error_type or "error"
            call.stream_error = True
            return
        response = self.unwrap(payload)
        meta = response.get("usageMetadata")
        if isinstance(meta, dict):
            self.take_usage(state, call, meta)
        model = response.get("modelVersion")
        if state.response_model is None and isinstance(model, str) and model:
            state.response_model = model_name(model)
        if state.request_id is None:
            for key in self.id_keys:
                request_id = payload.get(key) or response.get(key)
                if isinstance(request_id, str) and request_id:
                    state.request_id = request_id
                    break

    def take_usage(self, state: CallState, call: GoogleCall, meta: dict) -> None:
        """A usageMetadata: running totals, so it replaces what was read before."""
        traffic = meta.get("trafficType")
        if isinstance(traffic, str) and not call.tier_from_header:
            state.service_tier = tier_of(traffic)
        if not _COUNT_KEYS.isdisjoint(meta):
            state.usage = usage_from_metadata(meta)

    def read_count(self, state: CallState, payload: object) -> None:
        """countTokens: `{totalTokens, cachedContentTokenCount?}`, recorded as free input."""
        if not isinstance(payload, dict):
            return
        response = self.unwrap(payload)
        if "totalTokens" in response:
            state.usage = Usage(input_tokens=as_int(response.get("totalTokens")), raw=response)

    def read_embed(self, state: CallState, payload: object) -> None:
        """Embeddings: the Gemini API sends no usage (§3). Read one if a response ever has it."""
        if not isinstance(payload, dict):
            return
        meta = payload.get("usageMetadata")
        if isinstance(meta, dict) and ("promptTokenCount" in meta or "totalTokenCount" in meta):
            tokens = meta.get("promptTokenCount", meta.get("totalTokenCount"))
            state.usage = Usage(input_tokens=as_int(tokens), raw=meta)


class GeminiApi(GenerateContentAdapter):
    """generativelanguage.googleapis.com: `/{version}/models/{model}:{method}`."""

    name = "gemini"
    provider = "gemini"
    hosts = ("generativelanguage.googleapis.com",)

    _PATH = re.compile(r"/(?:v1|v1beta|v1alpha)/(models|tunedModels)/([^/:]+)"
                       r":(generateContent|streamGenerateContent|countTokens|embedContent"
                       r"|batchEmbedContents)")


    def route(self, state: CallState, path: str, payload: object) -> str | None:
        match = self._PATH.fullmatch(path)
        if match is None:
            return None
        collection, model, google_method = match.groups()
        model = unquote(model)
        # Tuned models keep their collection: "tunedModels/x" is not a base model's name.
        state.request_model = model if collection == "models" else f"tunedModels/{model}"
        return google_method


class VertexGemini(GenerateContentAdapter):
    """Vertex AI Gemini: `/{v1|v1beta1}/[projects/{p}/locations/{l}/]publishers/google/models/
    {model}:{method}` on the global and regional hosts (the short form is Vertex express mode)."""

    name = "vertex_gemini"
    provider = "vertex"
    hosts = VERTEX_HOSTS

    _PATH = re.compile(r"/(?:v1|v1beta1)/(?:projects/[^/]+/locations/[^/]+/)?"
                       r"publishers/google/models/([^/:]+)"
                       r":(generateContent|streamGenerateContent|countTokens)")


    def route(self, state: CallState, path: str, payload: object) -> str | None:
        match = self._PATH.fullmatch(path)
        if match is None:
            return None
        state.request_model = unquote(match.group(1))
        return match.group(2)


ADAPTERS = (GeminiApi(), VertexGemini())


# ---- usage arithmetic --------------------------------------------------------------------------


def usage_from_metadata(meta: dict) -> Usage:
    """Disjoint counters from a usageMetadata (providers.md §3 and §8).

    promptTokenCount includes cachedContentTokenCount; toolUsePromptTokenCount is extra input;
    thoughtsTokenCount is billed output outside candidatesTokenCount, except when the response
    counts it inside already (prompt + candidates + toolUse == total while thoughts > 0: LiteLLM's
    `is_candidate_token_count_inclusive`, extended with toolUse, which total also includes).
    """
    prompt = as_int(meta.get("promptTokenCount"))
    cached = as_int(meta.get("cachedContentTokenCount"))
    tool_use = as_int(meta.get("toolUsePromptTokenCount"))
    candidates = as_int(meta.get("candidatesTokenCount"))
    thoughts = as_int(meta.get("thoughtsTokenCount"))
    total = as_int(meta.get("totalTokenCount"))
    inclusive = thoughts > 0 and total > 0 and prompt + candidates + tool_use == total
    return Usage(
        input_tokens=max(prompt - cached, 0) + tool_use,
        cache_read_tokens=cached,
        output_tokens=candidates if inclusive else candidates + thoughts,
        reasoning_tokens=thoughts if "thoughtsTokenCount" in meta else None,
        raw=meta,
    )


def tier_of(value: str) -> str | None:
    """A trafficType or x-gemini-service-tier value as a service tier (None: standard)."""
    value = value.strip().upper()
    if value in _TIERS:
        return _TIERS[value]
    return value.lower() or None


def model_name(value: str) -> str:
    """'models/gemini-2.5-flash' (as some modelVersion values read) -> 'gemini-2.5-flash'."""
    return value[len("models/"):] if value.startswith("models/") else value


# ---- cutting values out of a response's text ---------------------------------------------------
#
# Streamed chunks are whole responses, mostly text or inline data; parsing each one whole would
# cost time in proportion to that content. Instead the last occurrence of a key is found from the
# end (Google serialises usageMetadata, modelVersion and responseId after candidates), its value
# is parsed alone, and the brackets closing after it tell how deep it was.

_DECODER = json.JSONDecoder()
_ERROR_FIRST = re.compile(r'\s*\[?\s*\{\s*"error"\s*:')  # Google error objects: `{"error": {…}}`
_OBJECT_VALUE = re.compile(r"\s*:\s*(?=\{)")
_STRING_VALUE = re.compile(r'\s*:\s*"((?:[^"\\]|\\.)*)"', re.DOTALL)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*+"', re.DOTALL)


def extract_object(text: str, key: str, max_depth: int = 1) -> dict | None:
    """The object value of the last `"key": {…}` in `text`, or None when that key sits deeper
    than `max_depth` (1: a key of the outermost object) or is cut off."""
    found = _last_key(text, key)
    if found < 0:
        return None
    match = _OBJECT_VALUE.match(text, found + len(key) + 2)
    if match is None:
        return None
    try:
        value, end = _DECODER.raw_decode(text, match.end())
    except ValueError:
        return None  # cut off (a body's tail), or not JSON
    if not isinstance(value, dict) or depth_after(text, end) > max_depth:
        return None
    return value


def extract_string(text: str, key: str, max_depth: int = 1) -> str | None:
    """The string value of the last `"key": "…"` in `text`, or None (see `extract_object`)."""
    found = _last_key(text, key)
    if found < 0:
        return None
    match = _STRING_VALUE.match(text, found + len(key) + 2)
    if match is None or depth_after(text, match.end()) > max_depth:
        return None
    value = match.group(1)
    if "\\" in value:
        try:
            value = json.loads(f'"{value}"')
        except ValueError:
            return None
    return value


def depth_after(text: str, position: int) -> int:
    """How many objects and arrays close after `position` (outside strings): the nesting depth of
    a value ending there, for a text that ends where its outermost object does."""
    rest = text[position:]
    if "\\" in rest:
        rest = _STRINGS.sub("", rest)
    elif '"' in rest:
        rest = "".join(rest.split('"')[::2])  # no escapes: every other piece is outside strings
    return rest.count("}") + rest.count("]") - rest.count("{") - rest.count("[")


def _last_key(text: str, key: str) -> int:
    """Offset of the last `"key"` that can be a key: a key's opening quote never follows a
    backslash, while inside a string the key's quotes would be escaped."""
    needle = f'"{key}"'
    end = len(text)
    while (found := text.rfind(needle, 0, end)) >= 0:
        if not found or text[found - 1] != "\\":
            return found
        end = found
    return -1


def _call(state: CallState) -> GoogleCall:
    call = state.decoder
    if not isinstance(call, GoogleCall):
        call = state.decoder = GoogleCall()
    return call

