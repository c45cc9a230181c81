"""Handing accepted client sockets from the edge to the metering daemon over a Unix socket.

The edge accepts a connection and, when the daemon is healthy, passes the socket itself
(SCM_RIGHTS) before reading a byte of it: the daemon serves it as if it had accepted it, and the
edge is out of the byte path. The channel is one stream connection; the edge sends b"F" with
one descriptor per connection and b"P" to ask for health. The daemon answers in order: b"p" for
a ping, and b"a" for each descriptor as soon as it holds it, before reading a byte from it.

Until a connection is acknowledged the edge keeps its own descriptor: if the channel breaks
first (the daemon was killed, or died with descriptors still in the socket buffer), the daemon
never touched that client, so the edge serves it itself and the client never sees a reset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

HEALTHY_TTL_S = 1.0  # how long a good health answer is trusted
UNHEALTHY_TTL_S = 0.2  # how soon a daemon found down is asked again
PING_TIMEOUT_S = 0.2
_MAX_FDS = 64


class HandoffError(Exception):
    """The hand-off socket cannot be set up; the message says why and what to do."""


class HandoffReceiver:
    """The daemon's end: adopts every socket the edge sends."""

    def __init__(self, path: Path, on_socket: Callable[[socket.socket], Awaitable[None]]) -> None:
        self.path = path
        self.on_socket = on_socket
        self.received = 0
        self._listener: socket.socket | None = None
        self._channels: set[socket.socket] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists():
            if _is_listening(self.path):
                raise HandoffError(f"Another metering daemon is listening on {self.path}. "
                                   "Stop it first (halton-meter stop), or use another --home.")
            self.path.unlink()  # left by a daemon that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600: only this user may hand off
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(16)
        listener.setblocking(False)
        self._listener = listener
        loop.add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for channel in list(self._channels):
            self._drop(channel)
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _accept(self) -> None:
        try:
            channel, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("handoff_accept_failed error=%r", exc)
            return
        channel.setblocking(False)
        self._channels.add(channel)
        asyncio.get_running_loop().add_reader(channel.fileno(), self._read, channel)

    def _read(self, channel: socket.socket) -> None:
        try:
            message, fds, flags, _ = socket.recv_fds(channel, _MAX_FDS, _MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(channel)
            return
        if flags & getattr(socket, "MSG_CTRUNC", 0):
            log.error("handoff_truncated: descriptors lost; the edge serves those clients itself")
        if not message and not fds:
            self._drop(channel)  # the edge went away
            return
        # Answer in the order asked: b"p" per ping, b"a" per descriptor (taken before any read).
        replies = bytearray()
        received = iter(fds)
        for byte in message:
            if byte == 0x50:  # P
                replies += b"p"
            elif byte == 0x46:  # F
                fd = next(received, None)
                if fd is None:
                    continue  # truncated: no ack, so the edge keeps and serves that client
                replies += b"a"
                self._adopt_fd(fd)
        for fd in received:  # descriptors without their marker byte: adopt, never leak
            self._adopt_fd(fd)
        if replies:
            try:
                channel.send(bytes(replies))
            except OSError:
                self._drop(channel)

    def _adopt_fd(self, fd: int) -> None:
        self.received += 1
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._adopt(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await self.on_socket(sock)
        except Exception:  # noqa: BLE001 - one connection must not take the channel down
            log.exception("handoff_adopt_failed")
            sock.close()

    def _drop(self, channel: socket.socket) -> None:
        if channel in self._channels:
            self._channels.discard(channel)
            try:
                asyncio.get_running_loop().remove_reader(channel.fileno())
            except (ValueError, OSError):
                pass
            channel.close()


class HandoffSender:
    """The edge's end: a cached health verdict, and `send` that says whether the daemon took it.

    Sent sockets stay open here until the daemon acknowledges them; `on_orphan` gets back every
    one still unacknowledged when the channel breaks, to be served without the daemon."""

    def __init__(self, path: Path, on_orphan: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.on_orphan = on_orphan
        self._channel: socket.socket | None = None
        self._healthy = False
        self._checked_until = 0.0
        self._lock = asyncio.Lock()
        self._pending: deque[socket.socket] = deque()  # sent, not yet acknowledged, in order
        self._pings: deque[asyncio.Future] = deque()

    async def healthy(self) -> bool:
        """The daemon answers on the channel; cached ~1 s when healthy, 200 ms when not."""
        if time.monotonic() < self._checked_until:
            return self._healthy
        async with self._lock:
            if time.monotonic() >= self._checked_until:
                self._healthy = await self._check()
                self._checked_until = time.monotonic() + (HEALTHY_TTL_S if self._healthy else UNHEALTHY_TTL_S)
        return self._healthy

    def send(self, sock: socket.socket) -> bool:
        """Pass `sock` to the daemon; False (and unhealthy at once) if it could not be passed.
        On True, this sender owns `sock` until the daemon acknowledges it."""
        if self._channel is None or not self._healthy:
            return False
        try:
            socket.send_fds(self._channel, [b"F"], [sock.fileno()])
        except OSError as exc:  # a dead daemon (EPIPE), a full channel (EAGAIN): go direct
            log.warning("handoff_refused error=%r action=direct", exc)
            self._break()
            return False
        self._pending.append(sock)
        return True

    def invalidate(self) -> None:
        self._break()

    def close(self) -> None:
        self._break()

    @property
    def unacknowledged(self) -> int:
        return len(self._pending)

    async def _check(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            if self._channel is None:
                channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                channel.setblocking(False)
                try:
                    async with asyncio.timeout(PING_TIMEOUT_S):
                        await loop.sock_connect(channel, str(self.path))
                except BaseException:
                    channel.close()
                    raise
                self._channel = channel
                loop.add_reader(channel.fileno(), self._on_readable)
            answer = loop.create_future()
            self._pings.append(answer)
            self._channel.send(b"P")
            async with asyncio.timeout(PING_TIMEOUT_S):
                return await answer
        except (OSError, TimeoutError, ConnectionError):
            self._break()
            return False

    def _on_readable(self) -> None:
        try:
            data = self._channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._break()
            return
        for byte in data:
            if byte == 0x61 and self._pending:  # a: the oldest sent socket is the daemon's now
                self._pending.popleft().close()
            elif byte == 0x70 and self._pings:  # p
                ping = self._pings.popleft()
                if not ping.done():
                    ping.set_result(True)

    def _break(self) -> None:
        """The channel is gone: unhealthy now, and every unacknowledged client goes back."""
        self._healthy = False
        self._checked_until = 0.0
        if self._channel is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._channel.fileno())
            except (RuntimeError, ValueError):
                pass
            self._channel.close()
            self._channel = None
        while self._pings:
            ping = self._pings.popleft()
            if not ping.done():
                ping.set_result(False)
        orphans, self._pending = self._pending, deque()
        if orphans:
            log.warning("handoff_broken unacknowledged=%d action=direct", len(orphans))
        for sock in orphans:
            self.on_orphan(sock)


def _is_listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def ping(path: Path, timeout_s: float = 0.5) -> bool:
    """A blocking health check of the daemon's hand-off channel, for `status` and `doctor`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout_s)
        probe.connect(str(path))
        probe.sendall(b"P")
        return probe.recv(1) == b"p"
    except OSError:
        return False
    finally:
        probe.close()
