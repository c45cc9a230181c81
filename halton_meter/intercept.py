"""TLS termination for provider hosts and the HTTP/1.1 relay that tees every call to a tap.

One `_Relay` per client connection, paired with at most one verified upstream connection. Bytes
go to the client first and to the tap after, so parsing can never delay or alter the stream.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import logging
import os
import ssl
import time
from http import HTTPStatus
from pathlib import Path

from halton_meter.adapters import adapter_for
from halton_meter.config import DEFAULT_CONNECT_TIMEOUT_S
from halton_meter.http1 import (
    BodyKind,
    ChunkedDecoder,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
    wants_close,
)
from halton_meter.ledger import CallRow, Ledger
from halton_meter.tap import Tap
from halton_meter.tls.ca import CertificateAuthority
from halton_meter.tunnel import close_quietly, splice

log = logging.getLogger(__name__)

STREAM_LIMIT = 64 * 1024  # also the largest head we accept (readuntil raises past it)
READ_SIZE = 64 * 1024
INLINE_BODY_BYTES = 64 * 1024  # request bodies up to this size go out in one write with the head
TLS_HANDSHAKE_TIMEOUT_S = 15.0  # a client that stalls its handshake with us
CLIENT_IDLE_TIMEOUT_S = 300.0
# Encodings the tap can decode with zlib; anything else is dropped from Accept-Encoding.
_DECODABLE_CODINGS = ("gzip", "deflate")


class UpstreamError(Exception):
    """The provider could not be reached or broke the exchange; `status` is for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ClientGone(Exception):
    pass


class Interceptor:
    """Shared by all intercepted connections: certificates, upstream trust, the ledger."""

    def __init__(
        self,
        ca: CertificateAuthority,
        ledger: Ledger,
        *,
        upstreams: dict[str, tuple[str, int]] | None = None,
        upstream_ca_files: tuple[Path, ...] = (),
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.ca = ca
        self.ledger = ledger
        self.upstreams = dict(upstreams or {})
        self.upstream_ssl = upstream_context(upstream_ca_files)
        self.connect_timeout_s = connect_timeout_s
        self.shutting_down = False
        self._server_contexts: dict[str, ssl.SSLContext] = {}

    async def server_context(self, host: str) -> ssl.SSLContext:
        context = self._server_contexts.get(host)
        if context is None:
            # Only hosts not minted at start get here; openssl runs off the event loop.
            context = await asyncio.to_thread(self.ca.server_context, host)
            self._server_contexts[host] = context
        return context

    def preload(self, hosts: tuple[str, ...]) -> None:
        for host in hosts:
            self._server_contexts[host] = self.ca.server_context(host)

    async def handle(self, reader, writer, protocol, host: str, port: int,
                     context: ssl.SSLContext, project: str | None = None) -> None:
        """Take over a client connection whose CONNECT was just answered with 200."""
        try:
            await writer.start_tls(context, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # Most often the client does not trust our CA yet: say how to fix it, once per connection.
            log.warning("client_tls_failed host=%s error=%r hint=%s", host, exc,
                        "point SSL_CERT_FILE / NODE_EXTRA_CA_CERTS at the halton-meter CA bundle")
            close_quietly(writer)
            return
        await _Relay(self, reader, writer, protocol, host, port, project).run()


def shrink_tls_read_buffers(size: int = READ_SIZE) -> None:
    """Make asyncio's per-TLS-connection read buffer `size` bytes instead of 256 KiB.

    CPython 3.11's `asyncio.sslproto.SSLProtocol` allocates (and zero-fills) a `max_size` buffer
    for every TLS connection; each intercepted call has two. 64 KiB still holds four full TLS
    records per read, and keeps 16 connections at 2 MiB instead of 8. Process-wide: called once by
    `serve`, never on import.
    """
    protocol_class = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol_class is not None and isinstance(getattr(protocol_class, "max_size", None), int):
        protocol_class.max_size = min(protocol_class.max_size, size)


def upstream_context(extra_ca_files: tuple[Path, ...] = ()) -> ssl.SSLContext:
    """Full verification (chain and host name) against the system store plus any extra anchors."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in extra_ca_files:
        context.load_verify_locations(cafile=str(path))
    context.set_alpn_protocols(["http/1.1"])
    return context


def new_call_id() -> str:
    """Time-ordered, unique: 12 hex digits of milliseconds then 12 random."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"


def narrow_accept_encoding(headers: Headers) -> None:
    """Offer the provider only codings the tap can decode with zlib (identity otherwise)."""
    values = headers.get_all("accept-encoding")
    if not values:
        return
    offered = {
        part.split(";")[0].strip().lower()
        for value in values
        for part in value.split(",")
        if not part.replace(" ", "").endswith(";q=0")
    }
    kept = [coding for coding in _DECODABLE_CODINGS if coding in offered or "*" in offered]
    headers.set("Accept-Encoding", ", ".join(kept) or "identity")


def error_response(status: int, message: str) -> bytes:
    body = f"halton-meter: {message}\n".encode()
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "X-Halton-Meter-Error: 1\r\n\r\n"
    ).encode() + body


class _Relay:
    """The request/response loop of one intercepted client connection."""

    def __init__(self, owner: Interceptor, reader, writer, protocol, host: str, port: int,
                 project: str | None) -> None:
        self.owner = owner
        self.reader: asyncio.StreamReader = reader
        self.writer: asyncio.StreamWriter = writer
        self.host = host
        self.upstream_address = owner.upstreams.get(host, (host, port))
        self.project = project
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.in_call = False
        self.response_started = False
        self.task = asyncio.current_task()
        self.protocol = protocol
        protocol.on_lost = self._client_lost

    def _client_lost(self) -> None:
        # The client hung up: stop the call now (and so the provider's generation) rather than
        # at the next chunk, which may be a long thinking pause away.
        if self.in_call and self.task is not None and not self.task.done():
            self.task.cancel()

    async def run(self) -> None:
        try:
            while await self._next_call():
                pass
        finally:
            close_quietly(self.up_writer)
            close_quietly(self.writer)
            # Unhook (protocol -> relay -> writer -> protocol) so the connection is freed now,
            # by reference counting, not at the next full garbage collection.
            self.protocol.on_lost = None
            self.task = self.protocol = None

    async def _next_call(self) -> bool:
        try:
            async with asyncio.timeout(CLIENT_IDLE_TIMEOUT_S):
                raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._reply(431, "request head is larger than 64 KiB.")
            return False
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, ssl.SSLError):
            return False
        try:
            head = parse_request_head(raw)
            kind, length = request_framing(head)
        except ProtocolError as exc:
            log.info("bad_request host=%s error=%s", self.host, exc)
            await self._reply(exc.status, f"malformed request ({exc}).")
            return False
        return await self._call(head, kind, length)

    async def _call(self, head: RequestHead, kind: BodyKind, length: int) -> bool:
        t0 = time.perf_counter()
        project = head.headers.remove("x-halton-project")
        head.headers.remove("proxy-authorization")
        head.headers.remove("proxy-connection")
        narrow_accept_encoding(head.headers)
        call = CallRow(
            call_id=new_call_id(), started_at=time.time(), host=self.host, method=head.method,
            path=head.target, project=project[-1].strip() if project else self.project,
            user_agent=head.headers.get("user-agent"),
        )
        tap = Tap(adapter_for(self.host, head.method, head.target), call.call_id, head)
        self.in_call, self.response_started = True, False
        keep_alive = complete = False
        try:
            keep_alive = await self._exchange(head, kind, length, call, tap, t0)
            complete = True
        except asyncio.CancelledError:
            call.outcome = "interrupted" if self.owner.shutting_down else "client_cancelled"
            raise
        except _ClientGone:
            call.outcome = "client_cancelled"
        except UpstreamError as exc:
            call.outcome, call.error = "upstream_error", str(exc)
            log.info("upstream_error call_id=%s host=%s status=%d error=%s",
                     call.call_id, self.host, exc.status, exc)
            if not self.response_started:
                await self._reply(exc.status, str(exc))
        finally:
            self.in_call = False
            if not keep_alive:
                close_quietly(self.up_writer)
                self.up_writer = self.up_reader = None
            self._finish_row(call, tap, complete, t0)
        return keep_alive

    def _finish_row(self, call: CallRow, tap: Tap, complete: bool, t0: float) -> None:
        call.duration_ms = (time.perf_counter() - t0) * 1000.0
        state = tap.finish(complete)
        if state is not None:
            call.model = state.response_model or state.model
            call.is_stream = state.is_stream
        call.parse_error = tap.parse_error
        if call.outcome == "ok":
            if call.status is not None and call.status >= 400:
                call.outcome = "provider_error"
            elif tap.parse_error is not None:
                call.outcome = "unparsed"
        if call.outcome == "client_cancelled" and call.error is None:
            call.error = "client disconnected before the response ended"
        self.owner.ledger.record(call)

    async def _exchange(self, head: RequestHead, kind: BodyKind, length: int, call: CallRow,
                        tap: Tap, t0: float) -> bool:
        expects_continue = (head.headers.get("expect") or "").lower() == "100-continue"
        first = head.serialize()
        inline = kind is BodyKind.NONE or (
            kind is BodyKind.LENGTH and length <= INLINE_BODY_BYTES and not expects_continue
        )
        if inline and kind is BodyKind.LENGTH:
            try:
                body = await self.reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise _ClientGone() from exc
            tap.request_chunk(body)
            first += body
        if inline:
            tap.request_complete()
        call.request_bytes = len(first)

        reused = await self._ensure_upstream()
        self.up_writer.write(first)
        if inline:
            tap.request_done()  # parsed only once the bytes are on their way
        body_task = None
        if not inline:
            body_task = asyncio.create_task(self._pump_request(kind, length, tap, call))
        try:
            try:
                response = await self._read_response_head(head, call, t0)
            except UpstreamError:
                # A kept-alive upstream may have closed just as we reused it: retry once on a
                # fresh connection when nothing was answered and the request is still in hand.
                if not (reused and inline and call.ttfb_ms is None):
                    raise
                close_quietly(self.up_writer)
                self.up_writer = self.up_reader = None
                await self._ensure_upstream()
                self.up_writer.write(first)
                response = await self._read_response_head(head, call, t0)
            keep_alive = await self._relay_response(head, response, call, tap)
        finally:
            if body_task is not None and not body_task.done():
                # The provider answered before the whole body was sent (e.g. 413): stop sending.
                body_task.cancel()
                keep_alive = False
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await body_task
        if body_task is not None and not body_task.cancelled() and body_task.exception() is not None:
            raise body_task.exception()
        return keep_alive

    async def _pump_request(self, kind: BodyKind, length: int, tap: Tap, call: CallRow) -> None:
        reader, upstream = self.reader, self.up_writer
        try:
            if kind is BodyKind.LENGTH:
                remaining = length
                while remaining:
                    data = await reader.read(min(READ_SIZE, remaining))
                    if not data:
                        raise _ClientGone()
                    upstream.write(data)
                    tap.request_chunk(data)
                    remaining -= len(data)
                    call.request_bytes += len(data)
                    await upstream.drain()
            else:
                decoder = ChunkedDecoder()
                while not decoder.done:
                    # Never read past this body: the next pipelined request may follow it.
                    wanted = decoder.data_remaining
                    data = await (reader.read(min(READ_SIZE, wanted)) if wanted
                                  else reader.readuntil(b"\n"))
                    if not data:
                        raise _ClientGone()
                    _, payload = decoder.feed(data)
                    upstream.write(data)
                    for piece in payload:
                        tap.request_chunk(piece)
                    call.request_bytes += len(data)
                    await upstream.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            raise _ClientGone() from exc
        except ProtocolError as exc:
            raise UpstreamError(400, f"malformed chunked request body ({exc}).") from exc
        tap.request_complete()
        tap.request_done()

    async def _ensure_upstream(self) -> bool:
        """Open (or keep) the verified upstream connection; True when an open one is reused."""
        if self.up_writer is not None and not self.up_writer.is_closing() and not self.up_reader.at_eof():
            return True
        close_quietly(self.up_writer)
        address, port = self.upstream_address
        where = self.host if (address, port) == (self.host, 443) else f"{self.host} (via {address}:{port})"
        try:
            # One deadline for TCP and TLS together; asyncio's own handshake timeout sits
            # behind it so that a stalled handshake also ends as a 504.
            async with asyncio.timeout(self.owner.connect_timeout_s):
                self.up_reader, self.up_writer = await asyncio.open_connection(
                    address, port, ssl=self.owner.upstream_ssl, server_hostname=self.host,
                    limit=STREAM_LIMIT, ssl_handshake_timeout=self.owner.connect_timeout_s + 5,
                )
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(502, (
                f"the certificate presented by {where} failed verification "
                f"({exc.verify_message}); the call was not sent. If you reach {self.host} through "
                "a gateway with its own CA, pass that CA with --upstream-ca FILE."
            )) from exc
        except TimeoutError as exc:
            raise UpstreamError(504, f"timed out connecting to {where}.") from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(502, f"could not connect to {where} ({exc}).") from exc
        return False

    async def _read_response_head(self, request: RequestHead, call: CallRow, t0: float) -> ResponseHead:
        while True:
            try:
                raw = await self.up_reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                raise UpstreamError(502, f"{self.host} closed the connection without answering.") from exc
            except asyncio.LimitOverrunError as exc:
                raise UpstreamError(502, f"{self.host} sent a response head over 64 KiB.") from exc
            except (ConnectionError, ssl.SSLError, OSError) as exc:
                raise UpstreamError(502, f"connection to {self.host} failed ({exc}).") from exc
            if call.ttfb_ms is None:
                call.ttfb_ms = (time.perf_counter() - t0) * 1000.0
            try:
                response = parse_response_head(raw)
            except ProtocolError as exc:
                raise UpstreamError(502, f"{self.host} sent a malformed response ({exc}).") from exc
            if 100 <= response.status < 200 and response.status != 101:
                # Interim responses (100 Continue, 103 Early Hints) pass through as they are.
                self.writer.write(raw)
                call.response_bytes += len(raw)
                continue
            return response

    async def _relay_response(self, request: RequestHead, response: ResponseHead, call: CallRow,
                              tap: Tap) -> bool:
        try:
            kind, length = response_framing(request.method, response)
        except ProtocolError as exc:
            raise UpstreamError(502, f"{self.host} sent unusable framing ({exc}).") from exc
        call.status = response.status
        self.response_started = True
        writer = self.writer
        writer.write(response.raw)
        call.response_bytes += len(response.raw)
        tap.response_head(response)
        if response.status == 101:
            # Upgraded (websocket): relay raw until either side closes; nothing more is parsed.
            sent, received = await splice(self.reader, writer, self.up_reader, self.up_writer)
            call.request_bytes += sent
            call.response_bytes += received
            return False
        try:
            clean = await self._relay_body(kind, length, call, tap)
            await writer.drain()
        except (ConnectionError, ssl.SSLError) as exc:
            if writer.is_closing() or isinstance(exc, ConnectionResetError):
                raise _ClientGone() from exc
            raise
        return (clean and kind is not BodyKind.CLOSE
                and not wants_close(request.version, request.headers)
                and not wants_close(response.version, response.headers))

    async def _relay_body(self, kind: BodyKind, length: int, call: CallRow, tap: Tap) -> bool:
        """Forward the response body as it arrives; False when the connection cannot be reused."""
        upstream, writer, tap_chunk = self.up_reader, self.writer, tap.response_chunk
        if kind is BodyKind.NONE:
            return True
        if kind is BodyKind.CHUNKED:
            decoder = ChunkedDecoder()
            while not decoder.done:
                data = await self._read_upstream(upstream)
                try:
                    used, payload = decoder.feed(data)
                except ProtocolError as exc:
                    # Forward what came anyway; without framing the connection cannot go on.
                    writer.write(data)
                    call.response_bytes += len(data)
                    raise UpstreamError(502, f"{self.host} sent broken chunked framing ({exc}).") from exc
                if used < len(data):
                    data = data[:used]  # bytes after the end: a protocol violation, dropped
                writer.write(data)
                call.response_bytes += len(data)
                for piece in payload:
                    tap_chunk(piece)
                await writer.drain()
            return used == len(data)
        remaining = length if kind is BodyKind.LENGTH else -1
        while remaining:
            if kind is BodyKind.CLOSE:
                data = await upstream.read(READ_SIZE)
                if not data:
                    return False
            else:
                data = await self._read_upstream(upstream, min(READ_SIZE, remaining))
                remaining -= len(data)
            writer.write(data)
            call.response_bytes += len(data)
            tap_chunk(data)
            await writer.drain()
        return True

    async def _read_upstream(self, upstream: asyncio.StreamReader, size: int = READ_SIZE) -> bytes:
        try:
            data = await upstream.read(size)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            raise UpstreamError(502, f"connection to {self.host} failed mid-response ({exc}).") from exc
        if not data:
            raise UpstreamError(502, f"{self.host} closed the connection mid-response.")
        return data

    async def _reply(self, status: int, message: str) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(error_response(status, message))
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            await self.writer.drain()
