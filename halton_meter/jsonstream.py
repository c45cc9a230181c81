"""Sans-IO splitter for a streamed top-level JSON array: bytes in, each element's bytes out.

Gemini's `:streamGenerateContent` without `alt=sse` answers one JSON array (`[{…},\\r\\n{…}]`)
written element by element; this hands over every element as soon as its closing brace arrives.
Strings (braces, brackets and escaped quotes inside them) are crossed by regexes and bytes.find
over new bytes only, never a Python step per byte; memory stays under `max_element_bytes` plus
one chunk.
"""

from __future__ import annotations

import re

# Outside strings: runs of uninteresting bytes and whole strings, in one C-level match. It stops at
# a bracket, or at the quote of a string that is not complete in the buffer yet or has a run of
# over 256 plain bytes: those are crossed with bytes.find, at memchr speed (a regex: ~250 MB/s).
# Possessive quantifiers (3.11+) keep a failed string match from backtracking.
_SKIP = re.compile(rb'(?:[^"{}\[\]]++|"[^"\\]{0,256}+(?:\\.[^"\\]{0,256}+)*+")*+', re.DOTALL)
# Inside a string: up to its closing quote, the end of the buffer, or a final lone backslash.
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)

_QUOTE = 0x22
_BACKSLASH = 0x5C
_OPEN_BRACE = 0x7B
_OPEN_BRACKET = 0x5B


class JsonArraySplitter:
    """Feed body bytes as they arrive; each call returns the elements those bytes completed.

    Elements are the objects of a top-level array. A top-level object instead of an array (an
    error body, or a server that answered a stream request with one response) is one element.
    An element longer than `max_element_bytes` is skipped and counted in `oversized_elements`.
    """

    def __init__(self, *, max_element_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_element_bytes = max_element_bytes
        self.oversized_elements = 0
        self.elements = 0
        self.dropped_tail_bytes = 0  # bytes of an unfinished element dropped by close()
        self._buffer = bytearray()
        self._scan = 0  # offset in _buffer up to which bytes were scanned
        self._depth = 0  # open brackets and braces, top-level array included
        self._in_string = False
        self._element_start = -1  # offset in _buffer of the open element, -1 when none
        self._element_depth = 0  # depth at which the open element started
        self._skipping = False  # the open element is oversized: its bytes are not kept
        self._started = False  # a top-level value has opened
        self._finished = False  # the top-level value has closed

    @property
    def finished(self) -> bool:
        """True once the top-level array (or object) has closed: the body is whole."""
        return self._finished

    @property
    def buffered_bytes(self) -> int:
        """Bytes held now: the open element's so far, or a few unscanned ones."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk or self._finished:
            return []
        buffer = self._buffer
        buffer += chunk
        elements: list[bytes] = []
        pos = self._scan
        end = len(buffer)
        depth = self._depth
        while pos < end:
            if self._in_string:
                quote = buffer.find(b'"', pos)
                if quote >= 0 and _is_escaped(buffer, quote):
                    # Escaped quotes: the regex, slower on plain bytes, crosses escapes in C.
                    quote = _STRING_REST.match(buffer, quote + 1).end()
                    if quote == end or buffer[quote] != _QUOTE:
                        quote = -1
                if quote < 0:
                    # The string continues in the next chunk. Only a final unpaired backslash is
                    # scanned again (it escapes the next chunk's first byte): keeping or walking
                    # back over the whole run made a string of backslashes quadratic and unbounded.
                    pos = end - _trailing_backslashes(buffer, pos, end) % 2
                    break
                self._in_string = False
                pos = quote + 1
                continue
            pos = _SKIP.match(buffer, pos).end()
            if pos == end:
                break
            byte = buffer[pos]
            if byte == _QUOTE:
                self._in_string = True
                pos += 1
                continue
            if byte == _OPEN_BRACE or byte == _OPEN_BRACKET:
                if byte == _OPEN_BRACE and self._element_start < 0 and depth <= 1:
                    self._element_start = pos
                    self._element_depth = depth
                depth += 1
                self._started = True
            else:
                depth = depth - 1 if depth > 0 else 0  # a stray closer must not go negative
                if self._element_start >= 0 and depth == self._element_depth:
                    if self._skipping:
                        self._skipping = False
                    elif pos + 1 - self._element_start > self.max_element_bytes:
                        self.oversized_elements += 1  # arrived whole: same verdict as in pieces
                    else:
                        elements.append(bytes(buffer[self._element_start : pos + 1]))
                        self.elements += 1
                    self._element_start = -1
                if depth <= 0 and self._started:
                    self._finished = True
                    pos += 1
                    break
            pos += 1
        self._depth = depth
        self._scan = pos
        self._trim()
        return elements

    def close(self) -> list[bytes]:
        """End of body. An element without its closing brace is dropped, without error."""
        if self._element_start >= 0 and not self._skipping:
            self.dropped_tail_bytes = len(self._buffer) - self._element_start
        self._buffer = bytearray()
        self._scan = 0
        self._element_start = -1
        self._skipping = False
        self._in_string = False
        return []

    def _trim(self) -> None:
        """Forget the bytes no element needs; skip an element that outgrew the bound."""
        buffer = self._buffer
        if self._finished:
            buffer.clear()  # the rest of the chunk that closed the array: ignored, so not kept
            self._scan = 0
            return
        if self._element_start >= 0 and not self._skipping:
            if len(buffer) - self._element_start > self.max_element_bytes:
                self._skipping = True
                self.oversized_elements += 1
            else:
                keep_from = self._element_start
                self._element_start = 0
                del buffer[:keep_from]
                self._scan -= keep_from
                return
        # No element kept: only the unscanned bytes (a trailing run of backslashes) are needed.
        if self._element_start >= 0:
            self._element_start = 0  # still open, still skipped: any offset below _scan will do
        del buffer[: self._scan]
        self._scan = 0


def _is_escaped(buffer: bytearray, quote: int) -> bool:
    """True when the quote at `quote` follows an odd run of backslashes (`\\"`, not `\\\\"`)."""
    return _trailing_backslashes(buffer, 0, quote) % 2 == 1


def _trailing_backslashes(buffer: bytearray, start: int, end: int) -> int:
    """How many backslashes end `buffer[start:end]`."""
    run = end
    while run > start and buffer[run - 1] == _BACKSLASH:
        run -= 1
    return end - run
