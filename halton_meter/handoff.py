"""Handing accepted client sockets from the edge to the metering daemon over a Unix socket.

The edge accepts a connection and, when the daemon is healthy, passes the socket itself
(SCM_RIGHTS) before reading a byte of it: the daemon serves it as if it had accepted it, and the
edge is out of the byte path. The channel is one stream connection; the edge sends b"F" with
one descriptor per connection and b"P" to ask for health. The daemon answers in order: b"p" for
a ping, and b"a" for each descriptor as soon as it holds it, before reading a byte from it (b"n"
if the descriptor was lost in transit).

Until a connection is acknowledged the edge keeps its own descriptor: if the channel breaks
first (the daemon was killed, or died with descriptors still in the socket buffer), the daemon
never touched that client, so the edge serves it itself and the client never sees a reset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
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
            if is_listening(self.path):
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
                    replies += b"n"  # its descriptor was lost (MSG_CTRUNC): the edge serves that client
                    continue
                replies += b"a"
                self._adopt_fd(fd)
        for fd in received:  # descriptors without a marker byte: never ours to serve, never leaked
            os.close(fd)
        if replies:
            try:  # a few bytes the edge is always reading; blocking briefly beats losing an answer
                channel.settimeout(1.0)
                channel.sendall(bytes(replies))
                channel.setblocking(False)
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


class _Channel:
    """One connection to the daemon, with what was sent on it and not yet answered."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: deque[socket.socket] = deque()  # sent client sockets awaiting b"a"/b"n", in order
        self.pings: deque[asyncio.Future] = deque()


class HandoffSender:
    """The edge's end: a cached health verdict, and `send` that says whether the daemon took it.

    Sent sockets stay open here until the daemon answers for them: b"a" (it holds the socket; ours
    is closed) or b"n" (it could not take it; `on_orphan` serves it). When the daemon's side of a
    channel ends, every socket still unanswered goes to `on_orphan`: the daemon never read it.
    When the edge gives up on a slow daemon, it only stops sending: the daemon may still adopt
    what it already has queued, so those sockets wait for their answers on the retiring channel."""

    def __init__(self, path: Path, on_orphan: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.on_orphan = on_orphan
        self._current: _Channel | None = None
        self._retiring: set[_Channel] = set()
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
        """Pass `sock` to the daemon; False (and unhealthy at once) if it could not be passed.
        On True, this sender owns `sock` until the daemon answers for it."""
        channel = self._current
        if channel is None or not self._healthy:
            return False
        try:
            socket.send_fds(channel.sock, [b"F"], [sock.fileno()])
        except OSError as exc:  # a dead daemon (EPIPE), a full channel (EAGAIN): go direct
            log.warning("handoff_refused error=%r action=direct", exc)
            self._retire(channel)
            return False
        channel.pending.append(sock)
        return True

    def invalidate(self) -> None:
        if self._current is not None:
            self._retire(self._current)

    def close(self) -> None:
        """Edge shutdown: the daemon adopts whatever it has queued; our copies just close."""
        for channel in [self._current, *self._retiring]:
            if channel is not None:
                self._end(channel, orphans=False)

    @property
    def unacknowledged(self) -> int:
        channels = [self._current, *self._retiring]
        return sum(len(channel.pending) for channel in channels if channel is not None)

    async def _check(self) -> bool:
        loop = asyncio.get_running_loop()
        channel = self._current
        try:
            if channel is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    async with asyncio.timeout(PING_TIMEOUT_S):
                        await loop.sock_connect(sock, str(self.path))
                    if not _is_same_user(sock, self.path):
                        log.warning("handoff_refused reason=daemon_of_another_user path=%s action=direct",
                                    self.path)
                        raise PermissionError(f"{self.path} is served by another user")
                except BaseException:
                    sock.close()
                    raise
                channel = self._current = _Channel(sock)
                loop.add_reader(sock.fileno(), self._on_readable, channel)
            answer = loop.create_future()
            channel.pings.append(answer)
            channel.sock.send(b"P")
            async with asyncio.timeout(PING_TIMEOUT_S):
                return await answer
        except (OSError, TimeoutError, ConnectionError):
            if channel is not None:
                self._retire(channel)
            return False

    def _on_readable(self, channel: _Channel) -> None:
        try:
            data = channel.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end(channel, orphans=True)  # the daemon's side is gone: it read nothing more
            return
        for byte in data:
            if byte in (0x61, 0x6E) and channel.pending:  # a: the daemon holds it; n: it could not
                sock = channel.pending.popleft()
                if byte == 0x61:
                    sock.close()
                else:
                    self.on_orphan(sock)
            elif byte == 0x70 and channel.pings:  # p
                ping = channel.pings.popleft()
                if not ping.done():
                    ping.set_result(True)
        if channel is not self._current and not channel.pending:
            self._end(channel, orphans=True)  # retired and fully answered

    def _retire(self, channel: _Channel) -> None:
        """Stop using `channel` (unhealthy now) but keep reading its answers until the daemon
        closes it: sockets it already queued may still be adopted, and must not be served twice."""
        self._healthy = False
        self._checked_until = 0.0
        if channel is self._current:
            self._current = None
        for ping in channel.pings:
            if not ping.done():
                ping.set_result(False)
        channel.pings.clear()
        if not channel.pending:
            self._end(channel, orphans=False)
            return
        self._retiring.add(channel)
        try:
            channel.sock.shutdown(socket.SHUT_WR)  # the daemon reads the queue, then EOF, then closes
        except OSError:
            pass

    def _end(self, channel: _Channel, *, orphans: bool) -> None:
        if channel is self._current:
            self._current = None
            self._healthy = False
            self._checked_until = 0.0
        self._retiring.discard(channel)
        try:
            asyncio.get_running_loop().remove_reader(channel.sock.fileno())
        except (RuntimeError, ValueError):
            pass
        channel.sock.close()
        for ping in channel.pings:
            if not ping.done():
                ping.set_result(False)
        channel.pings.clear()
        pending, channel.pending = channel.pending, deque()
        if orphans and pending:
            log.warning("handoff_broken unacknowledged=%d action=direct", len(pending))
        for sock in pending:
            if orphans:
                self.on_orphan(sock)
            else:
                sock.close()


def is_listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _is_same_user(sock: socket.socket, path: Path) -> bool:
    """Whether the process listening at the other end of `sock` runs as this user. Anyone who can
    write the run directory could listen on the hand-off path and be handed every client
    connection; the kernel's word (SO_PEERCRED, Linux) settles who it is, else the socket file's
    owner does."""
    if hasattr(socket, "SO_PEERCRED"):
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", credentials)
    else:
        uid = os.stat(path).st_uid
    return uid == os.getuid()


def ping(path: Path, timeout_s: float = 0.5) -> bool:
    """A blocking health check of the daemon's hand-off channel, for `status` and `doctor`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout_s)
        probe.connect(str(path))
        if not _is_same_user(probe, path):
            return False
        probe.sendall(b"P")
        return probe.recv(1) == b"p"
    except OSError:
        return False
    finally:
        probe.close()
