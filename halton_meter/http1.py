"""Sans-IO HTTP/1.1: parsing message heads and deciding body framing (RFC 9112).

No sockets here: the relay reads bytes, these functions say what the bytes mean. Heads keep their
raw bytes so a response can be forwarded byte for byte.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_COUNT = 200
MAX_CHUNK_LINE_BYTES = 4096
MAX_TRAILER_BYTES = 16 * 1024

# RFC 9110 5.6.2: tchar
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# RFC 9110 5.1 field-name = token; one regex match instead of a loop per character.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_TARGET_FORBIDDEN = re.compile(r"[^\x21-\x7e]")


class ProtocolError(ValueError):
    """Bytes that are not valid HTTP/1.1; `status` is what a server should answer (400, 431, 501…)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class BodyKind(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    CLOSE = "close"  # the body runs until the connection closes (responses only)


@dataclass(slots=True)
class Headers:
    """Header fields in wire order with their original case; lookups are case-insensitive."""

    fields: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.fields:
            if key.lower() == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.fields if key.lower() == name]

    def remove(self, name: str) -> list[str]:
        """Drop every field called `name`; returns the dropped values."""
        name = name.lower()
        dropped = [value for key, value in self.fields if key.lower() == name]
        if dropped:
            self.fields = [(k, v) for k, v in self.fields if k.lower() != name]
        return dropped

    def set(self, name: str, value: str) -> None:
        """Replace every field called `name` by one, keeping the first one's position."""
        lowered = name.lower()
        for index, (key, _) in enumerate(self.fields):
            if key.lower() == lowered:
                self.fields[index] = (key, value)
                self.fields = self.fields[: index + 1] + [
                    f for f in self.fields[index + 1 :] if f[0].lower() != lowered
                ]
                return
        self.fields.append((name, value))

    def has_token(self, name: str, token: str) -> bool:
        """True when a comma-separated field (Connection, Transfer-Encoding…) lists `token`."""
        token = token.lower()
        return any(
            part.strip().lower() == token for value in self.get_all(name) for part in value.split(",")
        )


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: Headers

    def serialize(self) -> bytes:
        lines = [f"{self.method} {self.target} {self.version}"]
        lines.extend(f"{key}: {value}" for key, value in self.headers.fields)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(slots=True)
class ResponseHead:
    version: str
    status: int
    reason: str
    headers: Headers
    raw: bytes


def parse_request_head(raw: bytes) -> RequestHead:
    """Parse a request head ending in CRLF CRLF (as returned by readuntil)."""
    start_line, headers = _split_head(raw)
    parts = start_line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise ProtocolError("malformed request line")
    method, target, version = parts
    if not all(c in _TOKEN_CHARS for c in method.encode("latin-1")):
        raise ProtocolError("malformed method")
    if _TARGET_FORBIDDEN.search(target):
        # Control bytes or non-ASCII in the target: an upstream might split the line where we
        # did not (a bare LF), so the request is refused rather than forwarded.
        raise ProtocolError("invalid character in request target")
    _check_version(version)
    return RequestHead(method, target, version, headers)


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a response head ending in CRLF CRLF; keeps `raw` for byte-for-byte forwarding."""
    try:
        start_line, headers = _split_head(raw)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), 502) from None  # a broken upstream head: our client gets 502
    parts = start_line.split(" ", 2)
    if len(parts) < 2:
        raise ProtocolError(f"malformed status line {start_line[:80]!r}", 502)
    version, status_text = parts[0], parts[1]
    _check_version(version, status=502)
    # RFC 9110 15: the first digit is the class, 1 to 5 (600-999 pass: clients treat them as 5xx).
    if len(status_text) != 3 or not _is_ascii_digits(status_text) or status_text[0] == "0":
        raise ProtocolError(f"malformed status code {status_text[:10]!r}", 502)
    return ResponseHead(version, int(status_text), parts[2] if len(parts) == 3 else "", headers, raw)


def request_framing(head: RequestHead) -> tuple[BodyKind, int]:
    """How the request body is delimited (RFC 9112 6.3); rejects ambiguous framing."""
    transfer_encoding = head.headers.get_all("transfer-encoding")
    lengths = head.headers.get_all("content-length")
    if transfer_encoding:
        # Both present is the classic request-smuggling shape: refuse rather than guess.
        if lengths:
            raise ProtocolError("request has both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for v in transfer_encoding for c in v.split(",") if c.strip()]
        if not codings or codings[-1] != "chunked":
            raise ProtocolError("request Transfer-Encoding must end with chunked", 501)
        return BodyKind.CHUNKED, 0
    if lengths:
        length = _content_length(lengths, status=400)
        return (BodyKind.LENGTH, length) if length else (BodyKind.NONE, 0)
    return BodyKind.NONE, 0


def response_framing(request_method: str, head: ResponseHead) -> tuple[BodyKind, int]:
    """How the response body is delimited (RFC 9112 6.3)."""
    status = head.status
    if request_method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return BodyKind.NONE, 0
    transfer_encoding = head.headers.get_all("transfer-encoding")
    if transfer_encoding:
        codings = [c.strip().lower() for v in transfer_encoding for c in v.split(",") if c.strip()]
        if codings and codings[-1] == "chunked":
            return BodyKind.CHUNKED, 0
        return BodyKind.CLOSE, 0
    lengths = head.headers.get_all("content-length")
    if lengths:
        length = _content_length(lengths, status=502)
        return (BodyKind.LENGTH, length) if length else (BodyKind.NONE, 0)
    return BodyKind.CLOSE, 0


def wants_close(version: str, headers: Headers) -> bool:
    """True when the sender asks for the connection to close after this message."""
    if headers.has_token("connection", "close"):
        return True
    return version == "HTTP/1.0" and not headers.has_token("connection", "keep-alive")


class ChunkedDecoder:
    """Incremental decoder of the chunked transfer coding (RFC 9112 7.1).

    `feed` returns how many bytes of the input belong to this message and the payload pieces
    (memoryviews into the input, no copies) found in them. Bytes after the end belong to the
    next message. The relay forwards the raw bytes; only the payload goes to the parser.
    """

    __slots__ = ("_state", "_line", "_remaining", "_trailer_bytes", "done")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._line = bytearray()
        self._remaining = 0
        self._trailer_bytes = 0
        self.done = False

    @property
    def data_remaining(self) -> int:
        """Payload bytes still due in the current chunk; 0 when a framing line comes next.

        A reader that must not read past the message end reads this many bytes, or one line.
        """
        return self._remaining if self._state == self._DATA else 0

    def feed(self, data: bytes) -> tuple[int, list[memoryview]]:
        payload: list[memoryview] = []
        view = memoryview(data)
        index, end = 0, len(data)
        while index < end and not self.done:
            if self._state == self._DATA:
                take = min(self._remaining, end - index)
                payload.append(view[index : index + take])
                index += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
                continue
            newline = data.find(b"\n", index)
            if newline < 0:
                self._line += view[index:]
                self._check_line_length()
                index = end
                break
            self._line += view[index:newline]
            index = newline + 1
            self._check_line_length()
            line = bytes(self._line)
            self._line.clear()
            self._line_complete(line)
        return index, payload

    def _check_line_length(self) -> None:
        limit = MAX_TRAILER_BYTES if self._state == self._TRAILER else MAX_CHUNK_LINE_BYTES
        if len(self._line) > limit:
            raise ProtocolError("chunk size line or trailer too long")

    def _line_complete(self, line: bytes) -> None:
        if not line.endswith(b"\r"):
            raise ProtocolError("chunked framing line not terminated by CRLF")
        line = line[:-1]
        if b"\r" in line or b"\x00" in line:
            # RFC 9112 2.2: a bare CR is invalid. The line is relayed raw, and an upstream that
            # ends lines at a bare CR would read different framing than we did.
            raise ProtocolError("bare CR or NUL in a chunked framing line")
        if self._state == self._SIZE:
            size_text = line.split(b";", 1)[0].rstrip(b" \t")
            if not size_text or len(size_text) > 16 or not all(c in _HEX_DIGITS for c in size_text):
                raise ProtocolError(f"invalid chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size:
                self._state, self._remaining = self._DATA, size
            else:
                self._state = self._TRAILER
        elif self._state == self._DATA_END:
            if line:
                raise ProtocolError("chunk data longer than its declared size")
            self._state = self._SIZE
        else:  # trailer section: fields are relayed raw and otherwise ignored
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > MAX_TRAILER_BYTES:
                raise ProtocolError("chunked trailer section too large")
            if not line:
                self.done = True


def _split_head(raw: bytes) -> tuple[str, Headers]:
    if len(raw) > MAX_HEAD_BYTES:
        raise ProtocolError("message head too large", 431)
    text = raw.decode("latin-1")
    if text.endswith("\r\n\r\n"):
        text = text[:-4]
    lines = text.split("\r\n")
    # RFC 9112 2.2: a recipient MAY ignore at least one empty line before the request-line.
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        raise ProtocolError("empty message head")
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise ProtocolError("too many header fields", 431)
    fields: list[tuple[str, str]] = []
    # Messages name the field's position, never its text: header lines carry API keys.
    for number, line in enumerate(lines[1:], start=1):
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError(f"malformed header line {number} (no colon)")
        if not name or line[0] in " \t":
            # obs-fold (RFC 9112 5.2) and empty names are rejected outright.
            raise ProtocolError(f"malformed header line {number} (folded or unnamed)")
        if _FIELD_NAME.fullmatch(name) is None:
            # Whitespace before the colon is forbidden (RFC 9112 5.1): smuggling vector.
            raise ProtocolError(f"malformed header name on line {number}")
        if "\r" in value or "\n" in value or "\x00" in value:
            raise ProtocolError(f"invalid character in header line {number}")
        fields.append((name, value.strip(" \t")))
    return lines[0], Headers(fields)


def _check_version(version: str, status: int = 400) -> None:
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(f"unsupported HTTP version {version[:20]!r}", 505 if status == 400 else status)


def _content_length(values: list[str], status: int) -> int:
    # RFC 9110 8.6: a list of identical values may be collapsed; anything else is an error.
    parts = {part.strip() for value in values for part in value.split(",")}
    if len(parts) != 1:
        raise ProtocolError("conflicting Content-Length values", status)
    text = parts.pop()
    if not _is_ascii_digits(text) or len(text) > 18:
        raise ProtocolError(f"invalid Content-Length {text[:20]!r}", status)
    return int(text)


def _is_ascii_digits(text: str) -> bool:
    # str.isdigit() also accepts "²" and other Latin-1 digits that int() refuses with a ValueError.
    return text.isascii() and text.isdigit()
