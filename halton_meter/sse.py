"""Sans-IO incremental decoder for text/event-stream bodies (WHATWG HTML §9.2.5-9.2.6).

Bytes in, complete events out; chunk boundaries may fall anywhere, and memory stays bounded.
"""

import re
from dataclasses import dataclass

# §9.2.5: end-of-line = ( cr lf / cr / lf ). Greedy, so a CR LF inside one buffer is one match.
_LINE_END = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = b"\n"


@dataclass(slots=True)
class Event:
    event: str  # "message" when no event: field was given
    data: str  # data lines joined with "\n"
    id: str | None  # the stream's last event ID when this event was dispatched


class SSEDecoder:
    """Feed body bytes as they arrive; each call returns the events those bytes completed.

    An event with a line, or data lines together, longer than max_event_bytes is skipped up to
    its blank line and counted in `oversized_events`: memory stays under 2 * max_event_bytes
    plus one chunk.
    """

    def __init__(self, *, max_event_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_event_bytes = max_event_bytes
        self.oversized_events = 0
        self._buffer = bytearray()  # the current incomplete line, never a line end
        self._at_stream_start = True  # a BOM may still be arriving
        self._after_cr = False  # the last line ended on a CR that may be half of CR LF
        self._discarding_line = False  # dropping the rest of an oversized line
        self._skipping_event = False  # dropping lines up to the next blank line
        self._event_type = ""
        # The event's data lines joined by LF, as bytes: a list of one str per line would cost
        # ~50 bytes per short line, and a stream of tiny data lines would pass the bound 8-fold.
        self._data: bytearray | None = None
        self._data_bytes = 0
        self._last_event_id: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        if self._after_cr and chunk:
            # A CR ended the previous chunk and its line was processed at once (no latency);
            # a LF arriving now completes that same CR LF line end, so it must not count again.
            self._after_cr = False
            if chunk[:1] == _LF:
                chunk = chunk[1:]
        buffer = self._buffer
        # Everything already buffered was scanned and holds no line end: scan only new bytes.
        scan_from = len(buffer)
        buffer += chunk
        if self._at_stream_start:
            # §9.2.5: one leading U+FEFF is ignored; it may be split over several chunks.
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                return []
            self._at_stream_start = False
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
            scan_from = 0

        events: list[Event] = []
        line_start = 0
        for line_end in _LINE_END.finditer(buffer, scan_from):
            if self._discarding_line:
                self._discarding_line = False
            else:
                self._take_line(buffer, line_start, line_end.start(), events)
            line_start = line_end.end()
        if line_start == len(buffer) and line_start and buffer[-1] == _CR:
            self._after_cr = True
        del buffer[:line_start]  # O(1) in CPython: bytearray trims its head in place

        if self._discarding_line:
            buffer.clear()
        elif len(buffer) > self.max_event_bytes:
            # The unfinished line alone is past the bound: drop it, and its event, as it arrives.
            # The same line arriving whole is dropped by _take_line, so chunking cannot matter.
            self._drop_event()
            self._discarding_line = True
            buffer.clear()
        return events

    def close(self) -> list[Event]:
        """End of stream. §9.2.6: an event without its final blank line is not dispatched."""
        self._buffer.clear()
        self._at_stream_start = True
        self._after_cr = self._discarding_line = self._skipping_event = False
        self._reset_event()
        return []

    def _take_line(self, buffer: bytearray, start: int, end: int, events: list[Event]) -> None:
        if start == end:
            self._dispatch(events)
            return
        if self._skipping_event:
            return
        if end - start > self.max_event_bytes:
            self._drop_event()
            return
        if buffer[start] == 0x3A:  # ":" starts a comment (§9.2.6)
            return
        # Values are decoded whole (never per chunk), which keeps split multi-byte characters
        # intact; LF never occurs inside a UTF-8 sequence, so joined data decodes like its lines.
        name, _, value = buffer[start:end].partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data_bytes += end - start
            if self._data_bytes > self.max_event_bytes:
                self._drop_event()
            elif self._data is None:
                self._data = value
            else:
                self._data += b"\n"
                self._data += value
        elif name == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._last_event_id = value.decode("utf-8", "replace")
        # "retry" and unknown fields are ignored: a metering copy never reconnects.

    def _dispatch(self, events: list[Event]) -> None:
        if self._skipping_event:
            self._skipping_event = False
        elif self._data is not None:
            # §9.2.6: the last event ID buffer is not reset on dispatch; it lasts until the
            # server sends another id: field.
            data = self._data.decode("utf-8", "replace")
            events.append(Event(self._event_type or "message", data, self._last_event_id))
        # An event with no data field dispatches nothing but still resets its type (§9.2.6).
        self._reset_event()

    def _drop_event(self) -> None:
        if not self._skipping_event:
            self.oversized_events += 1
            self._skipping_event = True
        self._reset_event()

    def _reset_event(self) -> None:
        self._event_type = ""
        self._data = None
        self._data_bytes = 0
