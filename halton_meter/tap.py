"""The side copy of one call: decodes and parses what the relay forwarded, never touching it.

Every entry point swallows parser failures: the first one is logged with the call id, the call is
marked unparsed, and later bytes are ignored. Nothing here can delay or alter the forward path.
"""

from __future__ import annotations

import logging

from halton_meter.adapters.base import MAX_REQUEST_COPY_BYTES, REQUEST_SCAN_BYTES, Adapter, CallState
from halton_meter.content_coding import ContentDecoder
from halton_meter.http1 import RequestHead, ResponseHead

log = logging.getLogger(__name__)


class Tap:
    __slots__ = ("adapter", "call_id", "state", "parse_error", "_request", "_request_body",
                 "_request_truncated", "_request_tail", "_request_complete", "_request_parsed",
                 "_decoder")

    def __init__(self, adapter: Adapter, call_id: str, request: RequestHead) -> None:
        self.adapter = adapter
        self.call_id = call_id
        self.state: CallState | None = None
        self.parse_error: str | None = None
        self._request = request
        self._request_body = bytearray()
        self._request_truncated = False
        self._request_tail = b""
        self._request_complete = False
        self._request_parsed = False
        self._decoder: ContentDecoder | None = None

    def request_chunk(self, data: bytes) -> None:
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
        if self.state is None:
            return
        try:
            self._decoder = ContentDecoder(head.headers.get("content-encoding"))
            self.adapter.response(self.state, head)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def response_chunk(self, data: bytes) -> None:
        if self._decoder is None:
            return
        try:
            if self._decoder.is_identity:
                self.adapter.feed(self.state, data)
            else:
                # Bounded pieces: a small compressed read can inflate to megabytes.
                for piece in self._decoder.feed_iter(data):
                    self.adapter.feed(self.state, piece)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def finish(self, complete: bool) -> CallState | None:
        self.request_done()
        if self.state is None or self.parse_error is not None:
            return self.state
        try:
            if self._decoder is not None:
                tail = self._decoder.flush() if complete else b""
                if tail:
                    self.adapter.feed(self.state, tail)
            return self.adapter.finish(self.state, complete)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return self.state

    def _fail(self, exc: Exception) -> None:
        self.parse_error = f"{type(exc).__name__}: {exc}"[:500]
        self._decoder = None
        log.warning("parse_failed call_id=%s adapter=%s error=%s", self.call_id, self.adapter.name,
                    type(exc).__name__)
