"""TLS termination for provider hosts: our leaf towards the client, verified TLS upstream.

The `Interceptor` is shared by all intercepted connections; each one becomes a `Relay`.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import ssl
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from halton_meter.adapters import selftest
from halton_meter.attribution import ProcessAttributor
from halton_meter.config import DEFAULT_CONNECT_TIMEOUT_S
from halton_meter.ledger import Ledger
from halton_meter.relay import LOOKUP_WAIT_S, Relay
from halton_meter.tls.ca import CertificateAuthority
from halton_meter.tunnel import READ_SIZE, close_quietly

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT_S = 15.0  # a client that stalls its handshake with us
# How long a leaf context is used before asking the CA again (which renews leaves near expiry).
CONTEXT_RECHECK_S = 3600.0
# Process lookups (attribution.py) waiting or running at once; past this, new connections skip
# the lookup (their calls fall through to `default`) rather than queue behind a slow /proc.
MAX_PENDING_LOOKUPS = 64


class Interceptor:
    """Certificates, upstream trust and the ledger, plus the live relays (for shutdown)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        ledger: Ledger,
        *,
        upstreams: dict[str, tuple[str, int]] | None = None,
        upstream_ca_files: tuple[Path, ...] = (),
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        attributor: ProcessAttributor | None = None,
    ) -> None:
        self.ca = ca
        self.ledger = ledger
        self.attributor = attributor
        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="attribution") if attributor else None
        self._lookup_slots = threading.BoundedSemaphore(MAX_PENDING_LOOKUPS)
        self._pending_lookups: set[Future] = set()
        self.upstreams = dict(upstreams or {})
        self.upstream_ssl = upstream_context(upstream_ca_files)
        self._selftest_ssl: ssl.SSLContext | None = None
        self.connect_timeout_s = connect_timeout_s
        self.shutting_down = False
        self._relays: set[Relay] = set()
        self._server_contexts: dict[str, tuple[ssl.SSLContext, float]] = {}

    def upstream_for(self, host: str, port: int) -> tuple[tuple[str, int], ssl.SSLContext]:
        """Where `host`'s calls go and the trust that verifies the certificate found there."""
        if host == selftest.HOST:
            # The self-test upstream is trusted only with a certificate of our own CA.
            if self._selftest_ssl is None:
                self._selftest_ssl = upstream_context((self.ca.ca_cert_path,), system=False)
            return upstream_address(self.upstreams, host, port), self._selftest_ssl
        return upstream_address(self.upstreams, host, port), self.upstream_ssl

    def preload(self, hosts: tuple[str, ...]) -> None:
        """Load every provider host's leaf now, so no client's first call waits for openssl."""
        for host in hosts:
            self._server_contexts[host] = (self.ca.server_context(host), time.monotonic() + CONTEXT_RECHECK_S)

    async def server_context(self, host: str) -> ssl.SSLContext:
        cached = self._server_contexts.get(host)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        # The CA may need openssl (first use or renewal): off the event loop.
        context = await asyncio.to_thread(self.ca.server_context, host)
        self._server_contexts[host] = (context, time.monotonic() + CONTEXT_RECHECK_S)
        return context

    def attribute(self, writer: asyncio.StreamWriter) -> Future | None:
        """Start finding the process behind a connection, in a worker thread (relay.py asks once
        per connection, never per request, and records the row when it is done: traffic never
        waits for it)."""
        if self._lookups is None or not self._lookup_slots.acquire(blocking=False):
            return None
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        if not isinstance(peer, tuple) or not isinstance(local, tuple):
            self._lookup_slots.release()
            return None
        try:
            future = self._lookups.submit(self.attributor.lookup, peer, local)
        except RuntimeError:  # shutting down
            self._lookup_slots.release()
            return None
        self._pending_lookups.add(future)
        future.add_done_callback(self._lookup_done)
        return future

    def _lookup_done(self, future: Future) -> None:
        self._pending_lookups.discard(future)
        self._lookup_slots.release()

    def close(self, timeout_s: float = LOOKUP_WAIT_S) -> None:
        """After the last relay: let running lookups answer (their rows are then recorded), for
        at most `timeout_s`; a stuck one is abandoned and its row recorded as `default`."""
        if self._lookups is None:
            return
        wait(self._pending_lookups.copy(), timeout=timeout_s)
        self._lookups.shutdown(wait=False, cancel_futures=True)

    async def handle(self, reader, writer, protocol, host: str, port: int,
                     context: ssl.SSLContext, project: str | None = None) -> None:
        """Take over a client connection whose CONNECT was just answered with 200."""
        protocol.tls = True  # edge._ClientProtocol: an EOF now ends the connection
        try:
            await writer.start_tls(context, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # Most often the client does not trust our CA yet: say how to fix it, once per connection.
            log.warning("client_tls_failed host=%s error=%r hint=%s", host, exc,
                        "point SSL_CERT_FILE / NODE_EXTRA_CA_CERTS at the halton-meter CA bundle")
            close_quietly(writer)
            return
        relay = Relay(self, reader, writer, protocol, host, port, project)
        self._relays.add(relay)
        try:
            await relay.run()
        finally:
            self._relays.discard(relay)

    @property
    def open_connections(self) -> int:
        return len(self._relays)

    def begin_shutdown(self) -> None:
        """No new calls; idle kept-alive connections close now, calls in flight may finish."""
        self.shutting_down = True
        for relay in list(self._relays):
            if relay.idle:
                relay.cancel("interrupted")


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


def upstream_address(upstreams: dict[str, tuple[str, int]], host: str, port: int) -> tuple[str, int]:
    """The address that receives `host:port`'s traffic: a configured upstream, the self-test's
    loopback upstream, or the host itself."""
    if host == selftest.HOST:
        return "127.0.0.1", port
    return upstreams.get(host, (host, port))


def upstream_context(extra_ca_files: tuple[Path, ...] = (), *, system: bool = True) -> ssl.SSLContext:
    """Full verification (chain and host name) against the system store (unless `system` is
    False) plus any extra anchors."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if not system:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name, no anchors yet
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in extra_ca_files:
        context.load_verify_locations(cafile=str(path))
    context.set_alpn_protocols(["http/1.1"])
    return context
