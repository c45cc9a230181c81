"""`halton-meter serve`: assemble CA, ledger, interceptor and listener; run until a signal."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sqlite3
import ssl
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from halton_meter import __version__, api_views
from halton_meter.adapters import PRIMARY_HOSTS, PROVIDER_HOSTS
from halton_meter.api import ApiServer
from halton_meter.attribution import ProcessAttributor
from halton_meter.bodies import SWEEP_INTERVAL_S
from halton_meter.budgets import PolicyEngine, desktop_notifier
from halton_meter.config import Settings, make_private_dir
from halton_meter.edge import ProxyServer
from halton_meter.handoff import HandoffError, HandoffReceiver, is_listening
from halton_meter.intercept import Interceptor, shrink_tls_read_buffers
from halton_meter.ledger import Ledger
from halton_meter.pricing import PriceTable, PricingError
from halton_meter.tls.bundle import write_client_bundle
from halton_meter.tls.ca import CertificateAuthority

log = logging.getLogger(__name__)

MEMORY_TRIM_INTERVAL_S = 60.0


class ServeError(Exception):
    """Startup failed for a reason the user can fix; the message says how."""


def prepare_ca(settings: Settings) -> CertificateAuthority:
    """The CA (made on first use, rebuilt if the host list changed), leaves minted, bundle written."""
    ca = CertificateAuthority(settings.ca_dir, PROVIDER_HOSTS)
    if ca.ensure():
        log.info("ca_created path=%s", ca.ca_cert_path)
    ca.premint(PRIMARY_HOSTS)  # regional Vertex/Bedrock hosts are minted on first use
    write_client_bundle(ca.ca_cert_path, settings.bundle_path)
    return ca


async def serve(settings: Settings, out: TextIO = sys.stdout, stop: asyncio.Event | None = None,
                on_ready: Callable[[int], None] | None = None, handoff: Path | None = None) -> int:
    """Run until `stop` is set (or a signal); `on_ready(port)` once the listener accepts.

    With `handoff`, this is the metering daemon behind an edge: it also adopts the client
    sockets the edge passes over that Unix socket (handoff.py)."""
    make_private_dir(settings.home)
    if handoff is not None and handoff.exists() and is_listening(handoff):
        # Refused before the ledger starts: a second daemon must not replay the first one's spool
        # or take the edge's gap notes.
        raise ServeError(f"Another metering daemon is listening on {handoff}. "
                         "Stop it first (halton-meter stop), or use another --home.")
    shrink_tls_read_buffers()
    try:
        ca = await asyncio.to_thread(prepare_ca, settings)
    except OSError as exc:
        raise ServeError(f"Cannot write the CA files under {settings.home} ({exc.strerror or exc}). "
                         "Check that the directory is writable and the disk is not full.") from exc
    try:
        prices = PriceTable.load(settings.home)
    except PricingError as exc:
        raise ServeError(str(exc)) from exc
    ledger = Ledger(settings.db_path, prices=prices, bodies=settings.bodies)
    ledger.run_dir = settings.run_dir  # heartbeat, and the report of a crashed previous run
    policies = PolicyEngine(warn_at_percent=settings.budget_warn_at_percent,
                            notify=desktop_notifier() if settings.budget_notify else None)
    policies.emit = ledger.record_event
    ledger.policies = policies
    ledger.commit_listeners.append(policies.on_commit)
    try:
        ledger.start()
    except sqlite3.Error as exc:
        raise ServeError(f"Cannot open the ledger {settings.db_path} ({exc}). "
                         "Check the file and its directory, or move it aside to start a new one.") from exc
    try:
        interceptor = Interceptor(ca, ledger, upstreams=settings.upstreams,
                                  upstream_ca_files=settings.upstream_ca_files,
                                  connect_timeout_s=settings.connect_timeout_s,
                                  attributor=_attributor(settings))
    except ssl.SSLError as exc:
        ledger.close()
        raise ServeError(f"An --upstream-ca file is not a valid PEM certificate ({exc.reason}). "
                         "Pass the gateway's CA certificate in PEM form.") from exc
    interceptor.preload(PRIMARY_HOSTS)
    server = ProxyServer(interceptor, listen=settings.listen, port=settings.port)
    try:
        port = await server.start()
    except OSError as exc:
        ledger.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"Port {settings.port} on {settings.listen} is already in use. "
                "Stop the other process or pick another port with --port (0 picks a free one)."
            ) from exc
        raise ServeError(f"Cannot listen on {settings.listen}:{settings.port} ({exc.strerror}).") from exc

    receiver = None
    if handoff is not None:
        receiver = HandoffReceiver(handoff, server.adopt)
        try:
            await receiver.start()
        except (HandoffError, OSError) as exc:
            await server.close(0)
            ledger.close()
            raise ServeError(str(exc)) from exc

    exporter = None
    if settings.otlp is not None:  # opt-in: nothing leaves the machine without [export.otlp]
        from halton_meter.otlp import OtlpExporter  # urllib and friends: only when configured

        exporter = OtlpExporter(settings.db_path, settings.otlp, version=__version__)
        exporter.start()
        ledger.commit_listeners.append(exporter.wake)
    health = _health(settings, server, ledger, port, handoff, exporter)
    api = await _start_api(settings, api_views.routes(
        settings.db_path, _gauges(server, interceptor, ledger, exporter), health))

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        # First signal: stop gracefully. Another one: skip the grace period; rows still flush.
        if stop.is_set():
            server.hurry()
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    host = f"[{settings.listen}]" if ":" in settings.listen else settings.listen
    proxy_url = f"http://{host}:{port}"
    print(f"halton-meter listening on {proxy_url}", file=out)
    print(f"  CA certificate  {ca.ca_cert_path}", file=out)
    print(f"  CA SHA-256      {ca.fingerprint_sha256}", file=out)
    print(f"  client bundle   {settings.bundle_path}", file=out)
    print(f"  ledger          {settings.db_path}", file=out)
    print(f"  prices          {prices.describe_source()}", file=out)
    if settings.otlp is not None:
        print(f"  OTLP export     {settings.otlp.url}", file=out)
    if receiver is not None:
        print(f"  hand-off socket {handoff}", file=out)
    if api is not None:
        print(f"  API             http://{host}:{api.port}/health", file=out)
    else:
        print(f"  API             unavailable: port {settings.api_port} is busy (metering is unaffected)",
              file=out)
    for host, (address, upstream_port) in sorted(settings.upstreams.items()):
        print(f"  upstream        {host} -> {address}:{upstream_port}", file=out)
    print("  use it:", file=out)
    print(f"    export HTTPS_PROXY={proxy_url}", file=out)
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        print(f"    export {name}={settings.bundle_path}", file=out)
    out.flush()
    ledger.audit("proxy_started", version=__version__, port=port, pid=os.getpid())
    if on_ready is not None:
        on_ready(port)
    sweeper = asyncio.create_task(_sweep_bodies_daily(ledger))
    trimmer = asyncio.create_task(_return_freed_memory())
    try:
        await stop.wait()
    finally:
        sweeper.cancel()
        trimmer.cancel()
        try:
            if receiver is not None:
                receiver.close()
            if api is not None:
                await api.close()
                _api_port_file(settings).unlink(missing_ok=True)
            await server.close(settings.shutdown_grace_s)
            await asyncio.to_thread(interceptor.close)  # lookups still running record their rows
            ledger.audit("proxy_stopping", rows_lost_so_far=ledger.rows_lost)
            await asyncio.to_thread(ledger.close)
            if exporter is not None:  # rows it has not shipped yet go on the next start
                await asyncio.to_thread(exporter.close)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
    print(f"halton-meter stopped: {ledger.rows_written} call(s) recorded"
          + (f", {ledger.rows_lost} LOST (see log)" if ledger.rows_lost else ""), file=out)
    out.flush()
    return 1 if ledger.rows_lost else 0


def _attributor(settings: Settings) -> ProcessAttributor | None:
    """Rules match the process too, so without the lookup there is nothing to attribute by."""
    if not settings.process_lookup:
        return None
    return ProcessAttributor(settings.attribution_rules)


async def _sweep_bodies_daily(ledger: Ledger) -> None:
    """Stored bodies past `[bodies] retention_days` go: now, then once a day."""
    while True:
        ledger.sweep_bodies()
        await asyncio.sleep(SWEEP_INTERVAL_S)


async def _return_freed_memory() -> None:
    """Under many concurrent connections glibc's malloc keeps freed memory in its arenas: the
    soak (tools/soak.py) saw RSS creep 1.3-2.3 MiB/min with the bytes in use flat. malloc_trim
    hands it back to the system once a minute. Elsewhere (macOS, musl) there is nothing to do."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    while True:
        await asyncio.sleep(MEMORY_TRIM_INTERVAL_S)
        await asyncio.to_thread(trim, 0)


def _api_port_file(settings: Settings) -> Path:
    return settings.run_dir / "api.port"


async def _start_api(settings: Settings, routes: dict) -> ApiServer | None:
    """The local HTTP API; a busy port costs the API, never metering (status shows it)."""
    api = ApiServer(routes, listen=settings.listen, port=settings.api_port,
                    allowed_origins=settings.api_allowed_origins)
    try:
        port = await api.start()
    except OSError as exc:
        log.warning("api_unavailable port=%d error=%s", settings.api_port, exc.strerror or exc)
        return None
    make_private_dir(settings.run_dir)
    _api_port_file(settings).write_text(f"{port}\n")
    return api


def _gauges(server: ProxyServer, interceptor: Interceptor, ledger: Ledger, exporter):
    started = time.time()

    def gauges() -> dict[str, float]:
        figures = {
            "halton_meter_up": 1, "halton_meter_start_time_seconds": round(started, 3),
            "halton_meter_open_connections": interceptor.open_connections,
            "halton_meter_ledger_rows_written_total": ledger.rows_written,
            "halton_meter_ledger_rows_lost_total": ledger.rows_lost,
            "halton_meter_unmetered_connections_total": server.unmetered_connections,
            "halton_meter_ledger_rows_waiting": ledger.rows_waiting,
            "halton_meter_ledger_rows_spooled_total": ledger.rows_spooled,
            "halton_meter_policy_refusals_total": ledger.policies.refusals if ledger.policies is not None else 0,
        }
        if exporter is not None:
            status = exporter.status()
            figures["halton_meter_export_pending_rows"] = status["pending_rows"] or 0
            figures["halton_meter_export_consecutive_failures"] = status["consecutive_failures"]
        return figures
    return gauges


def _health(settings: Settings, server: ProxyServer, ledger: Ledger, port: int, handoff: Path | None,
            exporter=None):
    started = time.time()

    def health(_query: dict[str, list[str]]) -> tuple[int, dict]:
        return 200, {
            "status": "ok" if not (ledger.rows_lost or ledger.refusing_writes) else "degraded",
            "version": __version__,
            "pid": os.getpid(),
            "mode": "daemon" if handoff is not None else "serve",
            "started_at": round(started, 3),
            "uptime_s": round(time.time() - started, 3),
            "proxy_port": port,
            "handoff_socket": str(handoff) if handoff is not None else None,
            "ledger": str(settings.db_path),
            "rows_written": ledger.rows_written,
            "rows_lost": ledger.rows_lost,
            "rows_waiting": ledger.rows_waiting,
            "rows_spooled": ledger.rows_spooled,
            "rows_replayed": ledger.rows_replayed,
            "last_write_error": ledger.last_write_error,
            "unclean_exit": ledger.unclean_exit,
            "bodies_dropped": ledger.bodies_dropped,
            "export": exporter.status() if exporter is not None else None,
            "budgets": ledger.policies.snapshot() if ledger.policies is not None else [],
        }
    return health
