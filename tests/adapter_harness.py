"""Replay recorded HTTP exchanges through the registry and the tap, as the relay would.

`replay` builds the request head, picks the adapter with `adapter_for`, feeds the request body and
then the response body in the given chunks (gzip applied first when asked), and returns the
finished `CallState`. `chunkings` yields the re-chunkings every parser must survive.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

from halton_meter.adapters import adapter_for
from halton_meter.adapters.base import CallState
from halton_meter.http1 import Headers, RequestHead, ResponseHead
from halton_meter.tap import Tap

TRANSCRIPTS = Path(__file__).parent / "transcripts"


def transcript(name: str) -> bytes:
    return (TRANSCRIPTS / name).read_bytes()


def chunkings(data: bytes, seeds: int = 12, every_split: bool = False) -> Iterator[tuple[str, list[bytes]]]:
    """Whole, 1-byte pieces, seeded random splits, and (optionally) every 2-way split."""
    yield "whole", [data]
    yield "1-byte", [data[i : i + 1] for i in range(len(data))]
    if every_split:
        for cut in range(1, len(data)):
            yield f"split@{cut}", [data[:cut], data[cut:]]
    for seed in range(seeds):
        rng = random.Random(seed)
        if len(data) < 2:
            break
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 40))))
        yield f"seed={seed}", [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def replay(host: str, target: str, request: object, response: bytes | list[bytes], *,
           method: str = "POST", status: int = 200, content_type: str | None = None,
           response_headers: dict[str, str] | None = None, request_headers: dict[str, str] | None = None,
           gzip_response: bool = False, complete: bool = True) -> tuple[CallState, Tap]:
    """One exchange through adapter_for + Tap. `request` is a JSON-able object, bytes, or None."""
    if request is None:
        body = b""
    elif isinstance(request, bytes):
        body = request
    else:
        body = json.dumps(request).encode()
    fields = [("Host", host), ("Content-Type", "application/json")]
    fields += list((request_headers or {}).items())
    head = RequestHead(method, target, "HTTP/1.1", Headers(fields))
    tap = Tap(adapter_for(host, method, target), "call-test", head)
    if body:
        tap.request_chunk(body)
    tap.request_complete()
    tap.request_done()
    chunks = [response] if isinstance(response, bytes) else list(response)
    if content_type is None:
        content_type = "text/event-stream" if b"data:" in b"".join(chunks)[:200] else "application/json"
    headers = [("Content-Type", content_type)] + list((response_headers or {}).items())
    if gzip_response:
        whole = gzip.compress(b"".join(chunks))
        chunks = [whole[i : i + 7] for i in range(0, len(whole), 7)]
        headers.append(("Content-Encoding", "gzip"))
    tap.response_head(ResponseHead("HTTP/1.1", status, "OK", Headers(headers), b""))
    for chunk in chunks:
        tap.response_chunk(chunk)
    state = tap.finish(complete)
    return state, tap


def usage_tuple(state: CallState) -> tuple[int, int, int, int, int]:
    """(input, cache read, cache write, output, reasoning or -1) for compact assertions."""
    usage = state.usage
    assert usage is not None, f"no usage read (status {state.usage_status})"
    return (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
            usage.output_tokens, -1 if usage.reasoning_tokens is None else usage.reasoning_tokens)
