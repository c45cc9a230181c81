"""Blind byte relays: CONNECT tunnels to non-provider hosts and connections after `101 Switching`.

No parsing, no copies kept: bytes move as they arrive, with back-pressure, until both sides close.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket

READ_SIZE = 64 * 1024
# After one direction ends, how long the other may go on before both are closed: a peer that
# half-closed and never finishes must not pin two sockets forever.
HALF_CLOSE_LINGER_S = 60.0


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    *,
    totals: list[int] | None = None,
    linger_s: float = HALF_CLOSE_LINGER_S,
) -> list[int]:
    """Relay a->b and b->a until both directions end; `totals` counts [a->b, b->a] as it goes."""
    totals = totals if totals is not None else [0, 0]
    pumps = {asyncio.create_task(_pump(a_reader, b_writer, totals, 0)),
             asyncio.create_task(_pump(b_reader, a_writer, totals, 1))}
    try:
        _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending, timeout=linger_s)
    finally:
        close_quietly(a_writer)
        close_quietly(b_writer)
        await settle(pumps)
    return totals


async def settle(tasks: set[asyncio.Task]) -> None:
    """Cancel child tasks and wait until they have ended, retrieving every error they raised.

    Waiting goes on even if we are cancelled meanwhile (a client leaving during shutdown), so no
    child outlives its parent; our own cancellation is re-raised once they are done.
    """
    for task in tasks:
        task.cancel()
    cancelled = False
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            cancelled = True
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "Task exception was never retrieved"
    if cancelled:
        raise asyncio.CancelledError


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, totals: list[int],
                index: int) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            totals[index] += len(data)
            await writer.drain()
    except (ConnectionError, OSError):
        # One side reset: end both directions so neither waits on a dead peer.
        close_quietly(writer)
        return
    # Half-close: pass the end of this direction on; TLS transports cannot, so close instead.
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
    else:
        close_quietly(writer)


def enable_keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive (first probe after 60 s idle) so a peer that vanished is noticed."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def has_buffered_bytes(reader: asyncio.StreamReader | None) -> bool:
    """True when bytes have arrived that nobody has read yet.

    StreamReader has no public way to ask; its `_buffer` has been the same since Python 3.4.
    Used to refuse reusing an upstream that sent bytes nobody asked for, and to notice a TLS
    ClientHello sent together with CONNECT.
    """
    return bool(getattr(reader, "_buffer", None))


def has_unread_input(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True when an idle connection has input waiting: in the reader, or still in the socket.

    An idle HTTP connection must be silent; one that is readable (stray bytes or a close) is not
    reused. The socket poll catches bytes the event loop has not read into the reader yet.
    """
    if has_buffered_bytes(reader) or reader.at_eof():
        return True
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def close_quietly(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None and not writer.is_closing():
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()
