"""Gemini CLI's Code Assist backend, cloudcode-pa.googleapis.com `/v1internal:{method}`: Gemini
responses wrapped as `{"response": {…}, "traceId": …}` (reference/providers.md §4.2), read with
gemini.py's `GenerateContentAdapter`.
"""

from __future__ import annotations

import re

from halton_meter.adapters.base import BILL_NONE, CallState, get_path
from halton_meter.adapters.gemini import GenerateContentAdapter, model_name

_VERSION = "/v1internal"
_METERED = ("generateContent", "streamGenerateContent", "countTokens")
_WORD_START = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NOT_WORD = re.compile(r"[^a-z0-9]+")


class CodeAssist(GenerateContentAdapter):
    """Generation and token counting are metered; setup calls (loadCodeAssist, onboardUser,
    listExperiments, retrieveUserQuota, …) are recorded with nothing billable."""

    name = "code_assist"
    provider = "code_assist"
    hosts = ("cloudcode-pa.googleapis.com",)
    # gemini-cli converter.ts: the response id it reports is the wrapper's traceId.
    id_keys = ("traceId", "responseId")
    max_key_depth = 2  # usageMetadata and modelVersion sit inside the `response` wrapper

    def matches(self, method: str, path: str) -> bool:
        # `/v1internal:{method}`, and `/v1internal/event:receive` (gemini-cli server.ts).
        return path.startswith(_VERSION) and path[len(_VERSION):len(_VERSION) + 1] in (":", "/")

    def route(self, state: CallState, path: str, payload: object) -> str | None:
        google_method = path[len(_VERSION) + 1:]
        if google_method not in _METERED:
            state.endpoint = endpoint_name(google_method)
            state.billing = BILL_NONE
            return None
        # generateContent bodies carry `model` at the top; countTokens bodies carry
        # `request.model` as "models/{model}" (gemini-cli converter.ts toCountTokenRequest).
        model = get_path(payload, "model")
        if not isinstance(model, str) or not model:
            model = get_path(payload, "request", "model")
        if isinstance(model, str) and model:
            state.request_model = model_name(model)
        return google_method

    def unwrap(self, payload: dict) -> dict:
        response = payload.get("response")
        return response if isinstance(response, dict) else payload


def endpoint_name(google_method: str) -> str:
    """'loadCodeAssist' -> 'load_code_assist', 'event:receive' -> 'event_receive'."""
    name = _NOT_WORD.sub("_", _WORD_START.sub("_", google_method).lower()).strip("_")
    return name[:64] or "unknown"


ADAPTERS = (CodeAssist(),)
