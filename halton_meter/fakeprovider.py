"""A loopback stand-in for the providers, speaking their wire formats with real timing.

Used by the tests, `tools/` benchmarks and the demo; never by the proxy itself. It serves TLS with
certificates from its own throwaway CA (made by halton-meter's CA code), so the proxy reaches it
with `--upstream api.anthropic.com=127.0.0.1:PORT --upstream-ca <its ca.pem>`.

It answers in the dialect the path names: Anthropic Messages (default), OpenAI Chat Completions
(`.../chat/completions`), Responses (`.../responses`), Gemini (`:generateContent`,
`:streamGenerateContent` as SSE with `alt=sse` or as a JSON array) and Code Assist (`/v1internal:`).

Request headers steer it (all optional):
  x-fake-delay-ms: N     pause between streamed events (default 10)
  x-fake-events: N       text deltas in a stream (default 5)
  x-fake-hold-s: S       after the first streamed event, hold the rest back S seconds
  x-fake-comment-bytes: N  an SSE comment line of N bytes before each streamed event (a long
                         stream with exact usage, made as it is sent)
  x-fake-status: NNN     answer with this status and the provider's error body
  x-fake-chunked: 1      non-streaming body with chunked transfer coding instead of a length
  x-fake-close: 1        close-delimited body (no length, no chunks)
  x-fake-invalid-json: 1 a JSON content type with a body that is not JSON
  x-fake-reset-after: N  send N body bytes, then reset the connection
  x-fake-body-bytes: N   non-streaming body padded to about N bytes
  x-fake-echo: 1         Anthropic Messages: the reply's text is the last message's text, as a
                         model repeating its prompt would (streamed: one more delta, first)
Misbehaviours, for the proxy's defences:
  x-fake-hangup: 1       read the request, then close without answering (`reset`: with a reset)
  x-fake-extra: TEXT     send TEXT after a complete response (a framing violation)
  x-fake-reject-expect: NNN  answer `Expect: 100-continue` with this final status, no 100
  x-fake-id: ID          counted in `FakeProvider.seen_ids` (how often a request arrived)
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import socket
import ssl
import struct
import sys
import tempfile
from pathlib import Path

from halton_meter.adapters import PRIMARY_HOSTS
from halton_meter.http1 import (
    BodyKind,
    ChunkedDecoder,
    ProtocolError,
    RequestHead,
    parse_request_head,
    request_framing,
)
from halton_meter.tls.ca import CertificateAuthority

DEFAULT_MODEL = "claude-sonnet-4-5-20250929"
# Like the real API, an alias request is answered with the dated model id.
_RESOLVED_MODELS = {"claude-sonnet-4-5": "claude-sonnet-4-5-20250929", "claude-haiku-4-5": "claude-haiku-4-5-20251001",
                    "gpt-4.1": "gpt-4.1-2025-04-14", "gpt-5.5": "gpt-5.5-2026-04-23"}


class FakeProvider:
    def __init__(self, ca_dir: Path | None, *, hosts: tuple[str, ...] = PRIMARY_HOSTS + ("us-east5-aiplatform.googleapis.com",),
                 ca: CertificateAuthority | None = None) -> None:
        """Its own throwaway CA in `ca_dir`, or an existing `ca` (the self-test uses the proxy's
        own, so the daemon can verify it)."""
        if ca is None:
            ca = CertificateAuthority(ca_dir, hosts)
            ca.ensure()
        self.ca = ca
        self.hosts = hosts
        self.port = 0
        self.requests_served = 0
        self.connections = 0
        self.seen_ids: dict[str, int] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def ca_path(self) -> Path:
        return self.ca.ca_cert_path

    async def start(self, port: int = 0) -> int:
        # Its own listener context (the CA's cached ones are shared); SNI then picks the
        # certificate of whichever provider host the client names.
        contexts = {host: self.ca.server_context(host) for host in self.hosts}  # mints missing leaves
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self.ca.leaf_paths(self.hosts[0]))

        def pick(sslobj, server_name, _context):
            if server_name in contexts:
                sslobj.context = contexts[server_name]

        context.sni_callback = pick
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", port, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        on_this_connection = 0
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                head = parse_request_head(raw)
                on_this_connection += 1
                self.requests_served += 1
                if not await self._answer(head, reader, writer, on_this_connection):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError, OSError):
            return  # the proxy dropped the connection mid-request (mid-body, say)
        except asyncio.CancelledError:
            return  # close(): ending normally spares asyncio's "exception in callback" noise
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _answer(self, head: RequestHead, reader, writer, nth: int) -> bool:
        options = {k.lower(): v for k, v in head.headers.fields if k.lower().startswith("x-fake-")}
        if "x-fake-id" in options:
            self.seen_ids[options["x-fake-id"]] = self.seen_ids.get(options["x-fake-id"], 0) + 1
        if (head.headers.get("expect") or "").lower() == "100-continue":
            if "x-fake-reject-expect" in options:
                writer.write(_head(int(options["x-fake-reject-expect"]), [("Content-Length", "0"),
                                                                          ("Connection", "close")]))
                await writer.drain()
                await _linger(reader)
                return False
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        size, digest, body = await _read_body(head, reader)
        if options.get("x-fake-hangup"):
            if options["x-fake-hangup"] == "reset":
                _reset(writer)
            return False
        base = [("x-fake-connection-requests", str(nth)), ("x-fake-received-bytes", str(size)),
                ("x-fake-received-sha256", digest), ("request-id", f"req_fake_{self.requests_served}")]
        for name in ("x-halton-project", "accept-encoding", "proxy-authorization"):
            if head.headers.get(name) is not None:
                base.append((f"x-fake-saw-{name}", head.headers.get(name)))
        if head.headers.has_token("upgrade", "websocket"):
            return await _websocket_echo(reader, writer, base)
        try:
            request = json.loads(body) if body else {}
        except ValueError:
            request = {}
        status = int(options.get("x-fake-status", "200"))
        if status in (204, 304):
            writer.write(_head(status, base))
            await writer.drain()
            return True
        dialect = _dialect(head.target)
        if status >= 400:
            return await _send(writer, head, status, _error_body(status, dialect), "application/json", base, options)
        if not isinstance(request, dict):
            request = {}
        if dialect.startswith("gemini"):
            request.setdefault("model", _gemini_model(head.target) or request.get("model"))
            request["stream"] = ":streamGenerateContent" in head.target
        if request.get("stream") is True:
            frames, content_type = _STREAMS[dialect](request, head.target, int(options.get("x-fake-events", "5")))
            if options.get("x-fake-echo") and dialect == "anthropic":
                frames.insert(3, _anthropic_delta(_last_message_text(request)))  # after start, block, ping
            return await _stream(writer, frames, content_type, options, base)
        if options.get("x-fake-invalid-json"):
            return await _send(writer, head, 200, b'{"id": "msg_broken", "usage": ', "application/json", base, options)
        payload = _BODIES[dialect](request, int(options.get("x-fake-body-bytes", "0")))
        if options.get("x-fake-echo") and dialect == "anthropic":
            payload["content"][0]["text"] = _last_message_text(request)
        encoded = json.dumps(payload).encode()
        if "gzip" in (head.headers.get("accept-encoding") or ""):
            base.append(("Content-Encoding", "gzip"))
            encoded = gzip.compress(encoded)
        return await _send(writer, head, 200, encoded, "application/json", base, options)


async def _read_body(head: RequestHead, reader) -> tuple[int, str, bytes]:
    """Read the whole body without holding it: size, SHA-256, and the first 1 MiB."""
    kind, length = request_framing(head)
    digest, kept, size = hashlib.sha256(), bytearray(), 0

    def take(data) -> None:
        nonlocal size
        size += len(data)
        digest.update(data)
        if len(kept) < 1 << 20:
            kept.extend(data)

    if kind is BodyKind.LENGTH:
        remaining = length
        while remaining:
            data = await reader.read(min(65536, remaining))
            if not data:
                raise ConnectionError("client closed mid-body")
            take(data)
            remaining -= len(data)
    elif kind is BodyKind.CHUNKED:
        decoder = ChunkedDecoder()
        while not decoder.done:
            wanted = decoder.data_remaining
            data = await (reader.read(min(65536, wanted)) if wanted else reader.readuntil(b"\n"))
            if not data:
                raise ConnectionError("client closed mid-body")
            for piece in decoder.feed(data)[1]:
                take(piece)
    return size, digest.hexdigest(), bytes(kept)


def _message(request: dict, pad_bytes: int) -> dict:
    text = _text(pad_bytes)
    return {
        "id": "msg_fake", "type": "message", "role": "assistant",
        "model": _model(request), "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 9, "service_tier": "standard"},
    }


def _model(request: dict) -> str:
    model = request.get("model") if isinstance(request, dict) else None
    if not isinstance(model, str):
        return DEFAULT_MODEL
    return _RESOLVED_MODELS.get(model, model)


def _error_body(status: int, dialect: str = "anthropic") -> bytes:
    """The provider's own error shape: Google RPC status, OpenAI's error object, or Anthropic's."""
    if dialect.startswith("gemini") or dialect == "code_assist":
        rpc = {429: "RESOURCE_EXHAUSTED", 400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED",
               503: "UNAVAILABLE"}.get(status, "INTERNAL")
        return json.dumps({"error": {"code": status, "message": f"fake {rpc}", "status": rpc}}).encode()
    if dialect in ("chat", "responses"):
        kind = {429: "rate_limit_exceeded", 400: "invalid_request_error", 401: "invalid_api_key"}.get(status, "server_error")
        return json.dumps({"error": {"message": f"fake {kind}", "type": kind, "param": None, "code": kind}}).encode()
    kind = {429: "rate_limit_error", 529: "overloaded_error", 400: "invalid_request_error",
            401: "authentication_error"}.get(status, "api_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": f"fake {kind}"},
                       "request_id": "req_fake_error"}).encode()


async def _send(writer, head: RequestHead, status: int, body: bytes, content_type: str,
                headers: list[tuple[str, str]], options: dict) -> bool:
    fields = [("Content-Type", content_type), *headers]
    keep_alive = True
    if options.get("x-fake-close"):
        fields.append(("Connection", "close"))
        keep_alive = False
    elif options.get("x-fake-chunked"):
        fields.append(("Transfer-Encoding", "chunked"))
    else:
        fields.append(("Content-Length", str(len(body))))
    head_bytes = _head(status, fields)
    # Stray bytes go out in the same write as the response, as a server with a framing bug
    # flushes them: a later write would be indistinguishable from the next response.
    extra = options.get("x-fake-extra", "").encode().replace(b"\\r\\n", b"\r\n")
    if head.method == "HEAD":
        writer.write(head_bytes + (body + extra if extra else b""))
    elif options.get("x-fake-chunked") and not options.get("x-fake-close"):
        half = len(body) // 2
        writer.write(head_bytes + _chunk(body[:half]) + _chunk(body[half:]) + b"0\r\n\r\n" + extra)
    else:
        reset_after = options.get("x-fake-reset-after")
        if reset_after is not None:
            writer.write(head_bytes + body[: int(reset_after)])
            await writer.drain()
            _reset(writer)
            return False
        writer.write(head_bytes + body + extra)
    await writer.drain()
    return keep_alive


async def _stream(writer, frames: list[bytes], content_type: str, options: dict,
                  headers: list[tuple[str, str]]) -> bool:
    """Send pre-built stream frames, one HTTP chunk each, paced like a real model."""
    delay = int(options.get("x-fake-delay-ms", "10")) / 1000
    hold = float(options.get("x-fake-hold-s", "0"))
    writer.write(_head(200, [("Content-Type", content_type), ("Cache-Control", "no-cache"),
                             ("Transfer-Encoding", "chunked"), *headers]))
    reset_after = options.get("x-fake-reset-after")
    padding = int(options.get("x-fake-comment-bytes", "0"))
    # Providers pad streams with comment lines too (keep-alives); SSE parsers skip them.
    comment = b": " + b"p" * padding + b"\n" if padding else b""
    for index, frame in enumerate(frames):
        writer.write(_chunk(comment + frame))
        await writer.drain()
        if reset_after is not None and index + 1 >= int(reset_after):
            _reset(writer)
            return False
        if index == 0 and hold:
            await asyncio.sleep(hold)
        elif delay:
            await asyncio.sleep(delay)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


# ---- wire formats (reference/providers.md §1-4); usage figures are fixed so tests can expect them

def _dialect(target: str) -> str:
    path = target.split("?", 1)[0]
    if path.startswith("/v1internal:"):
        return "code_assist"
    if ":generateContent" in path or ":streamGenerateContent" in path:
        return "gemini_sse" if "alt=sse" in target or ":generateContent" in path else "gemini_array"
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/responses"):
        return "responses"
    return "anthropic"


def _gemini_model(target: str) -> str | None:
    path = target.split("?", 1)[0]
    if "/models/" not in path:
        return None
    return path.rsplit("/models/", 1)[1].split(":", 1)[0]


def _sse(name: str | None, data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {name}\n" if name else "").encode() + f"data: {text}\n\n".encode()


def _anthropic_stream(request: dict, target: str, count: int) -> tuple[list[bytes], str]:
    model = _model(request)
    frames = [_sse("message_start", {"type": "message_start", "message": {
        "id": "msg_fake_stream", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 1}}}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        _sse("ping", {"type": "ping"})]
    frames += [_anthropic_delta(f"word{i} ") for i in range(count)]
    frames += [_sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
               _sse("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"output_tokens": count + 1}}),
               _sse("message_stop", {"type": "message_stop"})]
    return frames, "text/event-stream"


def _anthropic_delta(text: str) -> bytes:
    return _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": text}})


def _last_message_text(request: dict) -> str:
    """The text of the request's last message: a string, or its text blocks joined."""
    messages = request.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    content = last.get("content") if isinstance(last, dict) else None
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return content if isinstance(content, str) else ""


def _chat_usage(count: int) -> dict:
    return {"prompt_tokens": 50, "completion_tokens": count + 1, "total_tokens": 51 + count,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def _chat_stream(request: dict, target: str, count: int) -> tuple[list[bytes], str]:
    model = _model(request)
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1795420800, "model": model}
    frames = [_sse(None, {**base, "choices": [{"index": 0, "delta": {"content": f"word{i} "},
                                              "finish_reason": None}], "usage": None})
              for i in range(count)]
    frames.append(_sse(None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                              "usage": None}))
    if (request.get("stream_options") or {}).get("include_usage"):
        frames.append(_sse(None, {**base, "choices": [], "usage": _chat_usage(count)}))
    frames.append(_sse(None, "[DONE]"))
    return frames, "text/event-stream"


def _chat_body(request: dict, pad_bytes: int) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1795420800, "model": _model(request),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": _text(pad_bytes)},
                         "finish_reason": "stop"}], "usage": _chat_usage(5), "service_tier": "default"}


_RESPONSE_USAGE = {"input_tokens": 900, "input_tokens_details": {"cached_tokens": 512, "cache_write_tokens": 0},
                   "output_tokens": 40, "output_tokens_details": {"reasoning_tokens": 16}, "total_tokens": 940}


def _responses_stream(request: dict, target: str, count: int) -> tuple[list[bytes], str]:
    model = _model(request)
    response = {"id": "resp_fake", "object": "response", "model": model, "status": "in_progress",
                "output": [], "usage": None}
    frames = [_sse("response.created", {"type": "response.created", "sequence_number": 0, "response": response})]
    frames += [_sse("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": i + 1,
                                                   "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                   "delta": f"word{i} "}) for i in range(count)]
    done = {**response, "status": "completed", "usage": _RESPONSE_USAGE}
    frames.append(_sse("response.completed", {"type": "response.completed", "sequence_number": count + 1,
                                              "response": done}))
    return frames, "text/event-stream"


def _responses_body(request: dict, pad_bytes: int) -> dict:
    return {"id": "resp_fake", "object": "response", "model": _model(request), "status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": _text(pad_bytes)}]}],
            "usage": _RESPONSE_USAGE}


def _gemini_chunk(model: str, text: str, candidates: int, last: bool) -> dict:
    chunk = {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
             "usageMetadata": {"promptTokenCount": 900, "cachedContentTokenCount": 512,
                               "candidatesTokenCount": candidates, "thoughtsTokenCount": 200,
                               "totalTokenCount": 1100 + candidates},
             "modelVersion": model, "responseId": "gem_fake"}
    if last:
        chunk["candidates"][0]["finishReason"] = "STOP"
    return chunk


def _gemini_chunks(request: dict, count: int) -> list[dict]:
    model = request.get("model") or "gemini-2.5-flash"
    return [_gemini_chunk(model, f"word{i} ", (i + 1) * 8, i == count - 1) for i in range(count)]


def _gemini_sse(request: dict, target: str, count: int) -> tuple[list[bytes], str]:
    return [_sse(None, chunk).replace(b"\n", b"\r\n") for chunk in _gemini_chunks(request, count)], "text/event-stream"


def _gemini_array(request: dict, target: str, count: int) -> tuple[list[bytes], str]:
    chunks = _gemini_chunks(request, count)
    frames = [(b"[" if i == 0 else b",\r\n") + json.dumps(chunk, indent=2).encode() for i, chunk in enumerate(chunks)]
    frames.append(b"]")
    return frames, "application/json"


def _gemini_body(request: dict, pad_bytes: int) -> dict:
    return _gemini_chunk(request.get("model") or "gemini-2.5-flash", _text(pad_bytes), 40, True)


def _code_assist_stream(request: dict, target: str, count: int) -> tuple[list[bytes], str]:
    return [_sse(None, {"response": chunk, "traceId": "trace_fake"}).replace(b"\n", b"\r\n")
            for chunk in _gemini_chunks(request, count)], "text/event-stream"


def _code_assist_body(request: dict, pad_bytes: int) -> dict:
    return {"response": _gemini_body(request, pad_bytes), "traceId": "trace_fake"}


def _text(pad_bytes: int) -> str:
    text = "Hello from the fake provider."
    return text + " " + "x" * (pad_bytes - len(text)) if pad_bytes > len(text) else text


async def _websocket_echo(reader, writer, headers) -> bool:
    writer.write(_head(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"), *headers]))
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    return False


async def _linger(reader, seconds: float = 2.0) -> None:
    """Read and drop what the client still sends before closing, as real servers do: closing
    with unread input sends a reset, and a reset destroys the answer not yet read at the peer."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except (TimeoutError, ConnectionError, OSError):
        pass


def _head(status: int, fields: list[tuple[str, str]]) -> bytes:
    reason = {100: "Continue", 101: "Switching Protocols", 200: "OK", 204: "No Content",
              304: "Not Modified"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _reset(writer) -> None:
    # SO_LINGER 0 makes close() send RST: a real reset, not a clean end.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


_STREAMS = {"anthropic": _anthropic_stream, "chat": _chat_stream, "responses": _responses_stream,
            "gemini_sse": _gemini_sse, "gemini_array": _gemini_array, "code_assist": _code_assist_stream}
_BODIES = {"anthropic": _message, "chat": _chat_body, "responses": _responses_body,
           "gemini_sse": _gemini_body, "gemini_array": _gemini_body, "code_assist": _code_assist_body}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the loopback fake provider.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ca-dir", help="where its test CA lives (default: a temp dir)")
    args = parser.parse_args(argv)
    ca_dir = Path(args.ca_dir) if args.ca_dir else Path(tempfile.mkdtemp(prefix="halton-fake-")) / "ca"

    async def run() -> None:
        provider = FakeProvider(ca_dir)
        port = await provider.start(args.port)
        print(f"fake provider on 127.0.0.1:{port}", flush=True)
        print(f"  CA: {provider.ca_path}", flush=True)
        print(f"  proxy flags: --upstream api.anthropic.com=127.0.0.1:{port} --upstream-ca {provider.ca_path}",
              flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
