"""The side copy of one call: decodes and parses what the relay forwarded, never touching it.

Every entry point swallows parser failures: the first one is logged with the call id, the call is
marked unparsed, and later bytes are ignored. Nothing here can delay or alter the forward path.
"""

from __future__ import annotations

import logging

from halton_meter.adapters.base import MAX_REQUEST_COPY_BYTES, REQUEST_SCAN_BYTES, Adapter, CallState
from halton_meter.bodies import BodyCapture
from halton_meter.content_coding import ContentDecoder
from halton_meter.http1 import RequestHead, ResponseHead

log = logging.getLogger(__name__)


class Tap:
    __slots__ = ("adapter", "call_id", "capture", "state", "parse_error", "_request", "_request_body",
                 "_request_truncated", "_request_tail", "_request_complete", "_request_parsed",
                 "_decoder", "_parsing")

    def __init__(self, adapter: Adapter, call_id: str, request: RequestHead,
                 capture: BodyCapture | None = None) -> None:
        self.adapter = adapter
        self.call_id = call_id
        self.capture = capture  # keeps the bodies for storage (bodies.py) when capture is on
        self.state: CallState | None = None
        self.parse_error: str | None = None
        self._request = request
        self._request_body = bytearray()
        self._request_truncated = False
        self._request_tail = b""
        self._request_complete = False
        self._request_parsed = False
        self._decoder: ContentDecoder | None = None
        self._parsing = False  # the adapter is being fed the response

    def request_chunk(self, data: bytes) -> None:
        if self.capture is not None:
            self.capture.add_request(data)
        if self._request_truncated:
            # Too large to parse whole: keep the first and the last bytes for a model scan.
            self._request_tail = (self._request_tail + data)[-REQUEST_SCAN_BYTES:]
        elif len(self._request_body) + len(data) > MAX_REQUEST_COPY_BYTES:
            self._request_truncated = True
            self._request_tail = (bytes(self._request_body[-REQUEST_SCAN_BYTES:]) + data)[-REQUEST_SCAN_BYTES:]
            del self._request_body[REQUEST_SCAN_BYTES:]
        else:
            self._request_body += data

    def request_complete(self) -> None:
        """The whole request body has been seen (cheap: parsing waits for `request_done`)."""
        self._request_complete = True

    def request_done(self) -> None:
        """Parse the request now; a body never marked complete is parsed as partial."""
        if self._request_parsed:
            return
        self._request_parsed = True
        try:
            body = bytes(self._request_body)
            if self._request_truncated:
                body += b"\n" + self._request_tail
            self._request_body = bytearray()
            self._request_tail = b""
            whole = self._request_complete and not self._request_truncated
            self.state = self.adapter.start(self._request, body, whole)
        except Exception as exc:  # noqa: BLE001 - the parser must never break the relay
            self._fail(exc)

    def response_head(self, head: ResponseHead) -> None:
        self.request_done()  # a provider may answer before the whole body was sent
        if self.capture is not None:
            self.capture.response_headers = list(head.headers.fields)
        if self.state is None and self.capture is None:
            return
        try:
            self._decoder = ContentDecoder(head.headers.get("content-encoding"))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return
        if self.state is None:
            return
        try:
            self.adapter.response(self.state, head)
            self._parsing = True
        except Exception as exc:  # noqa: BLE001 - not parsed; still stored
            self._note_failure(exc)

    def response_chunk(self, data: bytes) -> None:
        decoder = self._decoder
        if decoder is None:
            return
        if decoder.is_identity:
            self._take(data)
            return
        try:
            # Bounded pieces: a small compressed read can inflate to megabytes.
            for piece in decoder.feed_iter(data):
                self._take(piece)
        except Exception as exc:  # noqa: BLE001 - undecodable: nothing more to parse or store
            self._fail(exc)

    def finish(self, complete: bool) -> CallState | None:
        self.request_done()
        if self._decoder is not None and complete:
            try:
                tail = self._decoder.flush()
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)
            else:
                if tail:
                    self._take(tail)
        if self.state is None or self.parse_error is not None:
            return self.state
        try:
            return self.adapter.finish(self.state, complete)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return self.state

    def _take(self, data: bytes) -> None:
        """One decoded piece of the response body: kept for storage, then parsed."""
        if self.capture is not None:
            self.capture.add_response(data)
        if self._parsing:
            try:
                self.adapter.feed(self.state, data)
            except Exception as exc:  # noqa: BLE001 - the parser stops; storage goes on
                self._parsing = False
                self._note_failure(exc)

    def _fail(self, exc: Exception) -> None:
        self._decoder = None  # nothing more is parsed or stored
        self._parsing = False
        self._note_failure(exc)

    def _note_failure(self, exc: Exception) -> None:
        if self.parse_error is not None:
            return
        self.parse_error = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("parse_failed call_id=%s adapter=%s error=%s", self.call_id, self.adapter.name,
                    type(exc).__name__)
