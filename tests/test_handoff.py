"""The edge's half of the hand-off protocol against a scripted daemon on a real Unix socket:
a client socket is served by exactly one side, whatever the daemon does (slow, lossy, dead)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from halton_meter.handoff import PING_TIMEOUT_S, HandoffSender


class ScriptedDaemon:
    """Accepts the edge's channel and answers per `script(channel)` in a thread."""

    def __init__(self, path, script) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script) -> None:
        channel, _ = self.listener.accept()
        try:
            script(channel)
        finally:
            channel.close()
            self.listener.close()


def read_one(channel: socket.socket) -> tuple[bytes, list[int]]:
    message, fds, _, _ = socket.recv_fds(channel, 16, 4)
    return message, fds


def client_pair() -> tuple[socket.socket, socket.socket]:
    """(the edge's accepted socket, the client's end)."""
    return socket.socketpair()


async def hand_off(path, script, *, slow_check: bool = False):
    orphans: list[socket.socket] = []
    daemon = ScriptedDaemon(path, script)
    sender = HandoffSender(path, on_orphan=orphans.append)
    assert await sender.healthy()
    accepted, client = client_pair()
    assert sender.send(accepted)
    if slow_check:  # the daemon is too slow to answer the next ping: the edge gives up on it
        sender._checked_until = 0.0
        assert not await sender.healthy()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not sender.unacknowledged:
            break
    daemon.thread.join(5)
    return sender, orphans, accepted, client


def test_a_slow_daemon_keeps_what_it_adopts_and_the_edge_does_not_serve_it_too(tmp_path):
    def script(channel):
        message, _ = read_one(channel)
        assert message == b"P"
        channel.send(b"p")
        message, fds = read_one(channel)  # the F and its descriptor
        time.sleep(PING_TIMEOUT_S * 3)  # a loop stall: the edge's ping times out meanwhile
        channel.send(b"a")
        with socket.socket(fileno=fds[0]) as adopted:
            adopted.sendall(b"DAEMON")
        channel.recv(16)  # the pending ping, then EOF after the edge's SHUT_WR

    sender, orphans, accepted, client = asyncio.run(hand_off(tmp_path / "d.sock", script, slow_check=True))
    assert orphans == [], "the daemon adopted it: the edge must not serve it as well"
    assert accepted.fileno() == -1, "the edge closed its copy once the daemon answered"
    client.settimeout(2)
    assert client.recv(16) == b"DAEMON"


def test_a_lost_descriptor_is_answered_n_and_served_by_the_edge(tmp_path):
    def script(channel):
        read_one(channel)
        channel.send(b"p")
        _, fds = read_one(channel)
        for fd in fds:
            socket.close(fd)
        channel.send(b"n")  # as the receiver answers an F whose descriptor was truncated away

    sender, orphans, accepted, _ = asyncio.run(hand_off(tmp_path / "d.sock", script))
    assert orphans == [accepted]


def test_a_daemon_that_dies_before_answering_gives_its_queue_back(tmp_path):
    def script(channel):
        read_one(channel)
        channel.send(b"p")
        read_one(channel)  # takes the F, dies before answering: the channel closes

    sender, orphans, accepted, _ = asyncio.run(hand_off(tmp_path / "d.sock", script))
    assert orphans == [accepted] and accepted.fileno() != -1
    assert sender.unacknowledged == 0
