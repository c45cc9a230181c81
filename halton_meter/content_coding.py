"""Incremental Content-Encoding decoding (gzip, deflate) of the parser's private copy of a body.

Output comes out in pieces of bounded size, so a decompression bomb costs time, never memory.
"""

import zlib
from collections.abc import Iterator

# RFC 9110 §8.4.1: "x-gzip" is an alias of "gzip"; "identity" means no coding at all.
_GZIP_CODINGS = frozenset({"gzip", "x-gzip"})
_SUPPORTED_CODINGS = _GZIP_CODINGS | {"deflate"}
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer
_ZLIB_WBITS = zlib.MAX_WBITS  # RFC 1950 wrapper, what RFC 9110 §8.4.1.2 means by "deflate"
_RAW_WBITS = -zlib.MAX_WBITS  # bare RFC 1951 data, which some servers send as "deflate"


class UnsupportedEncoding(ValueError):
    """A content-coding the standard library cannot decode (br, zstd, compress, ...)."""


class ContentDecoder:
    """Undo a response's Content-Encoding chunk by chunk; every output piece is bounded."""

    def __init__(
        self, content_encoding: str | None, *, max_output_bytes_per_feed: int = 1 << 20
    ) -> None:
        if max_output_bytes_per_feed < 1:  # zlib reads a max_length of 0 as "no limit"
            raise ValueError("max_output_bytes_per_feed must be at least 1")
        self._max_piece_bytes = max_output_bytes_per_feed
        # RFC 9110 §8.4: codings are listed in the order they were applied, so undo them
        # from last to first.
        self._stages = [_ZlibStage(coding) for coding in reversed(_codings(content_encoding))]

    @property
    def is_identity(self) -> bool:
        return not self._stages

    def feed(self, chunk: bytes) -> bytes:
        """All output for `chunk` at once; prefer `feed_iter` where a bomb must not cost memory."""
        if not self._stages:
            return chunk
        return b"".join(self.feed_iter(chunk))

    def feed_iter(self, chunk: bytes) -> Iterator[bytes]:
        """Yield the output for `chunk` in pieces of at most max_output_bytes_per_feed bytes.

        Consume the iterator fully before the next call: unread output is lost otherwise.
        """
        if not self._stages:
            if chunk:
                yield chunk
            return
        yield from self._through(0, chunk)

    def flush(self) -> bytes:
        """End of body: output still held back. A truncated body is not an error here; the
        caller knows whether the transfer was complete."""
        pieces: list[bytes] = []
        for index, stage in enumerate(self._stages):
            pieces.extend(self._through(index + 1, stage.flush()))
        return b"".join(pieces)

    def _through(self, index: int, data: bytes) -> Iterator[bytes]:
        # Each stage yields bounded pieces and each piece goes through the next stage before
        # the following one is made, so stacked codings stay bounded too.
        if index == len(self._stages):
            if data:
                yield data
            return
        for piece in self._stages[index].decompress(data, self._max_piece_bytes):
            yield from self._through(index + 1, piece)


def _codings(content_encoding: str | None) -> list[str]:
    codings = []
    for coding in (content_encoding or "").split(","):
        coding = coding.strip().lower()
        if coding in ("", "identity"):
            continue
        if coding not in _SUPPORTED_CODINGS:
            raise UnsupportedEncoding(f"unsupported content-coding {coding!r}")
        codings.append(coding)
    return codings


class _ZlibStage:
    """One gzip or deflate layer."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._is_gzip = coding in _GZIP_CODINGS
        # deflate waits for its first two bytes to tell a zlib wrapper from raw data.
        self._decompressor = zlib.decompressobj(_GZIP_WBITS) if self._is_gzip else None
        self._sniffed = b""
        self._is_finished = False  # deflate ended; anything after it is ignored

    def decompress(self, data: bytes, max_length: int) -> Iterator[bytes]:
        if self._decompressor is None:
            data = self._sniffed + data
            if len(data) < 2:
                self._sniffed = data
                return
            self._sniffed = b""
            self._decompressor = zlib.decompressobj(_deflate_wbits(data))
        try:
            yield from self._drain(data, max_length)
        except zlib.error as exc:
            raise ValueError(f"corrupt {self._coding} content-coding: {exc}") from exc

    def flush(self) -> bytes:
        try:
            if self._decompressor is None:  # fewer than two bytes ever arrived
                self._decompressor = zlib.decompressobj(_deflate_wbits(self._sniffed))
                data, self._sniffed = self._sniffed, b""
                return self._decompressor.decompress(data) + self._decompressor.flush()
            return b"" if self._is_finished else self._decompressor.flush()
        except zlib.error as exc:
            raise ValueError(f"corrupt {self._coding} content-coding: {exc}") from exc

    def _drain(self, data: bytes, max_length: int) -> Iterator[bytes]:
        decompressor = self._decompressor
        is_output_full = False
        # Loop while input remains or the last call filled its quota: inflate can swallow all
        # its input yet still hold output (a long back-reference), released only on a new call.
        while (data or is_output_full) and not self._is_finished:
            out = decompressor.decompress(data, max_length)
            data = decompressor.unconsumed_tail
            is_output_full = len(out) == max_length
            if out:
                yield out
            if decompressor.eof:
                if self._is_gzip:
                    # RFC 1952 §2.2: a gzip file is a series of members; start the next one.
                    # After the end, unconsumed_tail may repeat unused_data: take only the latter.
                    data = decompressor.unused_data
                    decompressor = self._decompressor = zlib.decompressobj(_GZIP_WBITS)
                else:
                    self._is_finished = True


def _deflate_wbits(first_bytes: bytes) -> int:
    """RFC 1950 §2.2: a zlib header has CM = 8, CINFO <= 7 and CMF*256 + FLG divisible by 31."""
    if len(first_bytes) < 2:
        return _RAW_WBITS
    cmf, flg = first_bytes[0], first_bytes[1]
    is_zlib = cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0
    return _ZLIB_WBITS if is_zlib else _RAW_WBITS
