"""What every adapter is: a sans-IO reader of one call's bytes, fed by the relay's tap.

The base class already does what every provider shares: the requested model and stream flag from
the request body, stream detection from the response, SSE decoding, a bounded JSON copy.
Provider adapters (next) override `on_event` / `on_json` to read usage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from halton_meter.http1 import RequestHead, ResponseHead
from halton_meter.sse import Event, SSEDecoder

MAX_REQUEST_COPY_BYTES = 1 << 20
# JSON bodies are parsed whole at the end, on the event loop: keep that parse short (~3 ms).
MAX_JSON_RESPONSE_BYTES = 2 << 20


@dataclass(slots=True)
class CallState:
    """What an adapter learned about one call so far."""

    model: str | None = None
    is_stream: bool = False
    response_model: str | None = None
    sse: SSEDecoder | None = None
    json_body: bytearray | None = None
    json_truncated: bool = False


class Adapter:
    """Base adapter: pure functions of bytes. Raising anywhere marks the call `unparsed`."""

    name = "generic"

    def start(self, request: RequestHead, body: bytes, body_complete: bool) -> CallState:
        state = CallState()
        content_type = (request.headers.get("content-type") or "").lower()
        if body and body_complete and "json" in content_type:
            payload = json.loads(body)
            if isinstance(payload, dict):
                model = payload.get("model")
                state.model = model if isinstance(model, str) else None
                state.is_stream = payload.get("stream") is True
        return state

    def response(self, state: CallState, head: ResponseHead) -> None:
        content_type = (head.headers.get("content-type") or "").lower()
        if content_type.startswith("text/event-stream"):
            state.is_stream = True
            state.sse = SSEDecoder()
        elif "json" in content_type:
            state.json_body = bytearray()

    def feed(self, state: CallState, payload: bytes) -> None:
        if state.sse is not None:
            for event in state.sse.feed(payload):
                self.on_event(state, event)
        elif state.json_body is not None and not state.json_truncated:
            if len(state.json_body) + len(payload) > MAX_JSON_RESPONSE_BYTES:
                state.json_truncated = True
                state.json_body = None
            else:
                state.json_body += payload

    def finish(self, state: CallState, complete: bool) -> CallState:
        """`complete` is False when the response ended early (cancel, reset): parse what was seen."""
        if state.sse is not None:
            for event in state.sse.close():
                self.on_event(state, event)
        elif state.json_body is not None and complete:
            self.on_json(state, json.loads(state.json_body) if state.json_body else None)
        return state

    def on_event(self, state: CallState, event: Event) -> None:
        if event.data.startswith("{") and '"model"' in event.data:
            self._note_model(state, json.loads(event.data))

    def on_json(self, state: CallState, payload: object) -> None:
        self._note_model(state, payload)

    @staticmethod
    def _note_model(state: CallState, payload: object) -> None:
        if not isinstance(payload, dict):
            return
        message = payload.get("message")
        holder = message if isinstance(message, dict) and "model" in message else payload
        model = holder.get("model")
        if isinstance(model, str):
            state.response_model = model
