"""The user-facing listener: reads the proxy request, then tunnels blind or hands off to interception.

- `CONNECT provider:443` -> 200, then TLS termination and metering (intercept.py).
- `CONNECT anything-else` -> 200, then a blind TCP tunnel: no TLS termination, no parsing.
- `GET http://host/...` (plain-HTTP absolute form) -> forwarded unmetered, one request per
  connection; providers are HTTPS-only, so nothing there is metered.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
import socket
import time
import weakref
from pathlib import Path
from urllib.parse import urlsplit

from halton_meter.adapters import is_provider_host, selftest
from halton_meter.config import check_loopback
from halton_meter.http1 import MAX_HEAD_BYTES, ProtocolError, RequestHead, parse_request_head
from halton_meter.intercept import Interceptor, upstream_address
from halton_meter.relay import reply_error
from halton_meter.spool import note_metering_gap
from halton_meter.tunnel import close_quietly, enable_keepalive, has_buffered_bytes, splice

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0  # a client must finish its CONNECT line and headers in this time
_HOST_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")
# ASCII digits only, and few: str.isdigit() takes "²", which int() refuses, and int() refuses
# over 4300 digits, both with a ValueError that names neither the target nor the fix.
_PORT = re.compile(r"[0-9]{1,5}")


class _ClientProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol that tells its relay when the client connection is gone."""

    def __init__(self, reader: asyncio.StreamReader, handler) -> None:
        # A weak reference: a closure holding `self` would make a cycle that keeps both TLS
        # sides of every closed connection (two asyncio read buffers) until a full GC.
        me = weakref.ref(self)
        super().__init__(reader, lambda r, w: handler(r, w, me()))
        self.on_lost = None
        # Set by the interceptor before it starts TLS on this connection: from then on an EOF
        # closes it (asyncio cannot keep a TLS connection half-open, and warns if asked to).
        self.tls = False

    def eof_received(self) -> bool:
        if self.tls:
            super().eof_received()
            return False
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_lost is not None:
            self.on_lost()


class ProxyServer:
    """Accepts proxy connections on a loopback address and owns their tasks until shutdown."""

    def __init__(self, interceptor: Interceptor | None, *, listen: str = "127.0.0.1", port: int = 8081,
                 upstreams: dict[str, tuple[str, int]] | None = None, connect_timeout_s: float = 15.0) -> None:
        """`interceptor` None: the edge's fail-open mode, where provider hosts are tunnelled blind
        (to their configured upstream, if any) because metering is down."""
        check_loopback(listen)
        self.interceptor = interceptor
        self.upstreams = interceptor.upstreams if interceptor is not None else dict(upstreams or {})
        self.connect_timeout_s = interceptor.connect_timeout_s if interceptor is not None else connect_timeout_s
        self.shutting_down = False
        self.listen = listen
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._hurry = asyncio.Event()
        self.unmetered_connections = 0  # provider connections tunnelled blind: metering gaps
        # The edge notes each one there (spool.py) for the daemon's next start to report.
        self.gap_notes: Path | None = None

    async def start(self, *, listen: bool = True) -> int:
        """Bind and listen; returns the actual port (useful with port 0). `listen` False: only
        sockets given to `adopt` are served (the daemon behind an edge)."""
        if listen:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(self._protocol, self.listen, self.port, backlog=512)
            self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a client connection accepted elsewhere (handed off by the edge, or by our own
        accept loop), exactly as if this server had accepted it."""
        if self.shutting_down:
            sock.close()
            return
        await asyncio.get_running_loop().connect_accepted_socket(self._protocol, sock)

    def _protocol(self) -> _ClientProtocol:
        return _ClientProtocol(asyncio.StreamReader(limit=MAX_HEAD_BYTES), self._on_connection)

    async def close(self, grace_s: float = 2.0) -> None:
        """Stop accepting, let calls in flight finish for `grace_s` (less if `hurry` is called),
        then interrupt the rest. Idle kept-alive connections close at once."""
        if self._server is not None:
            self._server.close()
        self.shutting_down = True
        if self.interceptor is not None:
            self.interceptor.begin_shutdown()
        await asyncio.sleep(0)  # connections accepted a moment ago start, see the flag, and end
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        pending = set(self._tasks)
        hurry = asyncio.create_task(self._hurry.wait())
        try:
            while (pending := {t for t in pending if not t.done()}) and not self._hurry.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(pending | {hurry}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    def hurry(self) -> None:
        """Cut the shutdown grace period short (a second Ctrl-C)."""
        self._hurry.set()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             protocol: _ClientProtocol) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self.shutting_down:
                return  # accepted just before the listener closed
            await self._serve(reader, writer, protocol)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one connection's bug must not reach the server loop
            log.exception("connection_failed")
        finally:
            close_quietly(writer)
            self._tasks.discard(task)

    async def _serve(self, reader, writer, protocol) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                raw = await reader.readuntil(b"\r\n\r\n")
            head = parse_request_head(raw)
        except TimeoutError:  # before OSError, its base class: else the client never hears why
            return await reply_error(writer, 408, "the proxy request did not arrive in time.")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return
        except asyncio.LimitOverrunError:
            return await reply_error(writer, 431, f"request head is larger than {MAX_HEAD_BYTES // 1024} KiB.")
        except ProtocolError as exc:
            return await reply_error(writer, exc.status, f"malformed proxy request ({exc}).")
        if head.method == "CONNECT":
            await self._connect(head, reader, writer, protocol)
        elif head.target.lower().startswith("http://"):
            await _forward_plain(head, reader, writer, self.connect_timeout_s)
        else:
            await reply_error(writer, 400, (
                f"this is a proxy; {head.method} {head.target[:60]} is not a proxy request. "
                f"Set HTTPS_PROXY=http://{self.listen}:{self.port} and call the provider's https:// URL."
            ))

    async def _connect(self, head: RequestHead, reader, writer, protocol) -> None:
        try:
            host, port = parse_authority(head.target)
        except ValueError as exc:
            return await reply_error(writer, 400, str(exc))
        provider = _provider(host, port)
        if provider is not None and self.interceptor is None:
            self.unmetered_connections += 1
            log.warning("metering_gap host=%s action=direct_tunnel reason=daemon_unavailable", provider)
            if self.gap_notes is not None:
                note_metering_gap(self.gap_notes, time.time())
        elif provider is not None:
            try:
                context = await self.interceptor.server_context(provider)
            except Exception as exc:  # noqa: BLE001 - fail open: the provider is still reachable blind
                log.error("intercept_unavailable host=%s error=%r action=blind_tunnel", provider, exc)
            else:
                if has_buffered_bytes(reader):
                    # The client sent its TLS ClientHello without waiting for our 200: those bytes
                    # are already read and cannot reach our TLS layer. Fail open: tunnel unmetered.
                    log.warning("connect_pipelined host=%s action=blind_tunnel", provider)
                else:
                    writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    # No await between this check, the 200 and start_tls: the ClientHello must
                    # reach TLS, not us.
                    return await self.interceptor.handle(
                        reader, writer, protocol, provider, port, context, project=proxy_user(head))
        # Unmetered; a provider still goes to the address the user configured for it (a gateway).
        address, target_port = upstream_address(self.upstreams, provider, port) if provider else (host, port)
        await _blind_tunnel(address, target_port, reader, writer, self.connect_timeout_s)

def _provider(host: str, port: int) -> str | None:
    """The provider host a CONNECT names, or None. Providers are metered on 443 only; the
    self-test's upstream listens on a free loopback port, named in its CONNECT line."""
    name = host.lower().rstrip(".")
    if is_provider_host(name) and (port == 443 or name == selftest.HOST):
        return name
    return None


def parse_authority(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` from a CONNECT line; ValueError with a clear message."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"CONNECT target {target[:80]!r} is not host:port.")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"CONNECT target {target[:80]!r} has an invalid IPv6 address.") from None
    elif not _HOST_NAME.fullmatch(host) or ".." in host:  # fullmatch: `$` alone lets a final LF by
        raise ValueError(f"CONNECT target {target[:80]!r} has an invalid host name.")
    return host, int(port_text)


def proxy_user(head: RequestHead) -> str | None:
    """The user name in `Proxy-Authorization: Basic …` (how `run --project` names a project)."""
    value = head.headers.get("proxy-authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        user = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")[0]
    except ValueError:  # binascii.Error, UnicodeDecodeError, and a token that is not ASCII ("²")
        return None
    return user or None


async def _blind_tunnel(host: str, port: int, reader, writer, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            up_reader, up_writer = await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
    except TimeoutError:
        return await reply_error(writer, 504, f"timed out connecting to {host}:{port}.")
    except OSError as exc:
        return await reply_error(writer, 502, f"could not connect to {host}:{port} ({exc.strerror or exc}).")
    enable_keepalive(writer)
    enable_keepalive(up_writer)
    writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    await splice(reader, writer, up_reader, up_writer)


async def _forward_plain(head: RequestHead, reader, writer, timeout_s: float) -> None:
    url = urlsplit(head.target)
    try:
        port = url.port or 80
    except ValueError:
        return await reply_error(writer, 400, f"invalid port in {head.target[:80]!r}.")
    if not url.hostname:
        return await reply_error(writer, 400, f"no host in {head.target[:80]!r}.")
    head.target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    head.headers.remove("proxy-authorization")
    head.headers.remove("proxy-connection")
    # One request per connection keeps this path free of HTTP parsing after the head.
    head.headers.set("Connection", "close")
    try:
        async with asyncio.timeout(timeout_s):
            up_reader, up_writer = await asyncio.open_connection(url.hostname, port, limit=MAX_HEAD_BYTES)
    except TimeoutError:
        return await reply_error(writer, 504, f"timed out connecting to {url.hostname}:{port}.")
    except OSError as exc:
        return await reply_error(writer, 502, f"could not connect to {url.hostname}:{port} ({exc.strerror or exc}).")
    up_writer.write(head.serialize())
    await splice(reader, writer, up_reader, up_writer)

