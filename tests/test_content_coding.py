"""ContentDecoder: gzip and deflate re-chunked at every boundary, members, bombs, bad input."""

import gzip
import random
import tracemalloc
import zlib
from pathlib import Path

import pytest

from halton_meter.content_coding import ContentDecoder, UnsupportedEncoding
from tests.test_sse import rechunkings

# A body with both compressible text and incompressible bytes, so several block types appear.
BODY = (Path(__file__).parent / "transcripts" / "anthropic_stream.sse").read_bytes() + (
    random.Random(7).randbytes(1500)
)


def deflate_raw(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def decode(content_encoding: str | None, chunks: list[bytes], piece_bytes: int = 1 << 20) -> bytes:
    decoder = ContentDecoder(content_encoding, max_output_bytes_per_feed=piece_bytes)
    pieces = [piece for chunk in chunks for piece in decoder.feed_iter(chunk)]
    assert all(len(piece) <= piece_bytes for piece in pieces)
    return b"".join(pieces) + decoder.flush()


@pytest.mark.parametrize(
    "content_encoding, encoded",
    [
        ("gzip", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", deflate_raw(BODY)),
        ("gzip", gzip.compress(BODY[:700]) + gzip.compress(BODY[700:])),
    ],
    ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw", "gzip-two-members"],
)
def test_decodes_identically_however_chunked(content_encoding, encoded):
    for label, chunks in rechunkings(encoded, seeds=20):
        assert decode(content_encoding, chunks, piece_bytes=512) == BODY, label


def test_feed_joins_the_pieces():
    decoder = ContentDecoder("GZIP", max_output_bytes_per_feed=100)
    assert decoder.feed(gzip.compress(BODY)) + decoder.flush() == BODY


def test_stacked_codings_are_undone_last_first():
    assert decode("deflate, gzip", [gzip.compress(zlib.compress(BODY))]) == BODY
    assert decode("gzip, identity", [gzip.compress(BODY)]) == BODY
    encoded = gzip.compress(deflate_raw(BODY))
    for label, chunks in rechunkings(encoded, seeds=5):
        assert decode("deflate, gzip", chunks, piece_bytes=64) == BODY, label


def test_output_held_back_by_inflate_comes_out_in_the_same_feed():
    # A few bytes of compressed zeros stand for kilobytes, and raw deflate has no trailer:
    # inflate can take all the input while output is still pending, released only by a further
    # call with no new input. That output belongs to this feed, not to a later one or flush().
    zeros = bytes(1 << 16)
    encoded = deflate_raw(zeros)
    for piece_bytes in (100, 1000):
        decoder = ContentDecoder("deflate", max_output_bytes_per_feed=piece_bytes)
        assert b"".join(decoder.feed_iter(encoded)) == zeros
        assert decoder.flush() == b""


def compressed_zeros(total_bytes: int, wbits: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(total_bytes >> 20)]
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize("content_encoding, wbits", [("gzip", 31), ("deflate", 15)])
def test_bomb_comes_out_in_bounded_pieces(content_encoding, wbits):
    total_bytes = 200 << 20
    bomb = compressed_zeros(total_bytes, wbits)
    assert len(bomb) < 256 * 1024
    decoder = ContentDecoder(content_encoding)  # default bound: 1 MiB per piece
    seen_bytes = largest_piece = 0
    tracemalloc.start()
    for piece in decoder.feed_iter(bomb):
        seen_bytes += len(piece)
        largest_piece = max(largest_piece, len(piece))
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen_bytes == total_bytes
    assert largest_piece <= 1 << 20
    assert peak_bytes < 4 << 20
    assert decoder.flush() == b""


def test_corrupt_input_raises_value_error():
    with pytest.raises(ValueError, match="corrupt gzip"):
        ContentDecoder("gzip").feed(b"this was never gzip")
    damaged = bytearray(gzip.compress(BODY))
    damaged[-6] ^= 0xFF  # the CRC-32 trailer
    with pytest.raises(ValueError, match="corrupt gzip"):
        ContentDecoder("gzip").feed(bytes(damaged))
    with pytest.raises(ValueError, match="corrupt deflate"):
        ContentDecoder("deflate").feed(b"\xff\xff\xff\xff garbage")


def test_truncated_body_yields_what_arrived_without_error():
    decoder = ContentDecoder("gzip")
    out = decoder.feed(gzip.compress(BODY)[:-100]) + decoder.flush()
    assert 0 < len(out) < len(BODY)
    assert BODY.startswith(out)


def test_piece_bound_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        ContentDecoder("gzip", max_output_bytes_per_feed=0)


@pytest.mark.parametrize("content_encoding", ["br", "zstd", "gzip, br", "compress"])
def test_unsupported_encoding(content_encoding):
    with pytest.raises(UnsupportedEncoding, match="unsupported content-coding"):
        ContentDecoder(content_encoding)


@pytest.mark.parametrize("content_encoding", [None, "", "identity", " Identity , "])
def test_identity_returns_the_chunk_itself(content_encoding):
    decoder = ContentDecoder(content_encoding)
    chunk = b"x" * 3_000_000
    assert decoder.is_identity
    assert decoder.feed(chunk) is chunk
    assert list(decoder.feed_iter(chunk)) == [chunk]
    assert list(decoder.feed_iter(b"")) == []
    assert decoder.flush() == b""
    assert not ContentDecoder("gzip").is_identity
