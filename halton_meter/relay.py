"""The HTTP/1.1 relay of one intercepted connection: forward every byte, tee a copy, write a row.

One `Relay` per client connection, paired with at most one verified upstream connection. Bytes go
to the client first and to the tap after, so parsing can never delay or alter the stream. Errors
are told apart by direction: the client's side (`client_cancelled`, `bad_request`), the
provider's side (`upstream_error`), and our own bugs (`proxy_error`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import threading
import time
from concurrent.futures import Future
from http import HTTPStatus

from halton_meter.adapters import adapter_for
from halton_meter.adapters.base import BILL_TOKENS, Adapter, CallState
from halton_meter.adapters.selftest import PROVIDER as SELFTEST_PROVIDER
from halton_meter.attribution import slugify_project
from halton_meter.bodies import BodyCapture
from halton_meter.budgets import Refusal
from halton_meter.clients import client_family
from halton_meter.http1 import (
    MAX_HEAD_BYTES,
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
from halton_meter.ledger import CallRow
from halton_meter.redaction import redact_target
from halton_meter.tap import Tap
from halton_meter.tunnel import READ_SIZE, close_quietly, has_buffered_bytes, has_unread_input, settle, splice

log = logging.getLogger(__name__)

INLINE_BODY_BYTES = 64 * 1024  # request bodies up to this size go out in one write with the head
CLIENT_IDLE_TIMEOUT_S = 300.0  # how long a kept-alive client may stay silent between calls
# Once a request's first byte is in, the rest of its head must follow within this time (as a
# CONNECT head must at the edge): a client dribbling its head cannot hold a connection for long.
REQUEST_HEAD_TIMEOUT_S = 30.0
# A row whose process lookup has not answered by then is recorded as `default` (the lookup's own
# deadline is 0.5 s; this covers one stuck in a system call).
LOOKUP_WAIT_S = 5.0
# After answering before the client finished its upload, read and drop its remaining bytes this
# long before closing: closing with unread data sends a TCP reset that can wipe the answer.
UNREAD_BODY_DRAIN_S = 2.0
# With a budget or model rule naming a project, how long a call whose project only the process
# lookup can tell waits for it (typically under a millisecond); past it, the call goes on as
# `default`'s.
POLICY_LOOKUP_WAIT_S = 1.0
# A model rule must read the model before the call is forwarded: request bodies up to this size are
# read whole first (providers accept far less); a larger one is refused with 413.
MAX_CHECKED_BODY_BYTES = 64 * 1024 * 1024
# RFC 9110 9.2.2: only these may be repeated automatically after a connection failure.
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Encodings the tap can decode with zlib; anything else is dropped from Accept-Encoding.
_DECODABLE_CODINGS = ("gzip", "deflate")
_CONNECTION_ERRORS = (ConnectionError, ssl.SSLError, OSError)


class UpstreamError(Exception):
    """The provider could not be reached or broke the exchange; `status` is for the client."""

    def __init__(self, status: int, message: str, *, nothing_received: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.nothing_received = nothing_received


class ClientError(Exception):
    """The client sent something we cannot relay; `status` is what it is told."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ClientGone(Exception):
    pass


class _Refused(Exception):
    """A policy answered the call itself; nothing reached the provider and no row is due."""

    def __init__(self, keep_alive: bool) -> None:
        super().__init__()
        self.keep_alive = keep_alive


def new_call_id() -> str:
    """Time-ordered, unique: 12 hex digits of milliseconds then 12 random."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"


def narrow_accept_encoding(headers: Headers) -> None:
    """Offer the provider only codings the tap can decode with zlib (identity otherwise).

    q-values count (RFC 9110 12.5.3): a coding the client refused with q=0 is never offered.
    """
    values = headers.get_all("accept-encoding")
    if not values:
        return
    weights: dict[str, float] = {}
    for element in (part for value in values for part in value.split(",")):
        coding, *params = (piece.strip().lower() for piece in element.split(";"))
        if not coding:
            continue
        weight = 1.0
        for param in params:
            name, _, number = param.partition("=")
            if name.strip() == "q":
                try:
                    weight = float(number)
                except ValueError:
                    weight = 0.0
        weights[coding] = weight
    wildcard = weights.get("*", 0.0)
    kept = [coding for coding in _DECODABLE_CODINGS if weights.get(coding, wildcard) > 0]
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


async def reply_error(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    """Answer with a short plain-text error and `Connection: close`; quiet if the peer is gone."""
    if writer.is_closing():
        return
    writer.write(error_response(status, message))
    try:
        await writer.drain()
    except _CONNECTION_ERRORS:
        pass


class Relay:
    """The request/response loop of one intercepted client connection."""

    def __init__(self, owner, reader, writer, protocol, host: str, port: int,
                 project: str | None) -> None:
        self.owner = owner  # the Interceptor: ledger, upstream trust and addresses, shutdown flag
        self.reader: asyncio.StreamReader = reader
        self.writer: asyncio.StreamWriter = writer
        self.host = host
        self.upstream_address, self.upstream_ssl = owner.upstream_for(host, port)
        # Attribution (attribution.py), highest first: the request's X-Halton-Project header, the
        # proxy credentials of `run --project` (this connection's), the calling process.
        self.project = slugify_project(project) if project else None
        # The process lookup, once per connection and only if a call needs it; it starts while
        # the provider is working on the first such call, so it never competes with the
        # handshake or the request for the CPU.
        self.attribution: Future | None = None
        self.lookup_started = False
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.idle = False  # waiting for the client's next request: shutdown may close it now
        self.in_call = False  # a response is due: losing the client cancels the call
        self.cancel_reason: str | None = None  # the outcome a cancellation of this relay means
        self.response_started = False
        self.unread_request_body = False
        self.cut_response = False  # the provider broke a response already started: never end it cleanly
        self.close_delimited = False  # the response being relayed ends when the provider closes
        self.task = asyncio.current_task()
        self.protocol = protocol
        protocol.on_lost = self._client_lost

    def _client_lost(self) -> None:
        # The client hung up: stop the call now (and so the provider's generation) rather than
        # at the next chunk, which may be a long thinking pause away.
        if self.in_call:
            self.cancel("client_cancelled")

    def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.cancel_reason = self.cancel_reason or reason
            self.task.cancel()

    async def run(self) -> None:
        try:
            while await self._next_call():
                pass
            if self.unread_request_body:
                await self._drain_client()
        finally:
            close_quietly(self.up_writer)
            if self.cut_response:
                await _end_without_close_notify(self.writer)
            close_quietly(self.writer)
            # Unhook (protocol -> relay -> writer -> protocol) so the connection is freed now,
            # by reference counting, not at the next full garbage collection.
            self.protocol.on_lost = None
            self.task = self.protocol = None

    async def _drain_client(self) -> None:
        try:
            async with asyncio.timeout(UNREAD_BODY_DRAIN_S):
                while await self.reader.read(READ_SIZE):
                    pass
        except (TimeoutError, *_CONNECTION_ERRORS):
            pass

    async def _next_call(self) -> bool:
        if self.owner.shutting_down:
            return False
        first = b""
        self.idle = True  # no call has begun until its head is whole: shutdown may close us now
        try:
            async with asyncio.timeout(CLIENT_IDLE_TIMEOUT_S):
                first = await self.reader.readexactly(1)
            # Silence between calls may be long, but a begun head must follow promptly: one byte
            # every few seconds would otherwise hold the connection for the idle timeout.
            async with asyncio.timeout(REQUEST_HEAD_TIMEOUT_S):
                raw = first + await self.reader.readuntil(b"\r\n\r\n")
            head = parse_request_head(raw)
            kind, length = request_framing(head)
            refusal = None
        except asyncio.LimitOverrunError:
            refusal = 431, f"request head is larger than {MAX_HEAD_BYTES // 1024} KiB."
        except TimeoutError:
            if not first:
                return False  # idle too long between calls: closed quietly
            refusal = 408, f"the request head did not arrive within {REQUEST_HEAD_TIMEOUT_S:g} s."
        except ProtocolError as exc:
            refusal = exc.status, f"malformed request ({exc})."
        except (asyncio.IncompleteReadError, *_CONNECTION_ERRORS):
            return False
        finally:
            self.idle = False
        if refusal is not None:
            status, message = refusal
            log.info("bad_request host=%s status=%d error=%s", self.host, status, message)
            # What the client sent after the head is still unread: drained before closing, so
            # that closing does not send a reset that can wipe this answer.
            self.unread_request_body = True
            await reply_error(self.writer, status, message)
            return False
        keep_alive = await self._call(head, kind, length)
        return keep_alive and not self.owner.shutting_down

    async def _call(self, head: RequestHead, kind: BodyKind, length: int) -> bool:
        t0 = time.perf_counter()
        named = head.headers.remove("x-halton-project")
        head.headers.remove("proxy-authorization")
        head.headers.remove("proxy-connection")
        narrow_accept_encoding(head.headers)
        call = CallRow(
            call_id=new_call_id(), started_at=time.time(), host=self.host, method=head.method,
            path=redact_target(head.target), user_agent=head.headers.get("user-agent"),
            client=client_family(head.headers),
        )
        header_project = slugify_project(named[-1]) if named else None
        if header_project:
            call.project, call.project_source = header_project, "header"
        elif self.project:
            call.project, call.project_source = self.project, "proxy_auth"
        ledger = self.owner.ledger
        capture = (BodyCapture(list(head.headers.fields), ledger.bodies.max_body_bytes)
                   if ledger.captures_bodies else None)
        tap = Tap(self._adapter(head), call.call_id, head, capture)
        self.in_call, self.response_started = True, False
        keep_alive = complete = False
        recorded = True
        try:
            keep_alive = await self._exchange(head, kind, length, call, tap, t0)
            complete = True
        except _Refused as refused:
            keep_alive, recorded = refused.keep_alive, False
        except asyncio.CancelledError:
            call.outcome = self.cancel_reason or ("interrupted" if self.owner.shutting_down else "client_cancelled")
            raise
        except _ClientGone:
            call.outcome = "client_cancelled"
        except ClientError as exc:
            call.outcome, call.error = "bad_request", str(exc)
            await self._error_reply(exc.status, str(exc))
        except UpstreamError as exc:
            call.outcome, call.error = "upstream_error", str(exc)
            # Only a body without a length needs the missing close_notify to look cut; the others
            # show their truncation by their framing, and a clean close keeps every byte sent.
            self.cut_response = self.response_started and self.close_delimited
            log.info("upstream_error call_id=%s host=%s status=%d error=%s",
                     call.call_id, self.host, exc.status, exc)
            await self._error_reply(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug of ours: record it, never kill the server
            call.outcome, call.error = "proxy_error", f"{type(exc).__name__}: {exc}"[:500]
            log.exception("proxy_error call_id=%s host=%s", call.call_id, self.host)
            await self._error_reply(502, "halton-meter failed while relaying this call; see its log.")
        finally:
            self.in_call = False
            if not keep_alive:
                self._drop_upstream()
            if recorded:
                self._finish_row(call, tap, complete, t0)
        return keep_alive

    def _record(self, call: CallRow) -> None:
        """Hand the row to the ledger once its project is known; a process lookup still running
        records it when it ends (the response is already with the client: nothing waits)."""
        ledger = self.owner.ledger
        if call.project_source is None:
            self._start_lookup()  # the call failed before the provider answered; the socket is still open
        lookup = self.attribution
        if call.project_source is not None or lookup is None:
            call.project_source = call.project_source or "default"
            ledger.record(call)
        elif lookup.done():
            _attribute(call, lookup)
            ledger.record(call)
        else:
            # Whichever comes first: the lookup's answer, or `default` once it has run too long
            # (a process stuck in the kernel, a hung filesystem under its cwd).
            pending = _PendingRow(call, ledger)
            lookup.add_done_callback(pending.record)
            asyncio.get_running_loop().call_later(LOOKUP_WAIT_S, pending.record, None)

    def _start_lookup(self) -> None:
        if not self.lookup_started:
            self.lookup_started = True
            self.attribution = self.owner.attribute(self.writer)

    def _adapter(self, head: RequestHead) -> Adapter:
        try:
            return adapter_for(self.host, head.method, head.target)
        except Exception:  # noqa: BLE001 - a registry bug must not cost the user the call
            log.exception("adapter_lookup_failed host=%s", self.host)
            return Adapter()

    async def _error_reply(self, status: int, message: str) -> None:
        if not self.response_started:
            await reply_error(self.writer, status, message)

    def _finish_row(self, call: CallRow, tap: Tap, complete: bool, t0: float) -> None:
        call.duration_ms = (time.perf_counter() - t0) * 1000.0
        state = tap.finish(complete)
        call.provider = tap.adapter.provider
        if state is not None:
            copy_state(call, state)
        call.parse_error = tap.parse_error
        if call.outcome == "ok":
            if call.status is not None and call.status >= 400:
                call.outcome = "provider_error"
            elif call.error_type is not None:
                call.outcome = "provider_error"  # an error event inside a 200 stream
            elif tap.parse_error is not None:
                call.outcome = "unparsed"
        if call.outcome == "client_cancelled" and call.error is None:
            call.error = "client disconnected before the response ended"
        call.bodies = tap.capture
        self._record(call)
        if log.isEnabledFor(logging.DEBUG):  # one line per call, never per chunk
            log.debug("call call_id=%s host=%s method=%s path=%s status=%s outcome=%s stream=%s "
                      "ttfb_ms=%.1f duration_ms=%.1f", call.call_id, call.host, call.method, call.path,
                      call.status, call.outcome, call.is_stream, call.ttfb_ms or 0.0, call.duration_ms)

    # ---- one exchange ---------------------------------------------------------------------

    async def _exchange(self, head: RequestHead, kind: BodyKind, length: int, call: CallRow,
                        tap: Tap, t0: float) -> bool:
        expects_continue = (head.headers.get("expect") or "").lower() == "100-continue"
        inline = kind is BodyKind.NONE or (
            kind is BodyKind.LENGTH and length <= INLINE_BODY_BYTES and not expects_continue
        )
        body = b""
        if inline and kind is BodyKind.LENGTH:
            try:
                async with asyncio.timeout(CLIENT_IDLE_TIMEOUT_S):
                    body = await self.reader.readexactly(length)
            except TimeoutError as exc:
                raise _body_stalled() from exc
            except (asyncio.IncompleteReadError, *_CONNECTION_ERRORS) as exc:
                raise _ClientGone() from exc
            tap.request_chunk(body)
        if inline:
            tap.request_complete()
        policies = self.owner.ledger.policies
        if policies is not None and policies.active:
            body, inline = await self._enforce(policies, head, kind, length, body, inline, call, tap)
        first = head.serialize() + body
        call.request_bytes = len(first)

        reused = await self._ensure_upstream()
        if not inline:
            await self._send_upstream(first)
            return await self._exchange_streamed_body(head, kind, length, call, tap, t0)
        try:
            await self._send_upstream(first)
            tap.request_done()  # parsed only once the bytes are on their way
            response = await self._read_response_head(head, call, t0)
        except UpstreamError as exc:
            # A kept-alive upstream may have closed just as we reused it. Repeat the request on a
            # fresh connection only when not one byte came back and repeating is safe (RFC 9112
            # 9.3.1.1): a POST is never sent twice, it could be billed twice.
            if not (reused and exc.nothing_received and head.method in _IDEMPOTENT_METHODS):
                raise
            self._drop_upstream()
            await self._ensure_upstream()
            await self._send_upstream(first)
            call.request_bytes += len(first)
            response = await self._read_response_head(head, call, t0)
        return await self._relay_response(head, response, call, tap)

    async def _exchange_streamed_body(self, head: RequestHead, kind: BodyKind, length: int,
                                      call: CallRow, tap: Tap, t0: float) -> bool:
        """Send a large or `Expect: 100-continue` body while watching for the provider's answer.

        A provider may answer (413, 417…) and close before the body is sent: its answer wins over
        the failed send. Only a fault on the client's side ends the call before the answer.
        """
        body_task = asyncio.create_task(self._pump_request(kind, length, tap, call))
        head_task = asyncio.create_task(self._read_response_head(head, call, t0))
        try:
            done, _ = await asyncio.wait({body_task, head_task}, return_when=asyncio.FIRST_COMPLETED)
            if body_task in done and isinstance(body_task.exception(), (ClientError, _ClientGone)):
                raise body_task.exception()
            response = await head_task
            keep_alive = await self._relay_response(head, response, call, tap)
            if not body_task.done() or body_task.exception() is not None:
                # Answered before the whole body went out: neither connection can be reused,
                # and the rest of the client's upload is still unread.
                self.unread_request_body = True
                keep_alive = False
            return keep_alive
        finally:
            await settle({head_task, body_task})

    async def _pump_request(self, kind: BodyKind, length: int, tap: Tap, call: CallRow, sink=None) -> None:
        """Read the request body as it arrives and pass it on: to the provider, or to `sink`."""
        sink = sink or self._send_upstream
        reader = self.reader
        decoder = ChunkedDecoder() if kind is BodyKind.CHUNKED else None
        remaining = length
        try:
            while (remaining > 0) if decoder is None else (not decoder.done):
                async with asyncio.timeout(CLIENT_IDLE_TIMEOUT_S):  # a client stalled mid-body
                    if decoder is None:
                        data = await reader.read(min(READ_SIZE, remaining))
                    else:
                        # Never read past this body: the next pipelined request may follow it.
                        wanted = decoder.data_remaining
                        data = await (reader.read(min(READ_SIZE, wanted)) if wanted else reader.readuntil(b"\n"))
                if decoder is None:
                    payload = (data,)
                    remaining -= len(data)
                else:
                    payload = decoder.feed(data)[1] if data else ()
                if not data:
                    raise _ClientGone()
                await sink(data)
                call.request_bytes += len(data)
                for piece in payload:
                    tap.request_chunk(piece)
        except TimeoutError as exc:
            raise _body_stalled() from exc
        except (asyncio.IncompleteReadError, *_CONNECTION_ERRORS) as exc:
            raise _ClientGone() from exc
        except (ProtocolError, asyncio.LimitOverrunError) as exc:
            raise ClientError(400, f"malformed chunked request body ({exc}).") from exc
        tap.request_complete()
        tap.request_done()

    # ---- budgets and model rules (budgets.py) -----------------------------------------------

    async def _enforce(self, policies, head: RequestHead, kind: BodyKind, length: int, body: bytes,
                       inline: bool, call: CallRow, tap: Tap) -> tuple[bytes, bool]:
        """Answer the call here if a budget or model rule stops it (then raise `_Refused`); else
        return (body, inline), the body read whole when a model rule must see the model.

        Fails open: an error in the policy code itself is logged and the call goes on."""
        adapter = tap.adapter
        if adapter.name == "generic" or adapter.provider == SELFTEST_PROVIDER:
            return body, inline  # listings, files, the self-test: nothing billed by tokens
        if call.project_source is None and policies.needs_project:
            await self._await_lookup(call)
        try:
            project = self.owner.ledger.canonical_project(call.project or "default")
            needs_model = policies.rules_for(project)
            if not needs_model and not policies.blocking_for(project, adapter.provider):
                return body, inline
            if inline:
                tap.request_done()  # parsed now, before forwarding: the model decides
                state = tap.state
            else:
                state = _probe(adapter, head)  # the path alone: endpoint, billing, a model in the path
        except Exception:  # noqa: BLE001 - a policy bug must never cost the user the call
            log.exception("policy_check_failed host=%s", self.host)
            return body, inline
        if needs_model and not inline and state is not None and state.request_model is None:
            # The model is in the body (not the path, as for Gemini or Bedrock): read it first.
            body, inline = await self._read_whole_body(head, kind, length, call, tap), True
            state = tap.state
        try:
            refusal = _refusal_for(policies, project, adapter.provider, state)
            if refusal is None:
                return body, inline
            keep_alive = inline and not wants_close(head.version, head.headers)
            answer = refusal_response(refusal, adapter.provider, head.target, keep_alive)
        except Exception:  # noqa: BLE001
            log.exception("policy_check_failed host=%s", self.host)
            return body, inline
        self.unread_request_body = not inline
        self.owner.ledger.record_event(refusal.event)
        policies.refusals += 1
        log.info("call_refused host=%s project=%s status=%d kind=%s", self.host, project, refusal.status,
                 refusal.event.kind)
        self.response_started = True
        try:
            await self._to_client(answer, call)
        except _ClientGone:
            keep_alive = False
        raise _Refused(keep_alive)

    async def _await_lookup(self, call: CallRow) -> None:
        """The process lookup's project on the row now, if it answers in time."""
        self._start_lookup()
        lookup = self.attribution
        if lookup is None:
            return
        try:
            async with asyncio.timeout(POLICY_LOOKUP_WAIT_S):
                # shield: a timeout here must not cancel the lookup, the row still wants it
                await asyncio.shield(asyncio.wrap_future(lookup))
        except Exception:  # noqa: BLE001 - too slow or failed: recorded later as the lookup decides
            return
        _attribute(call, lookup)

    async def _read_whole_body(self, head: RequestHead, kind: BodyKind, length: int, call: CallRow,
                               tap: Tap) -> bytes:
        """The request body, read before forwarding; `Expect: 100-continue` is answered here."""
        if kind is BodyKind.LENGTH and length > MAX_CHECKED_BODY_BYTES:
            self.unread_request_body = True  # refused before the client was told to send it
            raise ClientError(413, _too_large_to_check())
        if (head.headers.get("expect") or "").lower() == "100-continue":
            head.headers.remove("expect")
            if head.version != "HTTP/1.0":
                await self._to_client(b"HTTP/1.1 100 Continue\r\n\r\n", call)
        parts: list[bytes] = []
        size = 0

        async def keep(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_CHECKED_BODY_BYTES:
                self.unread_request_body = True  # drained, not read, before the connection closes
                raise ClientError(413, _too_large_to_check())
            parts.append(data)


        await self._pump_request(kind, length, tap, call, keep)
        call.request_bytes = 0  # counted again, with the head, when the whole request is sent
        return b"".join(parts)

    # ---- the provider's side ----------------------------------------------------------------

    async def _ensure_upstream(self) -> bool:
        """Open (or keep) the verified upstream connection; True when an open one is reused."""
        if (self.up_writer is not None and not self.up_writer.is_closing()
                and not has_unread_input(self.up_reader, self.up_writer)):
            return True
        # Closed, or it sent bytes nobody asked for (a framing violation): start afresh.
        close_quietly(self.up_writer)
        address, port = self.upstream_address
        where = self.host if (address, port) == (self.host, 443) else f"{self.host} (via {address}:{port})"
        timeout_s = self.owner.connect_timeout_s
        try:
            # One deadline for TCP and TLS together; asyncio's own handshake timeout sits behind
            # it so that a stalled handshake also ends as a 504.
            async with asyncio.timeout(timeout_s):
                self.up_reader, self.up_writer = await asyncio.open_connection(
                    address, port, ssl=self.upstream_ssl, server_hostname=self.host,
                    limit=MAX_HEAD_BYTES, ssl_handshake_timeout=timeout_s + 5,
                )
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(502, (
                f"the certificate presented by {where} failed verification "
                f"({exc.verify_message}); the call was not sent. If you reach {self.host} through "
                "a gateway with its own CA, pass that CA with --upstream-ca FILE."
            )) from exc
        except TimeoutError as exc:
            raise UpstreamError(504, f"timed out connecting to {where}.") from exc
        except _CONNECTION_ERRORS as exc:
            raise UpstreamError(502, f"could not connect to {where} ({exc}).") from exc
        return False

    async def _send_upstream(self, data: bytes) -> None:
        try:
            self.up_writer.write(data)
            await self.up_writer.drain()
        except _CONNECTION_ERRORS as exc:
            raise UpstreamError(502, f"connection to {self.host} failed while sending the request ({exc}).",
                                nothing_received=True) from exc

    async def _read_response_head(self, request: RequestHead, call: CallRow, t0: float) -> ResponseHead:
        if call.project_source is None:
            self._start_lookup()  # the request is on its way: the provider's think time is ours
        interim_seen = False
        while True:
            try:
                raw = await self.up_reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                raise UpstreamError(502, f"{self.host} closed the connection without answering.",
                                    nothing_received=not (exc.partial or interim_seen)) from exc
            except asyncio.LimitOverrunError as exc:
                raise UpstreamError(502, f"{self.host} sent a response head over "
                                         f"{MAX_HEAD_BYTES // 1024} KiB.") from exc
            except _CONNECTION_ERRORS as exc:
                silent = not (interim_seen or has_buffered_bytes(self.up_reader))
                raise UpstreamError(502, f"connection to {self.host} failed ({exc}).",
                                    nothing_received=silent) from exc
            try:
                response = parse_response_head(raw)
            except ProtocolError as exc:
                raise UpstreamError(502, f"{self.host} sent a malformed response ({exc}).") from exc
            if 100 <= response.status < 200 and response.status != 101:
                # Interim responses (100 Continue, 103 Early Hints) pass through as they are,
                # except to HTTP/1.0 clients, which must not get them (RFC 9110 15.2).
                if request.version != "HTTP/1.0":
                    await self._to_client(raw, call)
                interim_seen = True
                continue
            call.ttfb_ms = (time.perf_counter() - t0) * 1000.0
            return response

    async def _read_upstream(self, size: int = READ_SIZE, *, eof_ends_body: bool = False) -> bytes:
        try:
            data = await self.up_reader.read(size)
        except _CONNECTION_ERRORS as exc:
            raise UpstreamError(502, f"connection to {self.host} failed mid-response ({exc}).") from exc
        if not data and not eof_ends_body:
            raise UpstreamError(502, f"{self.host} closed the connection mid-response.")
        return data

    # ---- the client's side ------------------------------------------------------------------

    async def _to_client(self, data: bytes, call: CallRow) -> None:
        try:
            self.writer.write(data)
            call.response_bytes += len(data)
            await self.writer.drain()
        except _CONNECTION_ERRORS as exc:
            raise _ClientGone() from exc

    async def _relay_response(self, request: RequestHead, response: ResponseHead, call: CallRow,
                              tap: Tap) -> bool:
        try:
            kind, length = response_framing(request.method, response)
        except ProtocolError as exc:
            raise UpstreamError(502, f"{self.host} sent unusable framing ({exc}).") from exc
        call.status = response.status
        self.response_started = True
        self.close_delimited = kind is BodyKind.CLOSE
        await self._to_client(response.raw, call)
        tap.response_head(response)
        if response.status == 101:
            # Upgraded (websocket): raw bytes both ways until either side closes, unparsed. A
            # client closing now is the normal end, not a cancel (and it is not idle either).
            self.in_call = False
            totals = [0, 0]
            try:
                await splice(self.reader, self.writer, self.up_reader, self.up_writer, totals=totals)
            finally:
                call.request_bytes += totals[0]
                call.response_bytes += totals[1]
            return False
        await self._relay_body(kind, length, call, tap)
        self.in_call = False  # the whole response is with the client: leaving now is normal
        if has_buffered_bytes(self.up_reader):
            self._drop_upstream()  # it sent more than the response: never read it as the next one
        # The client got exactly the provider's framing, so it can go on unless that was "until
        # close" or either side asked to close.
        return (kind is not BodyKind.CLOSE
                and not wants_close(request.version, request.headers)
                and not wants_close(response.version, response.headers))

    def _drop_upstream(self) -> None:
        close_quietly(self.up_writer)
        self.up_writer = self.up_reader = None

    async def _relay_body(self, kind: BodyKind, length: int, call: CallRow, tap: Tap) -> None:
        """Forward the response body as it arrives, one read at a time."""
        tap_chunk = tap.response_chunk
        if kind is BodyKind.CHUNKED:
            decoder = ChunkedDecoder()
            while not decoder.done:
                data = await self._read_upstream()
                try:
                    used, payload = decoder.feed(data)
                except ProtocolError as exc:
                    # Forward what came anyway; without framing the connection cannot go on.
                    await self._to_client(data, call)
                    raise UpstreamError(502, f"{self.host} sent broken chunked framing ({exc}).") from exc
                extra = used < len(data)
                await self._to_client(data[:used] if extra else data, call)
                for piece in payload:
                    tap_chunk(piece)
                if extra:
                    self._drop_upstream()  # bytes after the end: a violation, never forwarded
        elif kind is BodyKind.CLOSE:
            while data := await self._read_upstream(eof_ends_body=True):
                await self._to_client(data, call)
                tap_chunk(data)
            if not _closed_by_close_notify(self.up_writer):
                raise UpstreamError(502, f"{self.host} ended a response without a length by closing the "
                                         "connection without TLS close_notify: it may be cut short.")
        else:
            remaining = length if kind is BodyKind.LENGTH else 0
            while remaining:
                data = await self._read_upstream(min(READ_SIZE, remaining))
                remaining -= len(data)
                await self._to_client(data, call)
                tap_chunk(data)


def _body_stalled() -> ClientError:
    return ClientError(408, f"the request body stopped arriving for {CLIENT_IDLE_TIMEOUT_S:g} s.")


def _too_large_to_check() -> str:
    return (f"a model rule applies to this project, and a request body over {MAX_CHECKED_BODY_BYTES // 2**20} MiB "
            "cannot be checked against it; the call was not sent.")


def _refusal_for(policies, project: str, provider: str, state: CallState | None) -> Refusal | None:
    """What stops this call, if anything: only calls that spend are checked. Downloading batch
    results spends nothing new (they were paid for when created), so it is never refused; creating
    a batch is checked like the calls it holds."""
    if state is None:
        return None
    if state.endpoint == "batch_results" or (state.billing != BILL_TOKENS and state.endpoint != "batch_create"):
        return None
    return policies.refusal(project, provider, state.request_model)


def _probe(adapter: Adapter, head: RequestHead) -> CallState | None:
    """What the adapter reads from the request line alone (endpoint, billing)."""
    try:
        return adapter.start(head, b"", False)
    except Exception:  # noqa: BLE001 - fail open: an adapter bug never refuses a call
        return None


def refusal_response(refusal: Refusal, provider: str, target: str, keep_alive: bool) -> bytes:
    """The provider's own error format, so its SDKs raise their usual error with our message.

    `x-should-retry: false` stops the Anthropic and OpenAI SDKs (and Claude Code) from retrying a
    refusal that cannot succeed before the period ends or the rule changes.
    """
    status, message, budget = refusal.status, refusal.message, refusal.error == "budget"
    extra = ""
    if provider == "anthropic" or (provider == "vertex" and "/publishers/anthropic/" in target):
        payload = {"type": "error", "error": {"type": "rate_limit_error" if budget else "permission_error",
                                              "message": message}}
    elif provider in ("gemini", "code_assist", "vertex"):
        payload = {"error": {"code": status, "message": message,
                             "status": "RESOURCE_EXHAUSTED" if budget else "PERMISSION_DENIED"}}
    elif provider == "bedrock":
        error_type = "ThrottlingException" if budget else "AccessDeniedException"
        payload = {"message": message}
        extra = f"x-amzn-ErrorType: {error_type}\r\n"
    else:  # OpenAI and the OpenAI-compatible APIs
        payload = {"error": {"message": message, "type": "insufficient_quota" if budget else "invalid_request_error",
                             "param": None, "code": "budget_exceeded" if budget else "model_not_allowed"}}
    body = json.dumps(payload).encode()
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-should-retry: false\r\n"
        f"X-Halton-Meter-Policy: {refusal.error}\r\n"
        f"{extra}"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode() + body


async def _end_without_close_notify(writer: asyncio.StreamWriter) -> None:
    """Close the client's connection without TLS close_notify once what it was sent is out, so it
    sees a cut response as cut (a body without a length would otherwise look complete)."""
    transport = writer.transport
    # The TLS transport's buffer, then the TCP one below it (an asyncio internal, read if there).
    raw = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    try:
        async with asyncio.timeout(UNREAD_BODY_DRAIN_S):
            while not transport.is_closing() and (
                    transport.get_write_buffer_size() or (raw is not None and raw.get_write_buffer_size())):
                await asyncio.sleep(0.01)
    except TimeoutError:
        pass
    transport.abort()


def _closed_by_close_notify(writer: asyncio.StreamWriter) -> bool:
    """Whether the TLS peer ended with close_notify (RFC 9112 9.8: only that completes a body
    delimited by the close). asyncio reports a bare TCP FIN as the same EOF; the TLS object tells:
    after close_notify a read raises SSLZeroReturnError, after a bare FIN SSLWantReadError."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return True  # not TLS: the close is all there is
    try:
        ssl_object.read(1)
    except ssl.SSLZeroReturnError:
        return True
    except ssl.SSLError:
        return False
    return True


class _PendingRow:
    """A row waiting for its process lookup; recorded exactly once, from either thread."""

    __slots__ = ("call", "ledger", "lock", "recorded")

    def __init__(self, call: CallRow, ledger) -> None:
        self.call, self.ledger = call, ledger
        self.lock = threading.Lock()
        self.recorded = False

    def record(self, lookup: Future | None) -> None:
        with self.lock:
            if self.recorded:
                return
            self.recorded = True
        if lookup is not None:
            _attribute(self.call, lookup)
        else:
            self.call.project_source = "default"
        self.ledger.record(self.call)


def _attribute(call: CallRow, lookup: Future) -> None:
    """The process lookup's answer on the row, or `default` if it found nothing or failed."""
    found = None
    if not lookup.cancelled() and lookup.exception() is None:
        found = lookup.result()
    if found is not None:
        call.project, call.project_source = found.project, found.source
    else:
        call.project_source = "default"


def copy_state(call: CallRow, state: CallState) -> None:
    """Move what the adapter read onto the row (JSON encoding here: the raw usage is small)."""
    call.provider = state.provider
    call.endpoint = state.endpoint
    call.billing = state.billing
    call.request_model, call.response_model = state.request_model, state.response_model
    call.model = state.response_model or state.request_model
    call.is_stream = state.is_stream
    call.request_id = state.request_id
    call.service_tier = state.service_tier
    call.error_type = state.error_type
    call.usage_status = state.usage_status
    call.provider_cost_nanousd = state.provider_cost_nanousd
    usage = state.usage
    if usage is not None:
        call.input_tokens = usage.input_tokens
        call.cache_read_tokens = usage.cache_read_tokens
        call.cache_write_5m_tokens = usage.cache_write_5m_tokens
        call.cache_write_1h_tokens = usage.cache_write_1h_tokens
        call.cache_write_30m_tokens = usage.cache_write_30m_tokens
        call.cache_write_12h_tokens = usage.cache_write_12h_tokens
        call.output_tokens = usage.output_tokens
        call.reasoning_tokens = usage.reasoning_tokens
        call.billed_items = json.dumps(usage.billed_items, sort_keys=True) if usage.billed_items else None
        call.usage_json = json.dumps(usage.raw, separators=(",", ":")) if usage.raw is not None else None
        if usage.request_prompt_range is not None:
            call.smallest_prompt_tokens, call.largest_prompt_tokens = usage.request_prompt_range
