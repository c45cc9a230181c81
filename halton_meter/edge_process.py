"""`halton-meter edge`: the always-on user-facing listener in front of the metering daemon.

It accepts each client connection and, before reading a byte, passes the socket to the daemon
when the daemon is healthy (handoff.py); the edge is then out of the byte path. When the daemon
is down, restarting or upgrading, the edge serves the connection itself with interception off:
provider hosts are tunnelled straight to the provider (unmetered, logged as a gap) and every
other host as always. A client never sees a refused connection because metering is down.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
from typing import Callable, TextIO

from halton_meter.config import Settings, make_private_dir
from halton_meter.edge import ProxyServer
from halton_meter.handoff import HandoffSender
from halton_meter.spool import gap_notes_path

log = logging.getLogger(__name__)

PORT_SEARCH = 20  # a busy default port moves to the next free one of these


class EdgeError(Exception):
    """The edge cannot start for a reason the user can fix; the message says how."""


def handoff_path(settings: Settings):
    return settings.run_dir / "daemon.sock"


def bind_listener(listen: str, port: int, *, search: bool) -> socket.socket:
    """A listening loopback socket on `port`, or (with `search`) the next free one after it."""
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    candidates = [port] if port == 0 or not search else range(port, port + PORT_SEARCH)
    last_error: OSError | None = None
    for candidate in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listen, candidate))
        except OSError as exc:
            sock.close()
            last_error = exc
            if exc.errno != errno.EADDRINUSE:
                break
            continue
        sock.listen(512)
        sock.setblocking(False)
        return sock
    raise EdgeError(f"No free port to listen on at {listen} from {port} ({last_error}). "
                    "Stop what uses it or pass --port.")


async def run_edge(settings: Settings, out: TextIO = sys.stdout, stop: asyncio.Event | None = None,
                   on_ready: Callable[[int], None] | None = None, *, search_port: bool = True) -> int:
    listener = bind_listener(settings.listen, settings.port, search=search_port)
    port = listener.getsockname()[1]
    make_private_dir(settings.run_dir)
    (settings.run_dir / "edge.port").write_text(f"{port}\n")
    direct = ProxyServer(None, listen=settings.listen, port=port, upstreams=settings.upstreams,
                         connect_timeout_s=settings.connect_timeout_s)
    direct.gap_notes = gap_notes_path(settings.run_dir)
    await direct.start(listen=False)
    loop = asyncio.get_running_loop()
    sender = HandoffSender(handoff_path(settings), on_orphan=lambda sock: _serve_directly(direct, sock))
    stop = stop or asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    accepting = asyncio.create_task(_accept_loop(listener, sender, direct))
    host = f"[{settings.listen}]" if ":" in settings.listen else settings.listen
    print(f"halton-meter edge listening on http://{host}:{port}", file=out)
    print(f"  daemon hand-off {sender.path}", file=out, flush=True)
    if on_ready is not None:
        on_ready(port)
    try:
        await stop.wait()
    finally:
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
        listener.close()
        sender.close()
        await direct.close(settings.shutdown_grace_s)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print(f"halton-meter edge stopped: {direct.unmetered_connections} provider connection(s) "
          "went direct while the daemon was down", file=out)
    return 0


async def _accept_loop(listener: socket.socket, sender: HandoffSender, direct: ProxyServer) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            client, _ = await loop.sock_accept(listener)
        except OSError as exc:  # EMFILE and friends: pause rather than spin
            log.error("accept_failed error=%r", exc)
            await asyncio.sleep(0.1)
            continue
        if await sender.healthy() and sender.send(client):
            continue  # the sender closes its descriptor once the daemon acknowledges it
        _serve_directly(direct, client)


def _serve_directly(direct: ProxyServer, client: socket.socket) -> None:
    task = asyncio.get_running_loop().create_task(direct.adopt(client))
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("direct_adopt_failed error=%r", task.exception())
