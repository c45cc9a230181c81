"""Seeded, bounded fuzzing of everything a client or a provider can feed halton-meter.

Two layers. The sans-IO parsers (request and response heads, body framing, chunked decoding, the
CONNECT target, SSE, the JSON array splitter) get thousands of generated and mutated inputs and
must keep the contract written next to each test. The real proxy (`serve` as a subprocess, and
in-process where a test shortens its timeouts) gets a few hundred malformed proxy requests,
in-tunnel requests and chunked bodies, oversized heads and slowloris clients: it must answer each
with a clear 4xx or a clean close within seconds, never log a traceback, go on metering, and give
its descriptors and memory back. Every generator draws from `random.Random(seed)`, so a failure
replays exactly.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import io
import ipaddress
import json
import os
import random
import re
import socket
import sqlite3
import ssl
import string
import time
import tracemalloc
import uuid

import pytest

from halton_meter import edge, relay
from halton_meter.config import load_settings
from halton_meter.edge import parse_authority, proxy_user
from halton_meter.http1 import (
    MAX_CHUNK_LINE_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    MAX_TRAILER_BYTES,
    BodyKind,
    ChunkedDecoder,
    Headers,
    ProtocolError,
    RequestHead,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)
from halton_meter.jsonstream import JsonArraySplitter
from halton_meter.serve import serve
from halton_meter.sse import SSEDecoder
from tests.conftest import Proxy, messages_body, start_serve, stop_serve

SEEDS = (20261123, 7, 90210)
READ_TIMEOUT_S = 10.0  # "answers within a few seconds", with the 5-10x slack this machine needs
ACCEPTED = "accepted"  # a verdict: the proxy would act on these bytes, so the fuzz never sends them


# ---- mutations ------------------------------------------------------------------------------

# Bytes that break HTTP parsers: line ends alone and doubled, NUL, DEL, obs-text, a Latin-1 digit
# ("²" passes str.isdigit()), separators, obs-fold continuations.
NASTY = (b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\x00", b"\x7f", b"\x80", b"\xb2", b"\xff", b" ", b"\t",
         b":", b";", b",", b"\r\n ", b"\r\n\t", b'"', b"[", b"]")
HUGE_NUMBERS = (b"99999999999999999999", b"18446744073709551616", b"ffffffffffffffff",
                b"10000000000000000", b"-1", b"+5", b"0x10", b"1e3", b"1_000", b"\xb2", b"1" * 5000)
_NUMBER = re.compile(rb"[0-9a-fA-F]+")


def _flip(rng, data: bytes) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]


def _truncate(rng, data: bytes) -> bytes:
    return data[: rng.randint(0, len(data))]


def _duplicate(rng, data: bytes) -> bytes:
    start = rng.randint(0, len(data))
    end = rng.randint(start, min(len(data), start + 64))
    return data[:end] + data[start:end] + data[end:]


def _delete(rng, data: bytes) -> bytes:
    start = rng.randint(0, len(data))
    return data[:start] + data[rng.randint(start, min(len(data), start + 16)):]


def _insert(rng, data: bytes) -> bytes:
    i = rng.randint(0, len(data))
    return data[:i] + rng.choice(NASTY) + data[i:]


def _huge_number(rng, data: bytes) -> bytes:
    """Sizes and lengths that overflow, go negative, change base or are not ASCII."""
    runs = list(_NUMBER.finditer(data))
    if not runs:
        return data + rng.choice(HUGE_NUMBERS)
    run = rng.choice(runs)
    return data[: run.start()] + rng.choice(HUGE_NUMBERS) + data[run.end():]


def _fold(rng, data: bytes) -> bytes:
    """obs-fold (RFC 9112 5.2): a line that continues the one before it."""
    ends = [m.end() for m in re.finditer(rb"\r\n", data)]
    if not ends:
        return data
    i = rng.choice(ends)
    return data[:i] + rng.choice((b" ", b"\t")) + data[i:]


def _drop_colon(rng, data: bytes) -> bytes:
    colons = [i for i, byte in enumerate(data) if byte == 0x3A]
    if not colons:
        return data
    i = rng.choice(colons)
    return data[:i] + data[i + 1:]


MUTATIONS = (_flip, _truncate, _duplicate, _delete, _insert, _huge_number, _fold, _drop_colon)


def mutate(rng, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        data = rng.choice(MUTATIONS)(rng, data)
    return data


def splits(rng, data: bytes) -> list[list[bytes]]:
    """The same bytes as one piece, as seeded random pieces, and (when short) one byte at a time."""
    ways = [[data]]
    for _ in range(2 if len(data) > 1 else 0):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
        ways.append([data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])])
    if len(data) <= 400:
        ways.append([data[i:i + 1] for i in range(len(data))])
    return ways


# ---- generated messages ---------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
VALUE_CHARS = string.ascii_letters + string.digits + ' \t-_.,;=/"()\xe9'  # é: obs-text
OWS = ("", " ", "  ", "\t")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def random_field(rng) -> tuple[str, str]:
    name = "".join(rng.choice(TOKEN_CHARS) for _ in range(rng.randint(1, 12)))
    return name, "".join(rng.choice(VALUE_CHARS) for _ in range(rng.randint(0, 30)))


def head_bytes(rng, start_line: str, fields: list[tuple[str, str]]) -> bytes:
    lines = [start_line, *(f"{name}:{rng.choice(OWS)}{value}" for name, value in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request_head(rng) -> bytes:
    method = rng.choice(("GET", "POST", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"))
    target = rng.choice(("/v1/messages", "/v1/messages?beta=true", "/v1/chat/completions", "/", "*",
                         "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
    fields = [("Host", "api.anthropic.com"), *(random_field(rng) for _ in range(rng.randint(0, 6)))]
    framing = rng.random()
    if framing < 0.3:
        fields.append(("Content-Length", str(rng.randint(0, 10**6))))
    elif framing < 0.5:
        fields.append(("Transfer-Encoding", rng.choice(("chunked", "gzip, chunked", "chunked, gzip"))))
    rng.shuffle(fields)
    return head_bytes(rng, f"{method} {target} {rng.choice(('HTTP/1.1', 'HTTP/1.1', 'HTTP/1.0'))}", fields)


def response_head(rng) -> bytes:
    status = rng.choice((100, 101, 200, 200, 204, 304, 400, 429, 500, 529))
    reason = rng.choice(("OK", "", "Too Many Requests", "Overloaded"))
    fields = [random_field(rng) for _ in range(rng.randint(0, 5))]
    framing = rng.random()
    if framing < 0.4:
        fields.append(("Content-Length", str(rng.randint(0, 10**6))))
    elif framing < 0.7:
        fields.append(("Transfer-Encoding", rng.choice(("chunked", "gzip, chunked", "gzip"))))
    start_line = f"HTTP/1.1 {status} {reason}" if reason or rng.random() < 0.5 else f"HTTP/1.1 {status}"
    return head_bytes(rng, start_line, fields)


def proxy_request(rng) -> bytes:
    """What an edge client sends first: CONNECT (with or without credentials) or a plain GET."""
    host = rng.choice(("api.anthropic.com", "127.0.0.1", "[::1]", "example.invalid"))
    port = rng.choice((443, 1, 8080, 65535))
    fields = [("Host", f"{host}:{port}")]
    if rng.random() < 0.4:
        fields.append(("Proxy-Authorization", "Basic " + base64.b64encode(b"my-app:x").decode()))
    fields += [random_field(rng) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.7:
        return head_bytes(rng, f"CONNECT {host}:{port} HTTP/1.1", fields)
    return head_bytes(rng, f"GET http://{host}:{port}/simple/ HTTP/1.1", fields)


# ---- the HTTP/1.1 head parsers ----------------------------------------------------------------

def check_request_head(raw: bytes) -> str:
    """The contract of parse_request_head and request_framing, on any bytes.

    Either a ProtocolError whose status a server can send (400, 431, 505; then 400 or 501 for the
    framing), or a head made only of valid parts (token method, visible-ASCII target, HTTP/1.x,
    token names, values without CR/LF/NUL or outer whitespace) that serializes to bytes which
    parse back to the very same head, so what is forwarded means what was checked; and one
    request framing (never close-delimited) that agrees with the headers.
    """
    try:
        head = parse_request_head(raw)
    except ProtocolError as exc:
        assert exc.status in (400, 431, 505), exc
        return "refused"
    assert _TOKEN.fullmatch(head.method) and re.fullmatch(r"[\x21-\x7e]+", head.target)
    assert head.version in ("HTTP/1.1", "HTTP/1.0")
    for name, value in head.headers.fields:
        assert _TOKEN.fullmatch(name)
        assert not {"\r", "\n", "\0"} & set(value) and value == value.strip(" \t")
    again = parse_request_head(head.serialize())
    assert (again.method, again.target, again.version, again.headers.fields) == (
        head.method, head.target, head.version, head.headers.fields)
    try:
        kind, length = request_framing(head)
    except ProtocolError as exc:
        assert exc.status in (400, 501), exc
        return "refused"
    assert (kind is BodyKind.CHUNKED) == bool(head.headers.get_all("transfer-encoding"))
    assert kind is not BodyKind.CLOSE
    assert (0 < length < 10**18) if kind is BodyKind.LENGTH else length == 0
    return ACCEPTED


def check_response_head(raw: bytes) -> str:
    """The contract of parse_response_head and response_framing, on any bytes.

    Either a ProtocolError with status 502 (what our client is told), or a head with a three-digit
    status from 100 to 999 that keeps `raw` as it was; its framing is none for HEAD, 1xx, 204 and
    304, chunked or close-delimited with Transfer-Encoding, else a length or close: never raising
    anything but a 502 ProtocolError.
    """
    try:
        head = parse_response_head(raw)
    except ProtocolError as exc:
        assert exc.status == 502, exc
        return "refused"
    assert 100 <= head.status <= 999 and head.raw is raw and head.version in ("HTTP/1.1", "HTTP/1.0")
    for method in ("GET", "HEAD", "POST"):
        try:
            kind, length = response_framing(method, head)
        except ProtocolError as exc:
            assert exc.status == 502, exc
            continue
        if method == "HEAD" or head.status < 200 or head.status in (204, 304):
            assert kind is BodyKind.NONE
        elif head.headers.get_all("transfer-encoding"):
            assert kind in (BodyKind.CHUNKED, BodyKind.CLOSE)
        assert (0 < length < 10**18) if kind is BodyKind.LENGTH else length == 0
    return ACCEPTED


@pytest.mark.parametrize("seed", SEEDS)
def test_request_heads_keep_their_contract_under_mutation(seed):
    rng = random.Random(seed)
    seen = collections.Counter(check_request_head(mutate(rng, request_head(rng))) for _ in range(1500))
    assert seen[ACCEPTED] > 100 and seen["refused"] > 300, seen  # both sides were exercised


@pytest.mark.parametrize("seed", SEEDS)
def test_response_heads_keep_their_contract_under_mutation(seed):
    rng = random.Random(seed)
    seen = collections.Counter(check_response_head(mutate(rng, response_head(rng))) for _ in range(1500))
    assert seen[ACCEPTED] > 100 and seen["refused"] > 300, seen


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",  # "²".isdigit() is True; int("²") raises
    b"POST / HTTP/1.1\r\nContent-Length: 1\xb9\r\n\r\n",
])
def test_non_ascii_digits_in_content_length_are_a_400(raw):
    with pytest.raises(ProtocolError) as info:
        request_framing(parse_request_head(raw))
    assert info.value.status == 400


@pytest.mark.parametrize("raw", [b"HTTP/1.1 20\xb2 OK\r\n\r\n", b"HTTP/1.1 000 Zero\r\n\r\n",
                                 b"HTTP/1.1 099 Low\r\n\r\n"])
def test_status_codes_that_are_not_three_ascii_digits_from_100_are_a_502(raw):
    with pytest.raises(ProtocolError) as info:
        parse_response_head(raw)
    assert info.value.status == 502


# ---- the CONNECT target and proxy credentials -----------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_connect_targets_parse_or_fail_with_a_clear_message(seed):
    """parse_authority: a valid (host, port), or a ValueError that names the target; nothing else."""
    rng = random.Random(seed)
    seen = collections.Counter()
    for _ in range(2000):
        host = rng.choice(("api.anthropic.com", "127.0.0.1", "[::1]", "[2001:db8::1]", "a_b-c.d", "x"))
        target = mutate(rng, f"{host}:{rng.choice((443, 1, 65535))}".encode()).decode("latin-1")
        try:
            host, port = parse_authority(target)
        except ValueError as exc:
            assert str(exc).startswith("CONNECT target ") and len(str(exc)) < 200, exc
            seen["refused"] += 1
            continue
        assert 0 < port < 65536 and target.endswith(str(port))
        if target.startswith("["):
            ipaddress.IPv6Address(host)
        else:
            assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}", host) and ".." not in host
        seen[ACCEPTED] += 1
    assert seen[ACCEPTED] > 100 and seen["refused"] > 300, seen


@pytest.mark.parametrize("seed", SEEDS)
def test_proxy_credentials_give_the_user_name_or_none(seed):
    """proxy_user: the name of well-formed Basic credentials, else None; it never raises."""
    rng = random.Random(seed)
    for _ in range(1000):
        name = rng.choice(("my-app", "", "日本", "a b", "x" * 300))
        token = base64.b64encode(f"{name}:{rng.choice(('', 'secret', ':'))}".encode()).decode()
        value = f"{rng.choice(('Basic', 'basic', 'BASIC'))} {token}"
        if rng.random() < 0.5:
            user = proxy_user(connect_head(mutate(rng, value.encode()).decode("latin-1")))
            assert user is None or (isinstance(user, str) and user and ":" not in user), user
        else:
            assert proxy_user(connect_head(value)) == (name or None)


def connect_head(proxy_authorization: str) -> RequestHead:
    return RequestHead("CONNECT", "api.anthropic.com:443", "HTTP/1.1",
                       Headers([("Proxy-Authorization", proxy_authorization)]))


# ---- chunked framing ------------------------------------------------------------------------

CHUNK_EXTENSIONS = (b"", b";a=1", b' ; name="quoted;value"', b"\t;x")


def chunked_body(rng, max_payload: int = 70_000) -> tuple[bytes, bytes]:
    """A valid chunked encoding of a random payload, with extensions and trailers: (payload, bytes)."""
    payload = rng.randbytes(rng.choice((0, 1, 7, 100, 1000, max_payload)))
    encoded, start = b"", 0
    while start < len(payload):
        size = rng.randint(1, max(1, len(payload) // 3))
        piece = payload[start:start + size]
        start += size
        size_line = format(len(piece), rng.choice(("x", "X", "04x"))).encode() + rng.choice(CHUNK_EXTENSIONS)
        encoded += size_line + b"\r\n" + piece + b"\r\n"
    trailers = rng.choice((b"", b"X-Trailer: yes\r\n", b"A: 1\r\nB: 2\r\n"))
    return payload, encoded + b"0\r\n" + trailers + b"\r\n"


def decode_chunked(pieces: list[bytes]) -> tuple:
    """("error",) or ("ok", payload, bytes used, done); checks every feed's own contract: it
    consumes all it is given until the end of the message (no stall, so no caller loops), never
    more than it is given, and raises nothing but ProtocolError."""
    decoder, payload, used_total = ChunkedDecoder(), [], 0
    for piece in pieces:
        if decoder.done:
            break
        try:
            used, parts = decoder.feed(piece)
        except ProtocolError:
            return ("error",)
        assert used == len(piece) or (decoder.done and 0 <= used < len(piece))
        payload += parts
        used_total += used
    return ("ok", b"".join(payload), used_total, decoder.done)


@pytest.mark.parametrize("seed", SEEDS)
def test_valid_chunked_bodies_decode_the_same_however_split(seed):
    rng = random.Random(seed)
    for _ in range(150):
        payload, encoded = chunked_body(rng)
        data = encoded + rng.choice((b"", b"POST /next HTTP/1.1\r\n"))  # a pipelined request after it
        for pieces in splits(rng, data):
            assert decode_chunked(pieces) == ("ok", payload, len(encoded), True)


@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_chunked_bodies_decode_or_raise_protocol_error_whatever_the_split(seed):
    """The verdict (error, or the same payload and end) is the same however the bytes arrive."""
    rng = random.Random(seed)
    seen = collections.Counter()
    for _ in range(800):
        data = mutate(rng, chunked_body(rng, max_payload=300)[1])
        whole = decode_chunked([data])
        for pieces in splits(rng, data)[1:]:
            assert decode_chunked(pieces) == whole, data
        seen[whole[0] if whole[0] == "error" else ("done" if whole[3] else "waiting")] += 1
    assert seen["error"] > 200 and seen["done"] > 50 and seen["waiting"] > 20, seen


@pytest.mark.parametrize("line, size", [
    (b"ffffffffffffffff", 2**64 - 1),  # 16 hex digits: a size, read a piece at a time, never allocated
    (b"0000000000000005", 5), (b"5 \t", 5), (b"5;ext=1", 5), (b'5 ;q="a;b"', 5),
    (b"10000000000000000", None), (b"-1", None), (b"+5", None), (b"0x5", None), (b" 5", None),
    (b"5\x00", None), (b"5;a\rb", None), (b"\xb2", None), (b"", None), (b";ext", None),
])
def test_chunk_size_lines(line, size):
    decoder = ChunkedDecoder()
    if size is None:
        with pytest.raises(ProtocolError):
            decoder.feed(line + b"\r\n")
    else:
        decoder.feed(line + b"\r\n")
        assert decoder.data_remaining == size


@pytest.mark.parametrize("prefix, filler, limit", [
    (b"", b"1", MAX_CHUNK_LINE_BYTES),  # a size line that never ends
    (b"5;", b"e", MAX_CHUNK_LINE_BYTES),  # an extension that never ends
    (b"0\r\n", b"y", MAX_TRAILER_BYTES),  # a trailer line that never ends
    (b"0\r\n", b"A: b\r\n", MAX_TRAILER_BYTES),  # trailer lines that never end
])
def test_endless_framing_lines_are_refused_once_past_their_bound(prefix, filler, limit):
    decoder = ChunkedDecoder()
    decoder.feed(prefix)
    fed = 0
    with pytest.raises(ProtocolError):
        while fed <= limit + 1024:  # bounded: the decoder must refuse before this loop ends
            decoder.feed(filler * (1024 // len(filler)))
            fed += 1024


# ---- SSE ------------------------------------------------------------------------------------

SSE_TEXT = ("hello", "日本語", "é", "😀", " lead", "trail ", ":colon", "data: inner", '{"type": "ping"}',
            "", "nul\0in id")
SSE_ENDS = (b"\n", b"\r", b"\r\n")
SSE_JUNK = (b"\r", b"\n", b"\r\n", b":", b" ", b"data", b"event", b"id", b"retry", b"\xef\xbb\xbf", b"\xef",
            b"\xe6\x97", b"\xa5", b"\xff", b"\x00", b"x")
_SSE_LINE_END = re.compile("\r\n|\r|\n")


def sse_line(rng) -> bytes:
    field = rng.choice(("data", "data", "data", "event", "id", "retry", ":", "unknown", "data-no-colon"))
    if field == "data-no-colon":
        return b"data"
    return (field + rng.choice((": ", ":", ":  ")) + rng.choice(SSE_TEXT)).encode()


def sse_stream(rng) -> bytes:
    parts = [b"\xef\xbb\xbf"] if rng.random() < 0.2 else []
    for _ in range(rng.randint(0, 10)):
        parts += [sse_line(rng) + rng.choice(SSE_ENDS) for _ in range(rng.randint(0, 4))]
        parts.append(rng.choice(SSE_ENDS))  # the blank line that dispatches
    if rng.random() < 0.3:
        parts.append(sse_line(rng))  # an unfinished event: never dispatched
    return b"".join(parts)


def reference_events(stream: bytes) -> list[tuple]:
    """WHATWG HTML §9.2.5-9.2.6 read literally over the whole stream at once: the oracle."""
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    events, data, event_type, last_id = [], "", "", None
    for line in _SSE_LINE_END.split(text)[:-1]:  # the last piece has no line end yet
        if not line:
            if data:
                events.append((event_type or "message", data.removesuffix("\n"), last_id))
            data, event_type = "", ""
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data += value + "\n"
            elif name == "event":
                event_type = value
            elif name == "id" and "\0" not in value:
                last_id = value
    return events


def sse_events(pieces: list[bytes], **options: int) -> tuple[list[tuple], int]:
    decoder = SSEDecoder(**options)
    events = [event for piece in pieces for event in decoder.feed(piece)]
    events += decoder.close()
    return [(e.event, e.data, e.id) for e in events], decoder.oversized_events


@pytest.mark.parametrize("seed", SEEDS)
def test_sse_streams_decode_as_the_spec_says_however_split(seed):
    """Valid streams and byte garbage alike: fed in any split, the decoder gives the oracle's events."""
    rng = random.Random(seed)
    dispatched = 0
    for _ in range(400):
        stream = sse_stream(rng) if rng.random() < 0.7 else b"".join(
            rng.choice(SSE_JUNK) for _ in range(rng.randint(0, 80)))
        expected = reference_events(stream)
        dispatched += len(expected)
        for pieces in splits(rng, stream):
            assert sse_events(pieces) == (expected, 0), stream
    assert dispatched > 500


@pytest.mark.parametrize("seed", SEEDS)
def test_sse_oversized_events_are_skipped_alike_however_split(seed):
    rng = random.Random(seed)
    skipped = 0
    for _ in range(400):
        stream = sse_stream(rng)
        whole = sse_events([stream], max_event_bytes=16)
        skipped += whole[1]
        for pieces in splits(rng, stream)[1:]:
            assert sse_events(pieces, max_event_bytes=16) == whole, stream
    assert skipped > 50


@pytest.mark.parametrize("piece", [b"x" * 16384, b"data:ab\n" * 2048, b":" * 16384],
                         ids=["endless-line", "tiny-data-lines", "endless-comment"])
def test_sse_memory_stays_within_twice_the_event_bound(piece):
    """Whatever shape the excess takes, the decoder holds at most ~2x max_event_bytes. (A list of
    one str per tiny data line once held 7.6 MiB for a 1 MiB bound.)"""
    bound = 1 << 18
    decoder = SSEDecoder(max_event_bytes=bound)
    decoder.feed(b"data: before\n\n")
    tracemalloc.start()
    try:
        for _ in range(32):  # 512 KiB of it: past the bound
            decoder.feed(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * bound + 2 * len(piece), f"{peak >> 10} KiB held for a {bound >> 10} KiB bound"
    after = decoder.feed(b"\n\ndata: after\n\n")
    assert [(e.event, e.data) for e in after] == [("message", "after")]


def test_sse_many_tiny_data_lines_under_the_bound_make_one_event_in_little_memory():
    bound = 1 << 18
    decoder = SSEDecoder(max_event_bytes=bound)
    tracemalloc.start()
    try:
        for _ in range(15):  # 215 KB of 7-byte data lines: under the bound
            decoder.feed(b"data:ab\n" * 2048)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [event] = decoder.feed(b"\n")
    assert event.data == "\n".join(["ab"] * 2048 * 15) and decoder.oversized_events == 0
    assert peak < bound, f"{peak >> 10} KiB held for {15 * 2048 * 3 >> 10} KiB of data"


# ---- the streamed JSON array splitter --------------------------------------------------------

JSON_STRINGS = ("", "plain", 'a "quote"', "back\\slash", "\\\\", "\\" * 7, "{[}]", "日本", "\u2028",
                "\x00\x1f", "ends with \\")


def json_value(rng, depth: int = 0):
    kind = rng.random()
    if depth < 3 and kind < 0.3:
        keys = (rng.choice(JSON_STRINGS) + str(i) for i in range(rng.randint(0, 4)))
        return {key: json_value(rng, depth + 1) for key in keys}
    if depth < 3 and kind < 0.45:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice((rng.choice(JSON_STRINGS), rng.randint(-10**20, 10**20), 1.5e300, True, None))


def json_array(rng) -> tuple[list[bytes], bytes]:
    """A streamed top-level array: (the bytes of each object element, the whole body). Elements
    that are not objects (a string full of braces, a number, an array holding an object) are in
    the body but are not elements."""
    expected, parts = [], []
    for _ in range(rng.randint(0, 8)):
        if rng.random() < 0.8:
            obj = {"n": rng.randint(0, 9), **{k: json_value(rng) for k in ("a", "b")[:rng.randint(0, 2)]}}
            text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=rng.choice((None, 2))).encode()
            expected.append(text)
        else:
            text = json.dumps(rng.choice(("{not an element}", 42, [1, {"nested": 1}]))).encode()
        parts.append(text)
    return expected, b"[" + rng.choice((b",", b",\r\n", b" , ")).join(parts) + b"]"


def split_json(pieces: list[bytes], max_element_bytes: int = 8 << 20) -> tuple:
    """(elements, oversized, finished), checking after every feed that the splitter holds no more
    than one element's bound plus the piece just fed."""
    splitter = JsonArraySplitter(max_element_bytes=max_element_bytes)
    elements = []
    for piece in pieces:
        elements += splitter.feed(piece)
        assert splitter.buffered_bytes <= max_element_bytes + len(piece)
    elements += splitter.close()
    return elements, splitter.oversized_elements, splitter.finished


@pytest.mark.parametrize("seed", SEEDS)
def test_json_arrays_split_into_their_elements_however_chunked(seed):
    rng = random.Random(seed)
    for _ in range(300):
        expected, body = json_array(rng)
        for pieces in splits(rng, body):
            assert split_json(pieces) == (expected, 0, True), body
        assert all(isinstance(json.loads(element), dict) for element in expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_json_garbage_never_raises_and_gives_the_same_answer_however_chunked(seed):
    rng = random.Random(seed)
    junk = (b"[", b"]", b"{", b"}", b'"', b"\\", b"\\\\", b'\\"', b",", b":", b"a", b"1", b" ", b"\xff",
            b"\xe6\x97")
    for _ in range(600):
        body = b"".join(rng.choice(junk) for _ in range(rng.randint(0, 120)))
        for bound in (8, 1 << 20):
            whole = split_json([body], bound)
            for pieces in splits(rng, body)[1:]:
                assert split_json(pieces, bound) == whole, body


@pytest.mark.parametrize("odd", [False, True])
def test_a_string_of_backslashes_is_neither_kept_nor_scanned_again(odd):
    """Each chunk of an endless run of backslashes used to be kept and walked again on the next
    one: unbounded memory and quadratic time (4 MiB took 7 s). Only its parity matters."""
    bound = 1 << 20
    splitter = JsonArraySplitter(max_element_bytes=bound)
    splitter.feed(b'[{"a": "')
    started = time.monotonic()
    for _ in range(128):  # 8 MiB
        splitter.feed(b"\\" * 65536)
        assert splitter.buffered_bytes <= bound + 1
    splitter.feed(b"\\" * odd + b'"}]')
    assert time.monotonic() - started < 20.0  # generous: about 1 s here; minutes when quadratic
    # An odd run escapes the quote: the string, and so the element, goes on.
    assert splitter.finished is not odd and splitter.oversized_elements == 1


# ---- through the real proxy: fixtures and clients ---------------------------------------------

@dataclasses.dataclass
class Meter:
    """The fuzzed `serve` process and its footprint after a warm-up call."""

    proxy: Proxy
    fds: int
    rss_kib: int


@pytest.fixture(scope="module")
def meter(fake, tmp_path_factory):
    proxy = start_serve(tmp_path_factory.mktemp("fuzz-home"),
                        "--upstream", f"api.anthropic.com=127.0.0.1:{fake.port}",
                        "--upstream-ca", str(fake.ca_path))
    assert metered_call(proxy, new_project())[0] == 200  # TLS, adapters, ledger warm: a steady baseline
    time.sleep(0.5)
    yield Meter(proxy, open_fds(proxy), proxy.rss_kib())
    assert stop_serve(proxy) == 0
    time.sleep(0.2)
    for marker in ("Traceback", "never retrieved", "proxy_error", "connection_failed", "Unhandled"):
        assert marker not in proxy.log, f"{marker!r} in the proxy log:\n{proxy.log[-4000:]}"


def new_project() -> str:
    return f"fz-{uuid.uuid4().hex[:10]}"


def open_fds(proxy) -> int:
    return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))


def metered_call(proxy, project: str) -> tuple[int, list[dict]]:
    conn = proxy.connection()
    conn.request("POST", "/v1/messages", body=messages_body(),
                 headers={"content-type": "application/json", "x-halton-project": project})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, proxy.wait_rows(project)


def open_tunnel(proxy, host: str = "api.anthropic.com") -> ssl.SSLSocket:
    """A TLS socket to `host` through CONNECT, for bytes http.client would never send."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=READ_TIMEOUT_S)
    sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    answer = read_connect_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return proxy.client_context().wrap_socket(sock, server_hostname=host)


def read_connect_answer(sock) -> bytes:
    answer = b""
    while not answer.endswith(b"\r\n\r\n"):  # byte by byte: nothing of TLS may be read here
        piece = sock.recv(1)
        assert piece, answer
        answer += piece
    return answer


def read_answer(sock) -> bytes:
    """One response (head and Content-Length body) or whatever came before the connection ended."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    length = re.search(rb"\r\ncontent-length: *(\d+)", data.partition(b"\r\n\r\n")[0], re.IGNORECASE)
    while length and len(data.partition(b"\r\n\r\n")[2]) < int(length[1]):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def read_to_end(sock) -> tuple[bytes, str]:
    """Everything until the peer closes: (bytes, "eof" or "reset")."""
    data = b""
    try:
        while piece := sock.recv(65536):
            data += piece
    except (ConnectionResetError, ssl.SSLError):
        return data, "reset"
    return data, "eof"


def answer_problem(answer: bytes, expected: int | None) -> str | None:
    """None when `answer` is what the proxy owes; else what is wrong with it.

    `expected` None: nothing at all (a quiet close). Otherwise that status with `Connection:
    close`, a body of exactly its Content-Length, and a reason a person can read.
    """
    if expected is None:
        return None if not answer else f"expected a quiet close, got {answer[:120]!r}"
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 %d " % expected):
        return f"expected {expected}, got {answer[:120]!r}"
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    if length is None or int(length[1]) != len(body) or b"\r\nConnection: close" not in head:
        return f"bad framing: {answer[:300]!r}"
    text = body.decode("utf-8", "replace").strip()
    if not text.startswith("halton-meter: ") or len(text) < 30 or not text.isprintable():
        return f"no readable reason: {body!r}"
    return None


# ---- through the real proxy: the edge listener --------------------------------------------------

def edge_verdict(data: bytes):
    """What the edge owes a client that sent `data` and then ended its side: None (a quiet close),
    a status, or ACCEPTED when it would tunnel or forward (such cases are never sent)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    try:
        head = parse_request_head(data[: end + 4])
    except ProtocolError as exc:
        return exc.status
    if head.method == "CONNECT":
        try:
            parse_authority(head.target)
        except ValueError:
            return 400
        return ACCEPTED
    return ACCEPTED if head.target.lower().startswith("http://") else 400


def test_edge_answers_malformed_proxy_requests_with_a_clear_4xx_or_a_quiet_close(meter):
    rng = random.Random(SEEDS[0])
    seen, problems = collections.Counter(), []
    while sum(seen.values()) < 220:
        data = mutate(rng, proxy_request(rng))
        expected = edge_verdict(data)
        if expected == ACCEPTED:
            continue
        seen[expected] += 1
        with socket.create_connection(("127.0.0.1", meter.proxy.port), timeout=READ_TIMEOUT_S) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            try:
                answer, end = read_to_end(sock)
            except TimeoutError:
                answer, end = b"", "hang"
        problem = answer_problem(answer, expected) or (None if end == "eof" else f"ended with a {end}")
        if problem:
            problems.append((data, problem))
    assert not problems, problems[:5]
    assert seen[None] > 10 and seen[400] > 100 and len(seen) >= 3, seen


# ---- through the real proxy: inside an intercepted tunnel -----------------------------------------

def tunnel_verdict(data: bytes):
    """What a request head owes inside a tunnel: a status, None when incomplete, or ACCEPTED."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    try:
        request_framing(parse_request_head(data[: end + 4]))
    except ProtocolError as exc:
        return exc.status
    return ACCEPTED


def tunnel_exchange(proxy, data: bytes, expected) -> str | None:
    """Send `data` inside a fresh tunnel; a problem with the answer, or None."""
    tls = open_tunnel(proxy)
    try:
        tls.sendall(data)
        if expected is None:  # an unfinished head, then our close_notify: the proxy just closes
            tls.unwrap()
            return None if tls.recv(1) == b"" else "no close after an unfinished head"
        return answer_problem(read_answer(tls), expected)
    except TimeoutError:
        return "no answer in time"
    finally:
        tls.close()


def test_tunnel_answers_malformed_requests_with_a_clear_4xx(meter):
    rng = random.Random(SEEDS[1])
    seen, problems = collections.Counter(), []
    while sum(seen.values()) < 80:
        data = mutate(rng, request_head(rng))
        expected = tunnel_verdict(data)
        # Leading empty lines are skipped before a request line (RFC 9112 2.2), so a head that
        # starts with one whole CRLF CRLF is read on past it: not a malformed head.
        if expected == ACCEPTED or data.startswith(b"\r\n\r\n"):
            continue
        seen[expected] += 1
        problem = tunnel_exchange(meter.proxy, data, expected)
        if problem:
            problems.append((data, problem))
    assert not problems, problems[:5]
    assert seen[400] > 40 and seen[None] > 5, seen


def chunked_reading_ends_in_error(body: bytes) -> bool:
    """True when a reader taking one framing line, or the current chunk's data, at a time (as the
    relay does, so as never to read past the body) meets a ProtocolError without waiting for more."""
    decoder, pos = ChunkedDecoder(), 0
    try:
        while not decoder.done:
            wanted = decoder.data_remaining
            end = pos + wanted if wanted else body.find(b"\n", pos) + 1
            if (wanted and end > len(body)) or (not wanted and end == 0):
                return False
            decoder.feed(body[pos:end])
            pos = end
    except ProtocolError:
        return True
    return False


@pytest.mark.parametrize("field", [b"Content-Length: \xb2", b"Content-Length: 1\xb9"])
def test_tunnel_refuses_a_content_length_of_latin1_digits_with_400(meter, field):
    """Once a ValueError out of int(): a traceback in the log and no answer at all."""
    data = b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\n" + field + b"\r\n\r\n"
    assert tunnel_exchange(meter.proxy, data, 400) is None


def test_connect_with_proxy_credentials_that_are_not_ascii_is_still_metered(meter):
    """Once a ValueError out of b64decode after the 200: a traceback and a dropped connection."""
    sock = socket.create_connection(("127.0.0.1", meter.proxy.port), timeout=READ_TIMEOUT_S)
    sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nProxy-Authorization: Basic \xb2\xb2==\r\n\r\n")
    assert read_connect_answer(sock).startswith(b"HTTP/1.1 200")
    name, body = new_project(), messages_body()
    with meter.proxy.client_context().wrap_socket(sock, server_hostname="api.anthropic.com") as tls:
        tls.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-halton-project: %s\r\n"
                    b"content-length: %d\r\n\r\n%s" % (name.encode(), len(body), body))
        assert read_answer(tls).startswith(b"HTTP/1.1 200")
    assert [r["outcome"] for r in meter.proxy.wait_rows(name)] == ["ok"]


def test_tunnel_refuses_malformed_chunked_bodies_with_400_and_records_each(meter):
    rng = random.Random(SEEDS[2])
    name = new_project()
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\ncontent-type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nx-halton-project: " + name.encode() + b"\r\n\r\n")
    bodies = []
    while len(bodies) < 40:
        body = mutate(rng, chunked_body(rng, max_payload=300)[1])
        if chunked_reading_ends_in_error(body):
            bodies.append(body)
    problems = [(body, p) for body in bodies if (p := tunnel_exchange(meter.proxy, head + body, 400))]
    assert not problems, problems[:5]
    rows = meter.proxy.wait_rows(name, len(bodies))
    assert len(rows) == len(bodies) and {r["outcome"] for r in rows} == {"bad_request"}


# ---- through the real proxy: oversized heads ------------------------------------------------------

OVERSIZED_HEADS = {
    "one-huge-line": b"X-Big: " + b"a" * (MAX_HEAD_BYTES + 1000) + b"\r\n\r\n",
    "too-many-fields": b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1)) + b"\r\n",
    "never-ending": (b"X-Pad: " + b"b" * 100 + b"\r\n") * 10_000,  # 1 MiB, no end of head
}


@pytest.mark.parametrize("where", ["edge", "tunnel"])
@pytest.mark.parametrize("shape", OVERSIZED_HEADS)
def test_oversized_heads_get_431_and_the_connection_closes(meter, where, shape):
    if where == "edge":
        sock = socket.create_connection(("127.0.0.1", meter.proxy.port), timeout=READ_TIMEOUT_S)
        start_line = b"CONNECT api.anthropic.com:443 HTTP/1.1\r\n"
    else:
        sock = open_tunnel(meter.proxy)
        start_line = b"POST /v1/messages HTTP/1.1\r\n"
    with sock:
        with contextlib.suppress(OSError):  # the proxy may stop reading, and close, before the end
            sock.sendall(start_line + OVERSIZED_HEADS[shape])
        answer, end = read_to_end(sock)  # the proxy closes: a hang would raise TimeoutError here
    assert answer_problem(answer, 431) is None, answer[:300]
    assert end in ("eof", "reset")


@pytest.mark.parametrize("line", [
    b"1" * 20 + b"\r\n",  # more hex digits than any size
    b"5;" + b"e" * (MAX_CHUNK_LINE_BYTES + 100) + b"\r\n",  # past the decoder's line bound
    b"5;" + b"e" * (MAX_HEAD_BYTES + 100) + b"\r\n",  # past the reader's own limit too
], ids=["17-hex-digits", "past-the-line-bound", "past-the-reader-limit"])
def test_oversized_chunk_size_lines_get_400(meter, line):
    name = new_project()
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n"
            b"x-halton-project: " + name.encode() + b"\r\n\r\n")
    assert tunnel_exchange(meter.proxy, head + line, 400) is None
    assert [r["outcome"] for r in meter.proxy.wait_rows(name)] == ["bad_request"]


# ---- through the real proxy: many slow clients at once, then the footprint --------------------------

def test_two_hundred_slowloris_connections_do_not_delay_a_metered_call(meter):
    held = []
    try:
        for _ in range(100):  # half-sent CONNECT heads at the edge
            sock = socket.create_connection(("127.0.0.1", meter.proxy.port), timeout=READ_TIMEOUT_S)
            sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anth")
            held.append(sock)
        for _ in range(100):  # half-sent request heads inside tunnels
            tls = open_tunnel(meter.proxy)
            tls.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: api.anth")
            held.append(tls)
        fds_while_held = open_fds(meter.proxy)
        started = time.monotonic()
        status, rows = metered_call(meter.proxy, name := new_project())
        elapsed = time.monotonic() - started
    finally:
        for sock in held:
            sock.close()
    assert fds_while_held >= meter.fds + 200  # they really were held open by the proxy
    assert status == 200 and [r["outcome"] for r in rows] == ["ok"] and rows[0]["project"] == name
    assert elapsed < 5.0, f"a metered call took {elapsed:.2f} s next to 200 slow clients"


def test_after_the_fuzz_calls_are_metered_and_descriptors_and_memory_come_back(meter):
    status, rows = metered_call(meter.proxy, new_project())
    assert status == 200 and [r["outcome"] for r in rows] == ["ok"]
    deadline = time.monotonic() + 10
    while open_fds(meter.proxy) > meter.fds + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(meter.proxy) <= meter.fds + 2, (meter.fds, open_fds(meter.proxy))
    grown_kib = meter.proxy.rss_kib() - meter.rss_kib
    assert grown_kib < 24 * 1024, f"RSS grew {grown_kib} KiB over the fuzz"


# ---- in-process, with timeouts shortened: slowloris cut-offs ------------------------------------------

@pytest.fixture(scope="module")
def inproc_home(tmp_path_factory):
    return tmp_path_factory.mktemp("inproc-home")


@contextlib.asynccontextmanager
async def running_meter(home, fake):
    """`serve` on this test's own event loop, so module constants the test patched apply; yields
    (port, settings)."""
    settings = load_settings(home, port=0, api_port=0, upstreams=[f"api.anthropic.com=127.0.0.1:{fake.port}"],
                             upstream_ca_files=[str(fake.ca_path)])
    settings = dataclasses.replace(settings, shutdown_grace_s=0.5)
    ready, stop = asyncio.get_running_loop().create_future(), asyncio.Event()
    task = asyncio.create_task(serve(settings, out=io.StringIO(), stop=stop, on_ready=ready.set_result))
    await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # serve failed: raise its error
    try:
        yield ready.result(), settings
    finally:
        stop.set()
        await task


async def async_tunnel(port: int, settings):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await writer.start_tls(ssl.create_default_context(cafile=str(settings.bundle_path)),
                           server_hostname="api.anthropic.com")
    return reader, writer


async def dribble(reader, writer, data: bytes, interval_s: float) -> tuple[int, bytes]:
    """Send `data` one byte every `interval_s` until the server answers; (bytes sent, answer head)."""
    answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    sent = 0
    try:
        while sent < len(data) and not answer.done():
            writer.write(data[sent:sent + 1])
            sent += 1
            await asyncio.wait({answer}, timeout=interval_s)
        return sent, await asyncio.wait_for(answer, READ_TIMEOUT_S)
    finally:
        answer.cancel()


async def answered_then_closed(reader, writer, data: bytes) -> tuple[int, bytes, float]:
    """Dribble `data`; (bytes sent, the whole answer up to the close, seconds it all took)."""
    started = time.monotonic()
    sent, head = await dribble(reader, writer, data, interval_s=0.2)
    rest = await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)  # returns at the proxy's close
    writer.close()
    return sent, head + rest, time.monotonic() - started


SLOW_CONNECT = (b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\nUser-Agent: "
                + b"s" * 100 + b"\r\n\r\n")
SLOW_REQUEST = (b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nUser-Agent: " + b"s" * 100
                + b"\r\n\r\n")


def test_edge_cuts_off_clients_dribbling_their_connect_head(monkeypatch, fake, inproc_home):
    monkeypatch.setattr(edge, "HEAD_TIMEOUT_S", 1.0)

    async def scenario():
        async with running_meter(inproc_home, fake) as (port, _):
            async def one():
                streams = await asyncio.open_connection("127.0.0.1", port)
                return await answered_then_closed(*streams, SLOW_CONNECT)
            return await asyncio.gather(*(one() for _ in range(20)))

    for sent, answer, seconds in asyncio.run(scenario()):
        assert answer_problem(answer, 408) is None and b"did not arrive in time" in answer, answer
        assert sent < len(SLOW_CONNECT) and seconds < 8.0  # cut off mid-head, about 1 s in


def test_tunnel_waits_long_for_a_request_but_not_for_the_rest_of_its_head(monkeypatch, fake, inproc_home):
    """Silence between calls is idle time (300 s); a begun head must be whole in REQUEST_HEAD_TIMEOUT_S."""
    monkeypatch.setattr(relay, "REQUEST_HEAD_TIMEOUT_S", 0.5)
    monkeypatch.setattr(relay, "UNREAD_BODY_DRAIN_S", 0.5)
    name = new_project()
    body = messages_body()
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\ncontent-type: application/json\r\n"
               b"x-halton-project: %s\r\ncontent-length: %d\r\n\r\n%s" % (name.encode(), len(body), body))

    async def scenario():
        async with running_meter(inproc_home, fake) as (port, settings):
            reader, writer = await async_tunnel(port, settings)
            await asyncio.sleep(1.2)  # over twice the head timeout of silence before the first byte
            writer.write(request)
            first = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", first, re.IGNORECASE)[1])
            await reader.readexactly(length)
            await asyncio.sleep(1.2)  # idle again on the kept-alive connection
            return first, *await answered_then_closed(reader, writer, SLOW_REQUEST), settings

    first, sent, answer, seconds, settings = asyncio.run(scenario())
    assert first.startswith(b"HTTP/1.1 200")
    assert answer_problem(answer, 408) is None and b"did not arrive within 0.5 s" in answer, answer
    assert sent < len(SLOW_REQUEST) and seconds < 8.0
    with contextlib.closing(sqlite3.connect(settings.db_path)) as db:
        rows = db.execute("SELECT outcome FROM calls WHERE project = ?", (name,)).fetchall()
    assert rows == [("ok",)]  # the cut-off head made no row


def test_many_tunnel_clients_dribbling_heads_are_all_cut_off(monkeypatch, fake, inproc_home):
    monkeypatch.setattr(relay, "REQUEST_HEAD_TIMEOUT_S", 1.0)
    monkeypatch.setattr(relay, "UNREAD_BODY_DRAIN_S", 0.5)

    async def scenario():
        async with running_meter(inproc_home, fake) as (port, settings):
            async def one():
                return await answered_then_closed(*await async_tunnel(port, settings), SLOW_REQUEST)
            return await asyncio.gather(*(one() for _ in range(20)))

    for sent, answer, seconds in asyncio.run(scenario()):
        assert answer_problem(answer, 408) is None, answer
        assert sent < len(SLOW_REQUEST) and seconds < 10.0


def test_a_client_stalling_mid_body_is_cut_off(monkeypatch, fake, inproc_home):
    monkeypatch.setattr(relay, "CLIENT_IDLE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(relay, "REQUEST_HEAD_TIMEOUT_S", 1.0)

    async def scenario():
        async with running_meter(inproc_home, fake) as (port, settings):
            reader, writer = await async_tunnel(port, settings)
            writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\ncontent-length: 100\r\n"
                         b"\r\n" + b"{" * 10)
            try:
                return await asyncio.wait_for(reader.read(), 3.5)
            except TimeoutError:
                return b""
            finally:
                writer.close()

    assert asyncio.run(scenario()).startswith(b"HTTP/1.1 408")
