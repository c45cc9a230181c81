"""Handing accepted client sockets from the edge to the metering daemon over a Unix socket.

The edge accepts a connection and, when the daemon is healthy, passes the socket itself
(SCM_RIGHTS) before reading a byte of it: the daemon serves it as if it had accepted it, and the
edge is out of the byte path. The channel is one stream connection; the edge sends b"F" with
one descriptor per connection and b"P" to ask for health, which the daemon answers b"p".
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
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
            log.error("handoff_truncated: descriptors lost; the edge will see those clients reset")
        if not message and not fds:
            self._drop(channel)  # the edge went away
            return
        for _ in range(message.count(b"P")):
            try:
                channel.send(b"p")
            except OSError:
                self._drop(channel)
                break
        for fd in fds:
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
    """The edge's end: a cached health verdict, and `send` that says whether the daemon took it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._channel: socket.socket | None = None
        self._healthy = False
        self._checked_until = 0.0
        self._lock = asyncio.Lock()

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
        """Pass `sock` to the daemon; False (and unhealthy at once) if it could not be passed."""
        if self._channel is None or not self._healthy:
            return False
        try:
            socket.send_fds(self._channel, [b"F"], [sock.fileno()])
            return True
        except OSError as exc:  # a dead daemon (EPIPE), a full channel (EAGAIN): go direct
            log.warning("handoff_refused error=%r action=direct", exc)
            self.invalidate()
            return False

    def invalidate(self) -> None:
        self._healthy = False
        self._checked_until = 0.0
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def close(self) -> None:
        self.invalidate()

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
            await loop.sock_sendall(self._channel, b"P")
            async with asyncio.timeout(PING_TIMEOUT_S):
                answer = await loop.sock_recv(self._channel, 1)
            if answer != b"p":
                raise ConnectionError("no answer")
            return True
        except (OSError, TimeoutError, ConnectionError):
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            return False


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
