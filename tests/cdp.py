"""A minimal Chrome DevTools Protocol client over a stdlib WebSocket, for the dashboard test.

The WebSocket side is an RFC 6455 client: the HTTP upgrade with its accept check (section 4),
masked client frames, fragmented messages, ping/pong and the closing handshake (section 5). Every
read has a deadline, so a wedged browser fails a test instead of hanging the suite.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import time
from urllib.parse import urlsplit

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_TEXT, _CONTINUATION, _CLOSE, _PING, _PONG = 0x1, 0x0, 0x8, 0x9, 0xA


class CDPError(RuntimeError):
    """The browser answered a command with an error, or a page script threw."""


class WebSocket:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self._buffer = bytearray()
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._buffer:
            self._fill(len(self._buffer) + 1, deadline)
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines[1:])}
        expected = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != expected:
            self.sock.close()
            raise ConnectionError(f"WebSocket upgrade refused: {lines[0]!r}")

    def send_text(self, text: str) -> None:
        self._send(_TEXT, text.encode())

    def recv_text(self, timeout: float) -> str:
        """The next whole text message; answers pings on the way. TimeoutError past `timeout`."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            fin, opcode, payload = self._frame(deadline)
            if opcode == _PING:
                self._send(_PONG, payload)
            elif opcode == _CLOSE:
                self.close()
                raise ConnectionError("the browser closed the DevTools connection")
            elif opcode in (_TEXT, _CONTINUATION):
                parts.append(payload)
                if fin:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self._send(_CLOSE, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()

    def _send(self, opcode: int, payload: bytes) -> None:
        head = bytearray([0x80 | opcode])
        size = len(payload)
        if size < 126:
            head.append(0x80 | size)
        elif size < 1 << 16:
            head += struct.pack("!BH", 0x80 | 126, size)
        else:
            head += struct.pack("!BQ", 0x80 | 127, size)
        mask = os.urandom(4)
        # Client frames are always masked (section 5.3): XOR the payload with the key, repeated.
        key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(size, "big") if size else b""
        self.sock.sendall(bytes(head) + mask + masked)

    def _frame(self, deadline: float) -> tuple[bool, int, bytes]:
        """One whole frame, taken from the buffer only once all of it has arrived."""
        self._fill(2, deadline)
        first, second = self._buffer[0], self._buffer[1]
        size, offset = second & 0x7F, 2
        if size == 126:
            self._fill(4, deadline)
            size, offset = struct.unpack_from("!H", self._buffer, 2)[0], 4
        elif size == 127:
            self._fill(10, deadline)
            size, offset = struct.unpack_from("!Q", self._buffer, 2)[0], 10
        if second & 0x80:
            raise ConnectionError("the server sent a masked frame")
        self._fill(offset + size, deadline)
        payload = bytes(self._buffer[offset:offset + size])
        del self._buffer[:offset + size]
        return bool(first & 0x80), first & 0x0F, payload

    def _fill(self, count: int, deadline: float) -> None:
        while len(self._buffer) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the browser in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                raise TimeoutError("no message from the browser in time") from None
            if not data:
                raise ConnectionError("the DevTools connection closed")
            self._buffer += data


class Browser:
    """One DevTools connection; pages are flat sessions on it. Events are kept in `events`."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self._next_id = 0

    @classmethod
    def connect(cls, ws_url: str, timeout: float = 10.0) -> Browser:
        return cls(WebSocket(ws_url, timeout))

    def call(self, method: str, params: dict | None = None, session_id: str | None = None,
             timeout: float = 15.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        self.ws.send_text(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv_text(deadline - time.monotonic()))
            if reply.get("id") != self._next_id:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise CDPError(f"{method}: {reply['error'].get('message')}")
            return reply.get("result", {})

    def new_page(self) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        return page

    def close(self) -> None:
        self.ws.close()


class Page:
    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id

    def call(self, method: str, params: dict | None = None, timeout: float = 15.0) -> dict:
        return self.browser.call(method, params, self.session_id, timeout)

    def events(self, *methods: str) -> list[dict]:
        """This page's events so far with one of these method names (the params of each)."""
        return [e["params"] for e in self.browser.events
                if e.get("sessionId") == self.session_id and e.get("method") in methods]

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        """Load `url` and wait for its load event (a mark on the old document tells them apart)."""
        self.evaluate("window.__cdpOldDocument = true")
        result = self.call("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        self.wait_for("!window.__cdpOldDocument && document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str, timeout: float = 15.0):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True, "timeout": int(timeout * 1000)},
                           timeout + 1)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"{expression[:80]!r} threw: "
                           f"{details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.05):
        """Poll until `expression` is truthy; return its value. TimeoutError with the last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still {value!r} after {timeout} s")
            time.sleep(interval)

    def screenshot(self, path: os.PathLike | str) -> int:
        """The whole page (beyond the viewport) as a PNG file; returns its size in bytes."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        data = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})["data"]
        png = base64.b64decode(data)
        with open(path, "wb") as out:
            out.write(png)
        return len(png)
