"""SSEDecoder on recorded transcripts and spec corner cases, re-chunked at every boundary."""

import json
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from halton_meter.sse import Event, SSEDecoder

TRANSCRIPTS = Path(__file__).parent / "transcripts"


def rechunkings(data: bytes, seeds: int = 40) -> Iterator[tuple[str, list[bytes]]]:
    """The whole stream, 1-byte chunks, every 2-way split, and seeded random splits."""
    yield "whole", [data]
    yield "1-byte", [data[i : i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield f"split@{cut}", [data[:cut], data[cut:]]
    for seed in range(seeds):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 30))))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        chunks.insert(rng.randrange(len(chunks) + 1), b"")  # empty reads happen too
        yield f"seed={seed}", chunks


def decode(chunks: list[bytes], **options: int) -> tuple[list[Event], SSEDecoder]:
    decoder = SSEDecoder(**options)
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events, decoder


def assert_every_chunking_gives(data: bytes, expected: list[Event], **options: int) -> None:
    for label, chunks in rechunkings(data):
        assert decode(chunks, **options)[0] == expected, label


# --- recorded transcripts -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["anthropic_stream.sse", "openai_chat_stream.sse", "gemini_stream.sse"]
)
def test_transcript_decodes_identically_however_chunked(name):
    data = (TRANSCRIPTS / name).read_bytes()
    expected, _ = decode([data])
    assert expected
    assert_every_chunking_gives(data, expected)


def test_anthropic_transcript():
    events, _ = decode([(TRANSCRIPTS / "anthropic_stream.sse").read_bytes()])
    assert [event.event for event in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(event.data) for event in events]
    assert [payload["type"] for payload in payloads] == [event.event for event in events]
    assert payloads[3]["delta"]["text"] == "héllo ✓ 日本"
    assert payloads[4]["delta"]["text"] == " — done 🙂"
    assert payloads[6]["usage"]["output_tokens"] == 57


def test_openai_chat_transcript():
    events, _ = decode([(TRANSCRIPTS / "openai_chat_stream.sse").read_bytes()])
    assert {event.event for event in events} == {"message"}
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(event.data) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == (
        "Grüße, 世界"
    )
    assert chunks[-1]["usage"]["total_tokens"] == 52


def test_gemini_transcript_with_crlf_frames():
    data = (TRANSCRIPTS / "gemini_stream.sse").read_bytes()
    assert data.endswith(b"\r\n\r\n")
    events, _ = decode([data])
    assert len(events) == 3
    assert not any("\r" in event.data for event in events)
    usage = [json.loads(event.data)["usageMetadata"] for event in events]
    assert [u["candidatesTokenCount"] for u in usage] == [1, 12, 40]


# --- the grammar, corner by corner (WHATWG HTML §9.2.5-9.2.6) ---------------------------------


def message(data: str, event: str = "message", id: str | None = None) -> Event:
    return Event(event=event, data=data, id=id)


@pytest.mark.parametrize(
    "stream, expected",
    [
        (b"event: a\r\ndata: 1\r\n\r\n", [message("1", "a")]),
        (b"event: a\rdata: 1\rdata: 2\r\r", [message("1\n2", "a")]),
        (b"data: 1\r\ndata: 2\rdata: 3\n\r\n", [message("1\n2\n3")]),
        (b": keep-alive\ndata: x\n:\n\n", [message("x")]),
        (b"data: a\ndata: b\ndata:\n\n", [message("a\nb\n")]),
        (b"data:x\ndata:  y\ndata: a:b\n\n", [message("x\n y\na:b")]),
        (b"data\n\ndata\ndata\n\n", [message(""), message("\n")]),
        (b"event: a\ndata: 1\n\ndata: 2\n\n", [message("1", "a"), message("2")]),
        (b"event: a\n\ndata: 2\n\n", [message("2")]),
        (b"event:\ndata: 2\n\n", [message("2")]),
        (b"\xef\xbb\xbfdata: x\n\n", [message("x")]),
        (b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n", [message("y")]),
        (b"retry: 100\nfoo: bar\nDATA: no\ndata: x\n\n", [message("x")]),
        (b"data: \xff\xe6\x97\n\n", [message("\ufffd\ufffd")]),
        ("data: héllo ✓ 日本 🙂\n\n".encode(), [message("héllo ✓ 日本 🙂")]),
        (
            b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0x\ndata: c\n\nid\ndata: d\n\n",
            [message("a", id="1"), message("b", id="1"), message("c", id="1"), message("d", id="")],
        ),
        (b"\n\n\r\n\r\r\n", []),
    ],
    ids=[
        "crlf",
        "lone-cr",
        "mixed-line-ends",
        "comments",
        "multi-line-data",
        "optional-space",
        "field-without-colon",
        "event-type-reset-after-dispatch",
        "event-type-reset-without-data",
        "empty-event-type-is-message",
        "bom",
        "only-one-bom-stripped",
        "retry-and-unknown-fields-ignored",
        "invalid-utf8-replaced",
        "non-ascii",
        "id-persists-and-nul-ignored",
        "blank-lines-only",
    ],
)
def test_grammar(stream, expected):
    assert_every_chunking_gives(stream, expected)


def test_cr_at_chunk_end_then_lf_is_one_line_end():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # Were CR and LF counted as two line ends, this LF would be a blank line dispatching "a".
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [message("a\nb")]  # a final CR dispatches at once
    assert decoder.feed(b"\ndata: c\n\n") == [message("c")]


def test_multibyte_character_split_across_chunks():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: \xe6") == []
    assert decoder.feed(b"\x97") == []
    assert decoder.feed(b"\xa5\xf0\x9f") == []
    assert decoder.feed(b"\x99\x82\n\n") == [message("日🙂")]


def test_unterminated_trailing_event_is_dropped_at_close():
    for tail in (b"data: b\n", b"data: b", b"event: x\ndata: b\r\n"):
        decoder = SSEDecoder()
        assert decoder.feed(b"data: a\n\n" + tail) == [message("a")]
        assert decoder.close() == []


@pytest.mark.parametrize(
    "oversized",
    [
        b"data: " + b"x" * 1500 + b"\n\n",  # one long line
        b"event: big\n" + (b"data: " + b"y" * 90 + b"\n") * 12 + b"\n",  # only together too big
        b": " + b"z" * 1500 + b"\n" + b"data: lost\n\n",  # a long comment still costs memory
    ],
    ids=["long-line", "many-lines", "long-comment"],
)
def test_oversized_event_is_skipped_and_counted(oversized):
    stream = b"data: before\n\n" + oversized + b"data: after\n\n"
    for label, chunks in rechunkings(stream, seeds=20):
        events, decoder = decode(chunks, max_event_bytes=1024)
        assert events == [message("before"), message("after")], label
        assert decoder.oversized_events == 1, label


def test_oversized_line_never_buffered_whole():
    decoder = SSEDecoder(max_event_bytes=64 * 1024)
    piece = b"x" * (64 * 1024)
    assert decoder.feed(b"data: ") == []
    tracemalloc.start()
    for _ in range(256):  # a 16 MiB line
        decoder.feed(piece)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak_bytes < 1024 * 1024
    assert decoder.feed(b"\ndata: still\n\ndata: after\n\n") == [message("after")]
    assert decoder.oversized_events == 1
