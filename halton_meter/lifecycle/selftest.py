"""The end-to-end self-test of an installed proxy, offline: what `init` ends with and `doctor` runs.

One streaming call goes exactly the way a client's does: CONNECT to the edge's port, hand-off to
the daemon, TLS with a leaf of the local CA verified against the client bundle, the daemon's
verified TLS to an upstream, and a row in the ledger with exact usage. The upstream is a loopback
fake provider started here for `selftest.halton-meter.test` (adapters/selftest.py), whose
certificate comes from the same local CA. The row proves metering and is then deleted, so the
self-test never shows up in reports.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field

from halton_meter.adapters import PROVIDER_HOSTS, selftest
from halton_meter.config import Settings
from halton_meter.fakeprovider import FakeProvider
from halton_meter.tls.ca import CAError, CertificateAuthority

PROJECT_PREFIX = "halton-selftest-"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SelfTestResult:
    checks: list[Check] = field(default_factory=list)
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    @property
    def reason(self) -> str:
        """The first failure, for one-line reports."""
        return next((f"{c.name}: {c.detail}" for c in self.checks if not c.ok), "")

    def as_json(self) -> dict:
        return {"ok": self.ok, "elapsed_ms": round(self.elapsed_ms, 1),
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks]}


def run_selftest(settings: Settings, proxy_port: int, *, timeout_s: float = 10.0) -> SelfTestResult:
    """Send one metered call through 127.0.0.1:`proxy_port`; never raises for a failed step."""
    result = SelfTestResult()
    started = time.monotonic()
    try:
        _run(settings, proxy_port, timeout_s, result.checks)
    finally:
        result.elapsed_ms = (time.monotonic() - started) * 1000
    return result


def _run(settings: Settings, proxy_port: int, timeout_s: float, checks: list[Check]) -> None:
    ca = CertificateAuthority(settings.ca_dir, PROVIDER_HOSTS)
    stale = ca.pending_rebuild()
    if stale is not None or not settings.bundle_path.is_file():
        what = "missing" if stale == "created" or stale is None else f"out of date ({stale})"
        checks.append(Check("ca", False, f"the local CA or client bundle is {what}; the daemon "
                                         "rebuilds it when it starts: run `halton-meter restart`"))
        return
    checks.append(Check("ca", True, f"{settings.ca_dir} current, bundle {settings.bundle_path}"))

    upstream = _Upstream(ca)
    try:
        upstream_port = upstream.start()
    except (CAError, OSError) as exc:
        checks.append(Check("upstream", False, f"cannot start the loopback test upstream ({exc})"))
        return
    project = PROJECT_PREFIX + secrets.token_hex(4)
    try:
        call = _call(proxy_port, upstream_port, settings, project, timeout_s)
    finally:
        upstream.stop()
    checks.append(call)
    if call.ok:
        checks.append(_check_row(settings, project, timeout_s))


class _Upstream:
    """The fake provider on its own event loop thread, for the length of one self-test."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.fake = FakeProvider(None, hosts=(selftest.HOST,), ca=ca)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="selftest-upstream", daemon=True)

    def start(self) -> int:
        self.thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self.fake.close(), self.loop).result(5)
            except Exception:  # noqa: BLE001 - best effort: the thread is a daemon thread
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


def _call(proxy_port: int, upstream_port: int, settings: Settings, project: str, timeout_s: float) -> Check:
    context = ssl.create_default_context(cafile=str(settings.bundle_path))
    conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=context, timeout=timeout_s)
    conn.set_tunnel(selftest.HOST, upstream_port)
    body = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 16, "stream": True,
                       "messages": [{"role": "user", "content": "halton-meter self-test"}]})
    try:
        conn.request("POST", "/v1/messages", body=body, headers={
            "content-type": "application/json", "anthropic-version": "2023-06-01",
            "x-halton-project": project, "x-fake-delay-ms": "1", "user-agent": "halton-meter-selftest"})
        response = conn.getresponse()
        payload = response.read()
    except ConnectionRefusedError:
        return Check("call", False, f"nothing accepts connections on 127.0.0.1:{proxy_port}: "
                                    "the edge is not running (`halton-meter start`)")
    except ssl.SSLCertVerificationError as exc:
        return Check("call", False, f"the proxy's certificate did not verify against the client bundle "
                                    f"({exc.verify_message}): run `halton-meter restart`")
    except (OSError, http.client.HTTPException) as exc:
        return Check("call", False, f"the call through 127.0.0.1:{proxy_port} failed ({exc!r})")
    finally:
        conn.close()
    if response.status != 200 or b"message_stop" not in payload:
        return Check("call", False, f"the call through the proxy answered {response.status}: "
                                    f"{payload[:200].decode('utf-8', 'replace')}")
    return Check("call", True, f"streamed through 127.0.0.1:{proxy_port} with TLS from the local CA")


def _check_row(settings: Settings, project: str, timeout_s: float) -> Check:
    """The call's row, with exact usage and a cost; deleted once seen."""
    deadline = time.monotonic() + timeout_s
    try:
        db = sqlite3.connect(settings.db_path, timeout=timeout_s)
    except sqlite3.Error as exc:
        return Check("ledger", False, f"cannot open {settings.db_path} ({exc})")
    try:
        while True:
            try:
                row = db.execute("SELECT provider, usage_status, output_tokens, cost_nanousd FROM calls "
                                 "WHERE project = ?", (project,)).fetchone()
            except sqlite3.OperationalError:
                row = None  # no calls table yet: the daemon has not written its first row
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if row is None:
            return Check("ledger", False, "the call went through but no row was written: the daemon did "
                                          "not meter it (it is down, and the edge tunnelled it unmetered). "
                                          "See `halton-meter status`")
        provider, usage_status, output_tokens, cost = row
        with db:
            db.execute("DELETE FROM request_bodies WHERE call_id IN "
                       "(SELECT call_id FROM calls WHERE project = ?)", (project,))
            db.execute("DELETE FROM calls WHERE project = ?", (project,))
            db.execute("DELETE FROM projects WHERE name = ?", (project,))
        if provider != selftest.PROVIDER or usage_status != "exact" or not output_tokens or cost is None:
            return Check("ledger", False, f"the row is wrong: provider={provider} usage={usage_status} "
                                          f"output_tokens={output_tokens} cost={cost}")
        return Check("ledger", True, f"metered: {output_tokens} output tokens, exact usage, priced")
    except sqlite3.Error as exc:
        return Check("ledger", False, f"cannot read {settings.db_path} ({exc})")
    finally:
        db.close()
