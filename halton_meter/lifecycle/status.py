"""`status` and `doctor`: one row per component, each with a state and, when not ok, the fix.

Verdicts: HEALTHY (every row ok), INCONSISTENT (something disagrees with what was installed but
traffic still flows: e.g. the daemon is down and the edge tunnels unmetered), BROKEN (traffic or
trust fails, or nothing is installed). The `--json` shape is documented in the README and stable:
{"verdict", "version", "home", "mode", "supervisor", "ports": {"edge", "api"},
 "components": [{"name", "state": "ok"|"warn"|"fail"|"off", "detail", "fix"}]}
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from halton_meter import __version__
from halton_meter.adapters import PROVIDER_HOSTS
from halton_meter.config import ConfigError, Settings, load_settings
from halton_meter.lifecycle import shellrc, trust
from halton_meter.lifecycle.stack import api_health, daemon_healthy, edge_listening
from halton_meter.lifecycle.state import InstallState, StateError, load_state
from halton_meter.lifecycle.supervise import SupervisorError, supervisor_for
from halton_meter.spool import spool_dir, spooled_items
from halton_meter.tls.ca import CAError, CertificateAuthority

OK, WARN, FAIL, OFF = "ok", "warn", "fail", "off"
LOW_DISK_BYTES = 200 * 1024 * 1024
# How long after a restart that followed a crash the daemon row tells of the metering gap.
UNCLEAN_EXIT_NOTICE_S = 3600


@dataclass(frozen=True)
class Row:
    name: str
    state: str
    detail: str
    fix: str = ""


def verdict(rows: list[Row]) -> str:
    states = {row.state for row in rows}
    return "BROKEN" if FAIL in states else "INCONSISTENT" if WARN in states else "HEALTHY"


def collect(settings: Settings) -> tuple[InstallState | None, list[Row]]:
    """The status rows; never raises for a broken component (that is what the rows are for)."""
    try:
        state = load_state(settings)
    except StateError as exc:
        return None, [Row("install", FAIL, str(exc), "halton-meter init")]
    if state is None:
        rows = [Row("install", FAIL, f"not installed in {settings.home}", "halton-meter init")]
        return None, rows + [_ca_row(settings), _database_row(settings), _budgets_row(settings)]
    health = api_health(settings, state.api_port)
    return state, [
        _edge_row(settings, state),
        _daemon_row(settings, state, health),
        _api_row(settings, state, health),
        _export_row(settings, health),
        _ca_row(settings),
        _trust_row(settings, state),
        _supervisor_row(settings, state),
        _shell_rc_row(settings, state),
        _database_row(settings, health),
        _budgets_row(settings),
    ]


def as_json(settings: Settings, state: InstallState | None, rows: list[Row]) -> dict:
    return {
        "verdict": verdict(rows),
        "version": __version__,
        "home": str(settings.home),
        "mode": state.mode if state else None,
        "supervisor": state.supervisor if state else None,
        "ports": {"edge": state.edge_port if state else None, "api": state.api_port if state else None},
        "components": [asdict(row) for row in rows],
    }


def render(settings: Settings, state: InstallState | None, rows: list[Row], title: str = "status") -> str:
    lines = [f"halton-meter {title}: {verdict(rows)}"]
    if state is not None:
        lines.append(f"  mode {state.mode}, supervisor {state.supervisor}, edge 127.0.0.1:{state.edge_port}, "
                     f"API 127.0.0.1:{state.api_port}, home {settings.home}")
    width = max(len(row.name) for row in rows)
    for row in rows:
        lines.append(f"  {row.state.upper():<4}  {row.name:<{width}}  {row.detail}")
        if row.fix and row.state in (WARN, FAIL):
            lines.append(f"  {'':<4}  {'':<{width}}  fix: {row.fix}")
    return "\n".join(lines)


# -- status rows -------------------------------------------------------------------------------

def _edge_row(settings: Settings, state: InstallState) -> Row:
    if edge_listening(settings.listen, state.edge_port):
        return Row("edge", OK, f"listening on 127.0.0.1:{state.edge_port}")
    return Row("edge", FAIL, f"nothing listens on 127.0.0.1:{state.edge_port}: programs using the proxy "
                             "cannot connect", "halton-meter start")


def _daemon_row(settings: Settings, state: InstallState, health: dict | None) -> Row:
    if daemon_healthy(settings):
        crash = (health or {}).get("unclean_exit")
        if crash and health.get("uptime_s", 0) < UNCLEAN_EXIT_NOTICE_S:
            # Past, not present: metering works now, so the row stays ok; the gap is what to know.
            return Row("daemon", OK, f"metering; restarted after an unclean exit: {_describe_gap(crash)}")
        return Row("daemon", OK, "metering (answers on its hand-off socket)")
    return Row("daemon", WARN, "down: provider calls go straight through, unmetered (gaps are logged)",
               "halton-meter restart   # then see `halton-meter doctor` if it stays down")


def _api_row(settings: Settings, state: InstallState, health: dict | None) -> Row:
    if health is None:
        return Row("api", WARN, f"no answer on http://127.0.0.1:{state.api_port}/health",
                   "halton-meter restart   # if the port is taken: halton-meter init --api-port PORT")
    return Row("api", OK, f"http://127.0.0.1:{state.api_port}/health: {health.get('rows_written', 0)} "
                          f"row(s) written since start, up {health.get('uptime_s', 0):.0f} s")


def _export_row(settings: Settings, health: dict | None) -> Row:
    """The OTLP exporter, as the running daemon reports it in /health."""
    if settings.otlp is None:
        return Row("export", OFF, "off: nothing leaves this machine ([export.otlp] is not set)")
    url = settings.otlp.url
    export = health.get("export") if health else None
    if health is None:
        return Row("export", WARN, f"to {url}: state unknown while the API does not answer", "halton-meter restart")
    if export is None:
        return Row("export", WARN, "[export.otlp] is set but the running daemon predates it",
                   "halton-meter restart")
    pending = export.get("pending_rows")
    waiting = f"{pending:,} row(s) waiting" if pending is not None else "rows waiting"
    if export["state"] in ("backing_off", "failing"):
        retry = export.get("next_attempt_at")
        when = f"; next try in {max(0, retry - time.time()):.0f} s" if retry else ""
        return Row("export", WARN, f"to {url}: {export.get('last_error') or 'failing'}{when}; {waiting} "
                                   "in the ledger (none lost)",
                   f"check the collector at {url} and [export.otlp] headers in {settings.config_path}")
    rejected = f", {export['rejected_rows']:,} rejected by the collector" if export.get("rejected_rows") else ""
    return Row("export", OK, f"to {url}: {export['shipped_rows']:,} row(s) shipped, {waiting}{rejected}")


def _ca_row(settings: Settings) -> Row:
    try:
        ca = CertificateAuthority(settings.ca_dir, PROVIDER_HOSTS)
        pending = ca.pending_rebuild()
        if pending == "created":
            return Row("ca", FAIL, f"no CA in {settings.ca_dir}", "halton-meter init")
        ca.check_permissions()
    except CAError as exc:
        return Row("ca", FAIL, str(exc), f"chmod 700 {settings.ca_dir} && chmod 600 {settings.ca_dir}/*.key")
    except OSError as exc:
        return Row("ca", FAIL, f"cannot read {settings.ca_dir} ({exc.strerror or exc})", "halton-meter init")
    if pending is not None:
        return Row("ca", WARN, f"the CA is {pending.replace('_', ' ')}: the daemon rebuilds it when it restarts",
                   "halton-meter restart && halton-meter init")
    bundle_ok = settings.bundle_path.is_file() and ca.ca_cert_path.read_bytes().strip() in settings.bundle_path.read_bytes()
    if not bundle_ok:
        return Row("ca", WARN, f"{settings.bundle_path} does not hold the current CA", "halton-meter restart")
    return Row("ca", OK, f"{ca.ca_cert_path} (key 0600, dir 0700), SHA-256 {ca.fingerprint_sha256[:23]}…")


def _trust_row(settings: Settings, state: InstallState) -> Row:
    ca_pem = settings.ca_dir / "ca.pem"
    store = state.trust.get("store")
    try:
        if store == "keychain":
            if trust.keychain_trusts(ca_pem):
                return Row("trust", OK, "the login keychain trusts the CA")
            return Row("trust", FAIL, "the login keychain does not trust the current CA", "halton-meter init")
        if store == "system":
            system = trust.system_store()
            if system is not None and trust.system_store_trusts(system, ca_pem):
                return Row("trust", OK, f"the system store trusts the CA ({system.anchor_path})")
            return Row("trust", FAIL, "the system store does not hold the current CA", "halton-meter init")
    except (trust.TrustError, OSError) as exc:
        return Row("trust", WARN, f"cannot check the trust store ({exc})", "halton-meter doctor")
    return Row("trust", OK, f"through the bundle variables ({settings.bundle_path}); no system store used")


def _supervisor_row(settings: Settings, state: InstallState) -> Row:
    try:
        services = supervisor_for(state.supervisor, settings).status()
    except SupervisorError as exc:
        return Row("supervisor", FAIL, str(exc), "halton-meter init")
    missing = [s.name for s in services.values() if not s.installed]
    if missing:
        return Row("supervisor", FAIL, f"{state.supervisor}: {', '.join(missing)} not installed", "halton-meter init")
    stopped = [s for s in services.values() if not s.running]
    if stopped:
        return Row("supervisor", WARN, f"{state.supervisor}: " + "; ".join(f"{s.name} {s.detail}" for s in stopped),
                   "halton-meter start")
    return Row("supervisor", OK, f"{state.supervisor}: " + ", ".join(f"{s.name} {s.detail}" for s in services.values()))


def _shell_rc_row(settings: Settings, state: InstallState) -> Row:
    if state.mode == "run":
        return Row("shell rc", OFF, "not used in run mode (`halton-meter run` sets the variables)")
    if not state.rc_files:
        return Row("shell rc", OFF, "skipped at init (--no-shell-rc)")
    problems, want = [], f":{state.edge_port}"
    for path in state.rc_files:
        try:
            block = shellrc.read_block(Path(path))
        except shellrc.ShellRcError as exc:
            problems.append(str(exc))
            continue
        if block is None:
            problems.append(f"{path} has no halton-meter block")
        elif not block.get("HTTPS_PROXY", "").endswith(want):
            problems.append(f"{path} points at {block.get('HTTPS_PROXY')}, not port {state.edge_port}")
    if problems:
        return Row("shell rc", WARN, "; ".join(problems), "halton-meter init --apps")
    return Row("shell rc", OK, "block present in " + ", ".join(state.rc_files))


def _describe_gap(crash: dict) -> str:
    """`metering gap 12 s from 10:02:03 (3 connection(s) went through unmetered)`."""
    since = time.strftime("%H:%M:%S", time.localtime(crash["last_seen_at"]))
    unmetered = crash.get("unmetered_connections") or 0
    return (f"metering gap {crash['gap_s']:.0f} s from {since}"
            + (f" ({unmetered} connection(s) went through unmetered)" if unmetered else ""))


def _database_row(settings: Settings, health: dict | None = None) -> Row:
    """The ledger as the daemon last wrote it (/health), then the spool, then the file itself."""
    fix_disk = f"free disk space, or make {settings.db_path} and its directory writable"
    if health and health.get("rows_lost"):
        error = (health.get("last_write_error") or {}).get("error")
        return Row("database", FAIL, f"the daemon lost {health['rows_lost']} row(s): the ledger could not be "
                                     f"written{f' ({error})' if error else ''}; see its log (ledger_rows_lost)",
                   f"{fix_disk}, then: halton-meter restart")
    error = (health or {}).get("last_write_error")
    if error and error.get("ended_at") is None:
        since = time.strftime("%H:%M:%S", time.localtime(error["since"]))
        return Row("database", WARN, f"cannot be written since {since} ({error['error']}): "
                                     f"{health.get('rows_waiting', 0):,} row(s) waiting in memory, none lost; "
                                     "they are written as soon as it can", fix_disk)
    files, items = spooled_items(spool_dir(settings.db_path))
    if files:
        return Row("database", WARN, f"{items:,} spooled row(s) and event(s) in {spool_dir(settings.db_path)} "
                                     "are not in the ledger yet: the daemon writes them when the database "
                                     "takes writes again, or when it starts", f"{fix_disk}, then: halton-meter restart")
    if not settings.db_path.exists():
        return Row("database", OK, f"{settings.db_path} (no calls yet)")
    try:
        db = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True, timeout=2)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            calls = db.execute("SELECT count(*) FROM calls").fetchone()[0] if version else 0
        finally:
            db.close()
    except sqlite3.Error as exc:
        return Row("database", FAIL, f"cannot read {settings.db_path} ({exc})",
                   f"mv {settings.db_path} {settings.db_path}.broken && halton-meter restart")
    return Row("database", OK, f"{settings.db_path}: schema {version}, {calls:,} call(s)")


def _budgets_row(settings: Settings) -> Row:
    """Budgets and model rules, from the ledger: spent this period, and what is refused now."""
    from halton_meter.budgets import budget_states

    if not settings.db_path.exists():
        return Row("budgets", OFF, "none set", "halton-meter budget set --daily 10")
    now = time.time()
    try:
        db = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True, timeout=2)
        try:
            states = budget_states(db, now, settings.budget_warn_at_percent)
            rules = db.execute("SELECT COUNT(*) FROM model_policies").fetchone()[0]
            refused = db.execute("SELECT COUNT(*) FROM policy_events WHERE kind IN ('call_blocked', 'model_blocked') "
                                 "AND at >= ?", (now - 86400,)).fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return Row("budgets", OFF, "none set (the ledger predates budgets)", "halton-meter budget set --daily 10")
    if not states and not rules:
        return Row("budgets", OFF, "none set", "halton-meter budget set --daily 10")
    summary = f"{len(states)} budget(s), {rules} model rule(s); {refused:,} call(s) refused in the last 24 h"
    over = [s for s in states if s["state"] in ("blocking", "exceeded")]
    if over:
        # Stated, not a warning: a budget doing its job is not a broken install (`status` exits 1
        # on a warning, which would trip scripts and monitors for a normal state).
        worst = over[0]
        verb = "BLOCKING: its calls are refused" if worst["state"] == "blocking" else "EXCEEDED (warn only)"
        return Row("budgets", OK, f"{worst['title']} {verb}, {worst['percent']:.0f}% used "
                                  f"(`budget list`, `budget set` to raise it, `budget rm {worst['id']}`); {summary}")
    top = max(states, key=lambda s: s["percent"], default=None)
    lead = f"highest: {top['title']} at {top['percent']:.0f}%; " if top else ""
    return Row("budgets", OK, lead + summary)


# -- doctor: everything status checks, and more ------------------------------------------------

def doctor_rows(settings: Settings) -> tuple[InstallState | None, list[Row]]:
    state, rows = collect(settings)
    rows = [_python_row(), _openssl_row(), _config_row(settings), _home_row(settings), _disk_row(settings),
            *rows, _shell_env_row(settings, state)]
    if state is not None:
        rows.append(_selftest_row(settings, state))
    return state, rows


def _python_row() -> Row:
    version = ".".join(map(str, sys.version_info[:3]))
    return Row("python", OK, f"{version} at {sys.executable}, {ssl.OPENSSL_VERSION}")


def _openssl_row() -> Row:
    path = shutil.which("openssl")
    if path is None:
        return Row("openssl", FAIL, "the openssl command is not on PATH: the CA and leaves cannot be minted",
                   "sudo apt-get install openssl   # or: brew install openssl")
    try:
        version = subprocess.run([path, "version"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Row("openssl", FAIL, f"{path} does not run ({exc})", "reinstall openssl")
    return Row("openssl", OK, f"{version} ({path})")


def _config_row(settings: Settings) -> Row:
    try:
        load_settings(settings.home)
    except ConfigError as exc:
        return Row("config", FAIL, str(exc), f"edit {settings.config_path}")
    where = settings.config_path if settings.config_path.exists() else "defaults (no config.toml)"
    return Row("config", OK, str(where))


def _home_row(settings: Settings) -> Row:
    if not settings.home.exists():
        return Row("home", FAIL, f"{settings.home} does not exist", "halton-meter init")
    if not os.access(settings.home, os.W_OK):
        return Row("home", FAIL, f"{settings.home} is not writable", f"chmod u+w {settings.home}")
    mode = settings.home.stat().st_mode & 0o777
    if mode & 0o077:
        return Row("home", WARN, f"{settings.home} is mode {mode:o}: other users can read your call history",
                   f"chmod 700 {settings.home}")
    return Row("home", OK, f"{settings.home} (mode 700)")


def _disk_row(settings: Settings) -> Row:
    where = settings.home if settings.home.exists() else settings.home.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Row("disk", WARN, f"cannot measure free space ({exc})")
    if free < LOW_DISK_BYTES:
        return Row("disk", WARN, f"only {free // 2**20} MiB free under {where}: rows may be lost when it fills",
                   "free some disk space")
    return Row("disk", OK, f"{free // 2**30} GiB free")


def _shell_env_row(settings: Settings, state: InstallState | None) -> Row:
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if not proxy:
        return Row("this shell", OK if state is None or state.mode == "run" else WARN,
                   "HTTPS_PROXY is not set here: only `halton-meter run` commands are metered",
                   "open a new terminal (the rc block sets it)" if state and state.mode != "run" else "")
    if state is not None and not proxy.rstrip("/").endswith(f":{state.edge_port}"):
        return Row("this shell", WARN, f"HTTPS_PROXY={proxy} does not point at the edge (port {state.edge_port})",
                   "open a new terminal, or: halton-meter init --apps")
    cafile = os.environ.get("SSL_CERT_FILE")
    if cafile and Path(cafile) != settings.bundle_path:
        return Row("this shell", WARN, f"SSL_CERT_FILE={cafile} is not the halton-meter bundle",
                   f"export SSL_CERT_FILE={settings.bundle_path}")
    return Row("this shell", OK, f"HTTPS_PROXY={proxy}")


def _selftest_row(settings: Settings, state: InstallState) -> Row:
    from halton_meter.lifecycle.selftest import run_selftest

    result = run_selftest(settings, state.edge_port)
    if result.ok:
        return Row("end to end", OK, f"a streamed call through 127.0.0.1:{state.edge_port} with TLS from the "
                                     f"local CA was metered exactly ({result.elapsed_ms:.0f} ms)")
    return Row("end to end", FAIL, result.reason, "halton-meter restart   # then run doctor again")
