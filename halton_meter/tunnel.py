"""Blind byte relays: CONNECT tunnels to non-provider hosts and connections after `101 Switching`.

No parsing, no copies kept: bytes move as they arrive, with back-pressure, until both sides close.
"""

from __future__ import annotations

import asyncio
import contextlib

READ_SIZE = 64 * 1024


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> tuple[int, int]:
    """Relay a->b and b->a until both directions end; returns (bytes a->b, bytes b->a)."""
    a_to_b = asyncio.create_task(_pump(a_reader, b_writer))
    try:
        b_to_a = await _pump(b_reader, a_writer)
        sent = await a_to_b
    finally:
        if not a_to_b.done():
            a_to_b.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await a_to_b
        close_quietly(a_writer)
        close_quietly(b_writer)
    return sent, b_to_a


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    total = 0
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            total += len(data)
            await writer.drain()
    except (ConnectionError, OSError):
        # One side reset: end both directions so neither waits forever on a dead peer.
        close_quietly(writer)
        return total
    # Half-close: pass the end of this direction on; TLS transports cannot, so close instead.
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
    else:
        close_quietly(writer)
    return total


def close_quietly(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None and not writer.is_closing():
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()
