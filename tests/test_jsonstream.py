"""The streamed-JSON-array splitter: every element, whole and unchanged, under every chunking."""

from __future__ import annotations

import json

import pytest

from halton_meter.jsonstream import JsonArraySplitter
from tests.adapter_harness import chunkings, transcript

ELEMENTS = [
    {"text": 'braces } ] { [ in a string, an escaped quote \\" and "quotes"', "n": 1},
    {"text": "a backslash at the end \\", "path": "C:\\temp\\", "nested": [[1, 2], {"k": [{}]}]},
    {"text": "ñandú 😀 — 世界", "escaped": "\u007d\u005d", "empty": "", "list": []},
    {"text": "", "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3}},
]


def google_array(elements: list[object]) -> bytes:
    """Pretty-printed elements separated by newline, comma, CRLF, as the Gemini API streams them."""
    body = "[" + "\n,\r\n".join(json.dumps(e, indent=2, ensure_ascii=False) for e in elements) + "]"
    return body.encode()


def split_all(chunks: list[bytes], **options) -> tuple[list[bytes], JsonArraySplitter]:
    splitter = JsonArraySplitter(**options)
    out: list[bytes] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    out += splitter.close()
    return out, splitter


def test_every_chunking_gives_every_element_unchanged():
    data = google_array(ELEMENTS)
    for name, chunks in chunkings(data, every_split=True):
        out, splitter = split_all(chunks)
        assert [json.loads(element) for element in out] == ELEMENTS, name
        assert splitter.finished, name
        assert splitter.elements == len(ELEMENTS)


def test_element_bytes_are_exactly_the_object():
    data = b'[ {"a":"}"} ,\n\t{"b":[1]}\r\n]'
    out, _ = split_all([data])
    assert out == [b'{"a":"}"}', b'{"b":[1]}']


def test_element_is_returned_when_its_closing_brace_arrives():
    splitter = JsonArraySplitter()
    assert splitter.feed(b'[{"a": "x}"') == []
    assert splitter.feed(b"}") == [b'{"a": "x}"}']  # not held back until the comma
    assert splitter.feed(b",\n") == []
    assert splitter.feed(b'{"b": 2}') == [b'{"b": 2}']
    assert not splitter.finished
    assert splitter.feed(b"]") == []
    assert splitter.finished


def test_escapes_split_across_chunks():
    # The backslash ends one chunk and the quote it escapes starts the next.
    parts = [b'[{"t": "say \\', b'"hi\\', b'\\', b'"}', b"]"]
    out, splitter = split_all(parts)
    assert [json.loads(element) for element in out] == [{"t": 'say "hi\\'}]
    assert splitter.finished


def test_long_strings_with_escape_runs_under_every_chunking():
    # Runs of plain bytes past 256 leave the regex for bytes.find; quotes behind 1, 2, 3 and 4
    # backslashes, and backslash runs cut by chunk boundaries, must still be judged right.
    plain = "x" * 300
    elements = [
        {"text": plain + '\\"' + plain + "\\\\" + plain + '"}' + plain},
        {"text": plain + "\\" * 5 + plain, "more": plain + '\\\\"]' + plain},
        {"text": "{" * 10 + plain + "]" * 10, "end": plain + "\\"},
        {"data": "QUJD" * 2000},
    ]
    data = google_array(elements)
    for name, chunks in chunkings(data, seeds=40):
        out, splitter = split_all(chunks)
        assert [json.loads(element) for element in out] == elements, name
        assert splitter.finished, name


def test_multibyte_characters_split_anywhere():
    data = google_array([{"text": "😀ñ世" * 50}])
    for name, chunks in chunkings(data):
        out, _ = split_all(chunks)
        assert out[0].decode("utf-8") == data[1:-1].decode("utf-8"), name


def test_top_level_object_is_one_element():
    data = b'{\n  "error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}\n}\n'
    for name, chunks in chunkings(data):
        out, splitter = split_all(chunks)
        assert [json.loads(element) for element in out] == [json.loads(data)], name
        assert splitter.finished


def test_empty_array_finishes_without_elements():
    out, splitter = split_all([b"[", b" \r\n", b"]"])
    assert out == []
    assert splitter.finished


def test_close_drops_an_unterminated_tail_without_error():
    data = google_array(ELEMENTS)
    cut = data.index(b'"usageMetadata"')
    out, splitter = split_all([data[:cut]])
    assert len(out) == 3
    assert not splitter.finished
    assert splitter.dropped_tail_bytes > 0


def test_oversized_element_is_skipped_counted_and_memory_stays_bounded():
    big = {"inlineData": {"mimeType": "image/png", "data": "QUJD" * 5000 + '\\"}]'}}
    data = google_array([ELEMENTS[0], big, ELEMENTS[2]])
    splitter = JsonArraySplitter(max_element_bytes=4096)
    out: list[bytes] = []
    most_buffered = 0
    for index in range(0, len(data), 100):
        out += splitter.feed(data[index:index + 100])
        most_buffered = max(most_buffered, splitter.buffered_bytes)
    assert [json.loads(element) for element in out] == [ELEMENTS[0], ELEMENTS[2]]
    assert splitter.oversized_elements == 1
    assert splitter.finished
    assert most_buffered <= 4096 + 100


def test_skipped_element_keeps_escapes_right_across_chunk_boundaries():
    # While an oversized element is skipped its bytes are dropped as they are scanned; a run of
    # backslashes at a chunk's end must survive, or the quote it escapes would end the string.
    big = {"text": "y" * 300 + '\\"]}' + "y" * 300 + '\\\\"{['}
    small = {"n": 2}
    data = google_array([big, small])
    for name, chunks in chunkings(data, every_split=True, seeds=4):
        out, splitter = split_all(chunks, max_element_bytes=64)
        assert [json.loads(element) for element in out] == [small], name
        assert splitter.oversized_elements == 1, name
        assert splitter.finished, name


def test_bytes_after_the_array_are_ignored():
    out, splitter = split_all([b'[{"a": 1}]\n{"b": 2}'])
    assert out == [b'{"a": 1}']
    assert splitter.finished


def test_gemini_transcript_splits_into_its_chunks():
    data = transcript("gemini_stream_array.json")
    expected = json.loads(data)
    for name, chunks in chunkings(data):
        out, splitter = split_all(chunks)
        assert [json.loads(element) for element in out] == expected, name
        assert splitter.finished


@pytest.mark.parametrize("junk", [b"]", b"}", b"]]}"])
def test_stray_closers_do_not_break_later_elements(junk):
    out, _ = split_all([junk + b'[{"a": 1}]'])
    assert out == [b'{"a": 1}']
