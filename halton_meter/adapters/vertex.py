"""Vertex AI: Anthropic bodies under `publishers/anthropic` (Gemini bodies are in gemini.py).

`POST /v1/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:rawPredict` (JSON) and
`:streamRawPredict` (SSE) carry the Messages API's bodies and events (reference/providers.md §1);
the model is in the path, with `@date` versions (`claude-sonnet-4-5@20250929`), not in the body.
Token counting is `models/count-tokens:rawPredict`, with the model in the body.
"""

import re

from halton_meter.adapters.anthropic import AnthropicMessages, read_token_count
from halton_meter.adapters.base import BILL_FREE, BILL_TOKENS

# Vertex AI locations with a regional endpoint "{location}-aiplatform.googleapis.com", plus the
# global endpoint (genai-sdk _api_client.py).
LOCATIONS = (
    "us-central1", "us-east1", "us-east4", "us-east5", "us-south1", "us-west1", "us-west2",
    "us-west3", "us-west4", "northamerica-northeast1", "northamerica-northeast2",
    "southamerica-east1", "southamerica-west1", "europe-west1", "europe-west2", "europe-west3",
    "europe-west4", "europe-west6", "europe-west8", "europe-west9", "europe-west10",
    "europe-west12", "europe-north1", "europe-central2", "europe-southwest1", "asia-east1",
    "asia-east2", "asia-northeast1", "asia-northeast2", "asia-northeast3", "asia-south1",
    "asia-southeast1", "asia-southeast2", "australia-southeast1", "australia-southeast2",
    "me-central1", "me-central2", "me-west1", "africa-south1",
)
HOSTS = ("aiplatform.googleapis.com",) + tuple(f"{location}-aiplatform.googleapis.com"
                                               for location in LOCATIONS)

_ANTHROPIC_PATH = re.compile(
    r"^/v1(?:beta1)?/(?:projects/[^/]+/locations/[^/]+/)?publishers/anthropic/models/"
    r"([^/:]+):(rawPredict|streamRawPredict)$"
)


class VertexAnthropic(AnthropicMessages):
    name = "vertex.anthropic"
    provider = "vertex"
    hosts = HOSTS

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and _ANTHROPIC_PATH.match(path) is not None

    def on_request(self, state, method, path, query, payload) -> None:
        model, verb = _ANTHROPIC_PATH.match(path).groups()
        super().on_request(state, method, path, query, payload)
        if model == "count-tokens":
            state.endpoint, state.billing = "count_tokens", BILL_FREE
        else:
            state.endpoint, state.billing = "messages", BILL_TOKENS
            state.request_model = model
            state.is_stream = state.is_stream or verb == "streamRawPredict"

    def on_json(self, state, payload) -> None:
        if state.billing == BILL_FREE:
            read_token_count(state, payload)
            return
        super().on_json(state, payload)


ADAPTERS = (VertexAnthropic(),)
