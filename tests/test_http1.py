"""Sans-IO HTTP/1.1: heads, framing decisions, and the chunked decoder fed in every split."""

from __future__ import annotations

import random

import pytest

from halton_meter.http1 import (
    BodyKind,
    ChunkedDecoder,
    Headers,
    ProtocolError,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
    wants_close,
)
from halton_meter.relay import narrow_accept_encoding

PIECES = [b"event: ", b'data: {"type":"ping"}\r\n\r\n', "日".encode()]
PAYLOAD = b"".join(PIECES)
# One chunk carries an extension, the last is followed by a trailer field.
CHUNKED = (
    b"%x\r\n%s\r\n" % (len(PIECES[0]), PIECES[0])
    + b"%X;ext=1\r\n%s\r\n" % (len(PIECES[1]), PIECES[1])
    + b"%x\r\n%s\r\n" % (len(PIECES[2]), PIECES[2])
    + b"0\r\nX-Trailer: yes\r\n\r\n"
)


def decode_in_pieces(pieces: list[bytes]) -> tuple[bytes, int, bool]:
    decoder = ChunkedDecoder()
    payload, used_total = b"", 0
    for piece in pieces:
        used, parts = decoder.feed(piece)
        payload += b"".join(bytes(p) for p in parts)
        used_total += used
        if decoder.done:
            break
    return payload, used_total, decoder.done


def test_request_head_parses_and_round_trips():
    raw = b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Api-Key:  sk \r\n\r\n"
    head = parse_request_head(raw)
    assert (head.method, head.target, head.version) == ("POST", "/v1/messages?beta=true", "HTTP/1.1")
    assert head.headers.get("x-api-key") == "sk"  # OWS trimmed, lookup case-insensitive
    assert head.serialize() == b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Api-Key: sk\r\n\r\n"


def test_response_head_keeps_raw_bytes():
    raw = b"HTTP/1.1 529 Overloaded\r\nContent-Length: 0\r\n\r\n"
    head = parse_response_head(raw)
    assert head.status == 529 and head.reason == "Overloaded" and head.raw == raw
    assert parse_response_head(b"HTTP/1.1 200\r\n\r\n").reason == ""


@pytest.mark.parametrize("raw, status", [
    (b"GET /\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"G(T / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nName : v\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 201 + b"\r\n", 431),
])
def test_malformed_request_heads_are_rejected(raw, status):
    with pytest.raises(ProtocolError) as info:
        parse_request_head(raw)
    assert info.value.status == status


def test_request_target_with_control_bytes_is_refused():
    # A bare LF inside the target would let an upstream see a different request than we did.
    with pytest.raises(ProtocolError, match="request target"):
        parse_request_head(b"GET /a\nX-Injected:1 HTTP/1.1\r\nHost: x\r\n\r\n")


def test_error_messages_never_quote_header_text():
    secret = "sk-ant-api03-SECRETSECRET"
    for raw in (f"GET / HTTP/1.1\r\nx-api-key {secret}\r\n\r\n",
                f"GET / HTTP/1.1\r\nx-api-key {secret}: v\r\n\r\n",
                f"GET /?key={secret} HTTP/1.1 extra\r\n\r\n"):
        with pytest.raises(ProtocolError) as info:
            parse_request_head(raw.encode())
        assert "SECRET" not in str(info.value)


def test_malformed_status_line_is_a_502():
    with pytest.raises(ProtocolError) as info:
        parse_response_head(b"HTTP/1.1 2000 OK\r\n\r\n")
    assert info.value.status == 502


def request(headers: str) -> object:
    return parse_request_head(f"POST / HTTP/1.1\r\n{headers}\r\n".encode())


def test_request_framing_rules():
    assert request_framing(request("Content-Length: 10\r\n")) == (BodyKind.LENGTH, 10)
    assert request_framing(request("Content-Length: 0\r\n")) == (BodyKind.NONE, 0)
    assert request_framing(request("Content-Length: 5, 5\r\n")) == (BodyKind.LENGTH, 5)
    assert request_framing(request("Transfer-Encoding: gzip, chunked\r\n")) == (BodyKind.CHUNKED, 0)
    assert request_framing(request("")) == (BodyKind.NONE, 0)
    for bad in ("Content-Length: 5\r\nContent-Length: 6\r\n", "Content-Length: -1\r\n",
                "Content-Length: 1e3\r\n", "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"):
        with pytest.raises(ProtocolError):
            request_framing(request(bad))
    with pytest.raises(ProtocolError) as info:
        request_framing(request("Transfer-Encoding: gzip\r\n"))
    assert info.value.status == 501


def response(status: int, headers: str = ""):
    return parse_response_head(f"HTTP/1.1 {status} X\r\n{headers}\r\n".encode())


def test_response_framing_rules():
    assert response_framing("HEAD", response(200, "Content-Length: 99\r\n")) == (BodyKind.NONE, 0)
    assert response_framing("GET", response(204)) == (BodyKind.NONE, 0)
    assert response_framing("GET", response(304, "Content-Length: 99\r\n")) == (BodyKind.NONE, 0)
    assert response_framing("GET", response(103)) == (BodyKind.NONE, 0)
    assert response_framing("POST", response(200, "Transfer-Encoding: chunked\r\n")) == (BodyKind.CHUNKED, 0)
    assert response_framing("POST", response(200, "Transfer-Encoding: gzip\r\n")) == (BodyKind.CLOSE, 0)
    assert response_framing("POST", response(200, "Content-Length: 7\r\n")) == (BodyKind.LENGTH, 7)
    assert response_framing("POST", response(200)) == (BodyKind.CLOSE, 0)


def test_connection_close_rules():
    assert wants_close("HTTP/1.1", Headers([("Connection", "keep-alive, Close")]))
    assert not wants_close("HTTP/1.1", Headers([]))
    assert wants_close("HTTP/1.0", Headers([]))
    assert not wants_close("HTTP/1.0", Headers([("Connection", "keep-alive")]))


def test_headers_set_and_remove_keep_order():
    headers = Headers([("A", "1"), ("Accept-Encoding", "br"), ("B", "2"), ("accept-encoding", "zstd")])
    headers.set("Accept-Encoding", "gzip")
    assert headers.fields == [("A", "1"), ("Accept-Encoding", "gzip"), ("B", "2")]
    assert headers.remove("a") == ["1"] and headers.get("a") is None


@pytest.mark.parametrize("offered, sent", [
    ("gzip, deflate, br, zstd", "gzip, deflate"),
    ("br;q=1.0, gzip;q=0.5", "gzip"),
    ("br", "identity"),
    ("gzip;q=0, br", "identity"),
    ("GZIP;Q=0.0, deflate", "deflate"),
    ("gzip ; q=0.001", "gzip"),
    ("*", "gzip, deflate"),
    ("*;q=0.5, deflate;q=0", "gzip"),
])
def test_accept_encoding_is_narrowed_to_what_zlib_decodes(offered, sent):
    headers = Headers([("Accept-Encoding", offered)])
    narrow_accept_encoding(headers)
    assert headers.get("accept-encoding") == sent


def test_no_accept_encoding_stays_absent():
    headers = Headers([])
    narrow_accept_encoding(headers)
    assert headers.fields == []


def test_chunked_whole():
    payload, used, done = decode_in_pieces([CHUNKED + b"NEXT"])
    assert done and payload == PAYLOAD and used == len(CHUNKED)


def test_chunked_every_two_way_split():
    for split in range(1, len(CHUNKED)):
        payload, used, done = decode_in_pieces([CHUNKED[:split], CHUNKED[split:]])
        assert done and payload == PAYLOAD and used == len(CHUNKED), split


def test_chunked_one_byte_at_a_time_and_random_splits():
    assert decode_in_pieces([CHUNKED[i:i + 1] for i in range(len(CHUNKED))])[:2] == (PAYLOAD, len(CHUNKED))
    rng = random.Random(20261123)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(CHUNKED)), rng.randint(1, 12)))
        pieces = [CHUNKED[a:b] for a, b in zip([0, *cuts], [*cuts, len(CHUNKED)])]
        assert decode_in_pieces(pieces)[:2] == (PAYLOAD, len(CHUNKED))


def test_chunked_payload_pieces_are_views_not_copies():
    decoder = ChunkedDecoder()
    _, parts = decoder.feed(b"5\r\nhello\r\n")
    assert all(isinstance(p, memoryview) for p in parts) and b"".join(parts) == b"hello"


def test_chunked_wanted_bytes_never_pass_the_end():
    decoder = ChunkedDecoder()
    decoder.feed(b"a\r\n")
    assert decoder.data_remaining == 10
    decoder.feed(b"0123")
    assert decoder.data_remaining == 6
    decoder.feed(b"456789\r\n")
    assert decoder.data_remaining == 0


@pytest.mark.parametrize("bad", [
    b"zz\r\n", b"5\r\nhelloX\r\n", b"5\nhello\r\n", b"1" * 17 + b"\r\n",
    b"0\r\n" + b"X: " + b"y" * 20000, b"5;" + b"e" * 5000,
])
def test_chunked_errors(bad):
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(bad)
