"""Blind tunnels: bytes both ways, counted as they pass, and no socket pinned by a half-close."""

from __future__ import annotations

import asyncio
import time

from halton_meter.tunnel import splice


async def _tunnel_harness(upstream_handler, linger_s: float):
    """client <-> [splice] <-> upstream, all on loopback; returns (client streams, result future)."""
    upstream = await asyncio.start_server(upstream_handler, "127.0.0.1", 0)
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_client(reader, writer):
        up_reader, up_writer = await asyncio.open_connection(*upstream.sockets[0].getsockname()[:2])
        started = time.monotonic()
        totals = await splice(reader, writer, up_reader, up_writer, linger_s=linger_s)
        result.set_result((totals, time.monotonic() - started))

    front = await asyncio.start_server(on_client, "127.0.0.1", 0)
    client = await asyncio.open_connection(*front.sockets[0].getsockname()[:2])
    return client, result, (upstream, front)


def test_bytes_flow_both_ways_and_are_counted():
    async def scenario():
        async def echo(reader, writer):
            while data := await reader.read(1024):
                writer.write(data.upper())
                await writer.drain()
            writer.close()

        (reader, writer), result, servers = await _tunnel_harness(echo, linger_s=5)
        writer.write(b"hello tunnel")
        await writer.drain()
        assert await reader.readexactly(12) == b"HELLO TUNNEL"
        writer.close()
        totals, _ = await asyncio.wait_for(result, 5)
        for server in servers:
            server.close()
        return totals

    assert asyncio.run(scenario()) == [12, 12]


def test_a_peer_that_never_finishes_after_a_half_close_is_let_go():
    async def scenario():
        async def says_bye(reader, writer):
            writer.write(b"bye")
            await writer.drain()
            writer.close()  # the upstream is done; the client below never closes its side

        (reader, writer), result, servers = await _tunnel_harness(says_bye, linger_s=0.3)
        assert await reader.read(100) == b"bye"
        totals, elapsed = await asyncio.wait_for(result, 5)
        writer.close()
        for server in servers:
            server.close()
        return totals, elapsed

    totals, elapsed = asyncio.run(scenario())
    assert totals == [0, 3] and elapsed < 2
