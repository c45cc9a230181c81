"""Closed connections are freed by reference counting, not left for the cycle collector.

Each intercepted connection holds two asyncio TLS protocols with read buffers; a reference cycle
through the relay would keep them until a full collection, which is how RSS once grew to 76 MB.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import io
import socket
import ssl

from halton_meter.config import load_settings
from halton_meter.fakeprovider import FakeProvider
from halton_meter.serve import serve


def one_call(port: int, bundle: str) -> bytes:
    context = ssl.create_default_context(cafile=bundle)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    tls = context.wrap_socket(sock, server_hostname="api.anthropic.com")
    body = b'{"model": "claude-sonnet-4-5", "stream": true}'
    tls.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\ncontent-type: application/json\r\n"
                b"Connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    while piece := tls.recv(65536):
        data += piece
    tls.close()
    return data


def test_closed_connections_leave_no_cycles(tmp_path):
    async def scenario() -> collections.Counter:
        fake = FakeProvider(tmp_path / "fake")
        fake_port = await fake.start()
        settings = load_settings(tmp_path / "home", port=0, api_port=0,
                                 upstreams=[f"api.anthropic.com=127.0.0.1:{fake_port}"],
                                 upstream_ca_files=[str(fake.ca_path)])
        out, stop = io.StringIO(), asyncio.Event()
        running = asyncio.create_task(serve(settings, out=out, stop=stop))
        while "use it:" not in out.getvalue():
            await asyncio.sleep(0.02)
        port = int(out.getvalue().split("127.0.0.1:")[1].split()[0])
        bundle = str(settings.bundle_path)
        await asyncio.to_thread(one_call, port, bundle)  # warm caches
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                assert b"message_stop" in await asyncio.to_thread(one_call, port, bundle)
            await asyncio.sleep(0.3)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            leftovers = collections.Counter(type(o).__name__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        stop.set()
        await running
        await fake.close()
        return leftovers

    leftovers = asyncio.run(scenario())
    for name in ("SSLProtocol", "_Relay", "_ClientProtocol", "StreamWriter", "Tap"):
        assert leftovers[name] == 0, f"{leftovers[name]} {name} objects kept alive by cycles: {leftovers}"
