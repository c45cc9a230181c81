"""The daemon's local HTTP API: small JSON documents over HTTP/1.1 on a loopback address.

GET and HEAD only, no request bodies, answered only to loopback Host names (a DNS-rebinding
defence) and to browser origins on an explicit allow-list. Heads are parsed by http1 (sans-IO);
handlers run in a worker thread, so a ledger query never stalls the proxy sharing this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import http.client
import ipaddress
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from typing import NamedTuple
from urllib.parse import parse_qs

from halton_meter.config import ConfigError, check_loopback
from halton_meter.http1 import (
    MAX_HEAD_BYTES,
    BodyKind,
    ProtocolError,
    RequestHead,
    parse_request_head,
    request_framing,
)

log = logging.getLogger(__name__)

DEFAULT_API_PORT = 8765
HEAD_TIMEOUT_S = 10.0  # a request head must arrive whole in this time
IDLE_TIMEOUT_S = 30.0  # a kept-alive connection with no new request is closed after this
MAX_CONNECTIONS = 64  # past this, new connections get a 503 and are closed
MAX_QUERY_FIELDS = 100
# After a reply that closes the connection, unread request bytes are drained (for at most this
# long and this much) before the socket closes: closing with unread input sends a TCP RST, which
# can destroy the reply before the client reads it.
LINGER_S = 1.0
LINGER_BYTES = 256 * 1024
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # get_json refuses a larger answer

Handler = Callable[[dict[str, list[str]]], tuple[int, object]]
# Ledger reads in parallel; enough that a slow first /metrics scrape never holds up /health.
HANDLER_THREADS = 4


class Document(NamedTuple):
    """A handler's non-JSON answer (the dashboard page, Prometheus text), sent as it is."""

    content_type: str
    data: bytes
    headers: tuple[tuple[str, str], ...] = ()

_ALLOWED_METHODS = "GET, HEAD"
# Replies after which the connection is closed: the request was malformed or unwelcome, or
# bytes of it may still be unread.
_CLOSING_STATUSES = frozenset({400, 403, 408, 411, 413, 431, 501, 503, 505})
_BODILESS_STATUSES = frozenset({204, 304})
_BASE_HEADERS = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"


class _Reply(NamedTuple):
    status: int
    payload: bytes | None  # encoded JSON (or a Document's bytes); None for 204/304
    headers: list[tuple[str, str]]
    content_type: str = "application/json; charset=utf-8"


class ApiServer:
    """Serves `routes` (path -> synchronous handler) on a loopback address until `close`."""

    def __init__(self, routes: dict[str, Handler], *, listen: str = "127.0.0.1",
                 port: int = DEFAULT_API_PORT, allowed_origins: tuple[str, ...] = ()) -> None:
        check_loopback(listen)
        if not 0 <= port <= 65535:
            raise ConfigError(f"API port {port} is out of range. Use a port from 0 to 65535.")
        self.routes = dict(routes)
        self.listen = listen
        self.port = port
        self.allowed_origins = frozenset(_normalise_origin(origin) for origin in allowed_origins)
        self.head_timeout_s = HEAD_TIMEOUT_S
        self.idle_timeout_s = IDLE_TIMEOUT_S
        self.max_connections = MAX_CONNECTIONS
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._serving = 0
        self._closing = False
        self._executor = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="api")

    async def start(self) -> int:
        """Bind and listen; returns the actual port (useful with port 0). OSError propagates."""
        self._server = await asyncio.start_server(
            self._on_connection, self.listen, self.port, limit=MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop accepting and close every open connection now, idle or not."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self._closing:
                writer.transport.abort()  # accepted just before the listener closed
            elif self._serving >= self.max_connections:
                log.debug("api_connection_refused reason=too_many_connections limit=%d", self.max_connections)
                reply = _error(503, "too many open connections to the API; retry shortly.")
                await self._send(writer, reply, head_only=False, close=True)
                await _linger(reader, writer)
            else:
                self._serving += 1
                try:
                    await self._serve(reader, writer)
                finally:
                    self._serving -= 1
        except asyncio.CancelledError:
            writer.transport.abort()  # close(): a peer that is not reading must not hold us up
        except OSError:
            writer.transport.abort()  # peer gone, or a reply it did not read in time
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the server
            log.error("api_connection_failed error=%s", type(exc).__name__)
            writer.transport.abort()
        finally:
            if not writer.is_closing():
                writer.close()
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The request/response loop of one connection."""
        loop = asyncio.get_running_loop()
        first_byte_deadline = loop.time() + self.head_timeout_s
        is_first = True
        while True:
            try:
                raw = await self._read_head(reader, first_byte_deadline, is_first)
            except _HeadError as exc:
                await self._send(writer, _error(exc.status, exc.message), head_only=False, close=True)
                return await _linger(reader, writer)
            if raw is None:
                return  # the client closed, or stayed idle too long: nothing to answer
            try:
                head = parse_request_head(raw)
                has_body = request_framing(head)[0] is not BodyKind.NONE
            except ProtocolError as exc:
                await self._send(writer, _error(exc.status, f"malformed request: {exc}."),
                                 head_only=False, close=True)
                return await _linger(reader, writer)
            reply = await self._answer(head, has_body)
            close = (has_body or reply.status in _CLOSING_STATUSES or self._closing
                     or head.version == "HTTP/1.0" or head.headers.has_token("connection", "close"))
            await self._send(writer, reply, head_only=head.method == "HEAD", close=close)
            if close:
                return await _linger(reader, writer)
            is_first = False
            first_byte_deadline = loop.time() + self.idle_timeout_s

    async def _read_head(self, reader: asyncio.StreamReader, first_byte_deadline: float,
                         is_first: bool) -> bytes | None:
        """The next request head, or None when the connection should just close."""
        try:
            async with asyncio.timeout_at(first_byte_deadline):
                first = await reader.read(1)
        except TimeoutError:
            return None
        if not first:
            return None
        # The first request's head shares the connection's deadline; later ones get a fresh one
        # from their first byte.
        head_deadline = first_byte_deadline if is_first else asyncio.get_running_loop().time() + self.head_timeout_s
        try:
            async with asyncio.timeout_at(head_deadline):
                rest = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            raise _HeadError(431, f"request head is larger than {MAX_HEAD_BYTES // 1024} KiB.") from None
        except TimeoutError:
            raise _HeadError(408, "the request head did not arrive in time.") from None
        return first + rest

    async def _answer(self, head: RequestHead, has_body: bool) -> _Reply:
        """What to reply to one request; security checks first, then method, then route."""
        if not head.target.startswith("/"):
            return _error(400, "the request target must be a path such as /health.")
        hosts = head.headers.get_all("host")
        if len(hosts) > 1:
            return _error(400, "the request has more than one Host header.")
        if not hosts or not hosts[0].strip():
            if head.version != "HTTP/1.0":
                return _error(400, "an HTTP/1.1 request must carry a Host header.")
        elif not is_loopback_host(hosts[0]):
            return _error(403, "this API only answers requests addressed to a loopback name "
                               "(localhost, 127.0.0.1 or [::1]); use http://127.0.0.1:PORT/.")
        cors: list[tuple[str, str]] = []
        origins = head.headers.get_all("origin")
        if origins:
            if len(origins) > 1 or not self.is_allowed_origin(origins[0]):
                return _error(403, "cross-origin requests are refused from this Origin; "
                                   "add it to the API's allowed origins to permit it.")
            cors = [("Access-Control-Allow-Origin", origins[0].strip()), ("Vary", "Origin")]
        if head.method == "OPTIONS":
            if not cors:
                return _error(403, "OPTIONS is answered only as a CORS preflight from an allowed Origin.")
            return _Reply(204, None, cors + [("Access-Control-Allow-Methods", _ALLOWED_METHODS),
                                             ("Access-Control-Max-Age", "600"),
                                             ("Allow", _ALLOWED_METHODS)])
        if head.method not in ("GET", "HEAD"):
            return _error(405, f"method {head.method[:20]} is not allowed; use GET or HEAD.",
                          cors + [("Allow", _ALLOWED_METHODS)])
        if has_body:
            return _error(400, f"a {head.method} request must not carry a body.", cors)
        path, _, query = head.target.partition("?")
        handler = self.routes.get(path)
        if handler is None:
            known = sorted(self.routes)
            return _Reply(404, _encode({"error": f"no such path; known paths: {', '.join(known)}.",
                                        "paths": known}), cors)
        try:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            return _error(400, f"the query string has more than {MAX_QUERY_FIELDS} fields.", cors)
        try:
            loop = asyncio.get_running_loop()
            status, body = await loop.run_in_executor(self._executor, handler, params)
            if type(status) is not int or not 200 <= status <= 599:
                raise TypeError("handler returned an invalid status")
            if isinstance(body, Document):
                return _Reply(status, body.data, cors + list(body.headers), body.content_type)
            payload = None if status in _BODILESS_STATUSES else _encode(body)
        except Exception as exc:  # noqa: BLE001 - a handler bug is a 500, not a dead server
            # The exception type only: a message could quote request contents.
            log.error("api_handler_failed route=%s error=%s", path, type(exc).__name__)
            return _error(500, "internal error", cors)
        return _Reply(status, payload, cors)

    def is_allowed_origin(self, origin: str) -> bool:
        """True for a configured origin or our own page (this port on a loopback name)."""
        origin = _normalise_origin(origin)
        if origin in self.allowed_origins:
            return True
        suffixes = (f":{self.port}", "") if self.port == 80 else (f":{self.port}",)
        return any(origin == f"http://{name}{suffix}"
                   for name in ("127.0.0.1", "localhost", "[::1]") for suffix in suffixes)

    async def _send(self, writer: asyncio.StreamWriter, reply: _Reply, *, head_only: bool, close: bool) -> None:
        writer.write(_serialize(reply, head_only=head_only, close=close))
        # A client that does not read its replies must not pin the connection forever.
        async with asyncio.timeout(self.idle_timeout_s):
            await writer.drain()


def is_loopback_host(value: str) -> bool:
    """True when a Host header names a loopback address: localhost, 127.x.y.z or [::1], any port.

    A page on another site that rebinds its DNS name to 127.0.0.1 still sends its own name in
    Host, so checking it keeps such pages from reading the API.
    """
    value = value.strip().lower()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and _is_port(rest[1:]))):
            return False
        try:
            return ipaddress.IPv6Address(host).is_loopback
        except ValueError:
            return False
    host, colon, port = value.partition(":")
    if colon and not _is_port(port):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        return False


def get_json(port: int, path: str, *, host: str = "127.0.0.1", timeout: float = 2.0) -> tuple[int, object]:
    """GET `path` from the API on `host:port`: (status, decoded JSON body).

    Raises OSError when nothing answers (refused, timed out), ValueError when the answer is not
    HTTP or not JSON (something else is listening on that port).
    """
    if not path.startswith("/"):
        raise ValueError(f"API path {path[:80]!r} must start with '/'.")
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Accept": "application/json"})
        response = connection.getresponse()
        data = response.read(MAX_RESPONSE_BYTES + 1)
    except OSError:
        raise
    except http.client.HTTPException as exc:
        raise ValueError(f"{host}:{port} did not answer valid HTTP ({type(exc).__name__}).") from exc
    finally:
        connection.close()
    if len(data) > MAX_RESPONSE_BYTES:
        raise ValueError(f"{host}:{port}{path} answered more than {MAX_RESPONSE_BYTES} bytes.")
    try:
        return response.status, json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{host}:{port}{path} did not answer JSON (HTTP {response.status}).") from exc


class _HeadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> _Reply:
    return _Reply(status, _encode({"error": message}), headers or [])


def _encode(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _serialize(reply: _Reply, *, head_only: bool, close: bool) -> bytes:
    try:
        reason = http.HTTPStatus(reply.status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {reply.status} {reason}\r\nDate: {formatdate(usegmt=True)}\r\n"]
    if reply.payload is not None:
        # RFC 9110 8.6: no Content-Length in a 204; HEAD announces the length GET would send.
        lines.append(f"Content-Type: {reply.content_type}\r\nContent-Length: {len(reply.payload)}\r\n")
    lines.append(_BASE_HEADERS)
    lines.extend(f"{name}: {value}\r\n" for name, value in reply.headers)
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    data = "".join(lines).encode("latin-1")
    if reply.payload and not head_only:
        data += reply.payload
    return data


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close after the last reply, then discard what the client still sends, briefly."""
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
    drained = 0
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(LINGER_S):
            while drained < LINGER_BYTES:
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    return
                drained += len(chunk)


def _normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and 0 < int(text) <= 65535
