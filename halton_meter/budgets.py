"""Budgets and model policies: how much may be spent, and on which models, per project and provider.

The `budget` and `policy` commands store them in the ledger. The daemon keeps them in one
`PolicyEngine`:
- the ledger's writer thread loads them, with each budget's spend so far this period (one query a
  budget), at start and whenever another connection changed them or the history they count;
- the same thread adds every committed row's cost to the running totals, and raises the events
  (80 %, then 100 %: warn, or start blocking) that it queues into the ledger and may show as a
  desktop notification;
- the relay asks `refusal` before forwarding a call: memory reads only, never a query.

A budget counts the priced cost of calls that started in its current period (local midnight, the
local Monday, the 1st of the month), like `report`. An unpriced call cannot be counted: `budget
list` shows how many there are. A call in flight when a budget runs out finishes; the next one is
refused.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from typing import Callable, Iterable, TextIO

from halton_meter.adapters.selftest import PROVIDER as SELFTEST_PROVIDER
from halton_meter.attribution import ProjectNameError, check_project
from halton_meter.ledger import write_audit
from halton_meter.report import NANO, format_usd, iso_local, local_midnight, usd_string

log = logging.getLogger(__name__)

PERIODS = ("daily", "weekly", "monthly")
ACTIONS = ("warn", "block")
DEFAULT_WARN_AT_PERCENT = 80
MAX_AMOUNT_USD = 10**9  # nanodollars of it still fit SQLite's 64-bit integers
NOTIFY_TIMEOUT_S = 5.0
# Event kinds (policy_events.kind).
BUDGET_WARNING = "budget_warning"  # the warn threshold (80 %) was crossed
BUDGET_EXCEEDED = "budget_exceeded"  # a warn-only budget reached 100 %
BUDGET_BLOCKING = "budget_blocking"  # a block budget reached 100 %: its scope's calls are refused
CALL_BLOCKED = "call_blocked"  # one call refused by a budget
MODEL_BLOCKED = "model_blocked"  # one call refused by a model rule
THRESHOLD_KINDS = (BUDGET_WARNING, BUDGET_EXCEEDED, BUDGET_BLOCKING)


class PolicyError(ValueError):
    """A budget or policy command that cannot be done; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Budget:
    id: int
    project: str | None  # None: every project
    provider: str | None  # None: every provider
    period: str
    limit_nanousd: int
    action: str

    def covers(self, project: str, provider: str | None) -> bool:
        return ((self.project is None or self.project == project)
                and (self.provider is None or self.provider == provider))

    @property
    def scope(self) -> str:
        parts = [f"project {self.project}" if self.project else "all projects"]
        if self.provider:
            parts.append(f"provider {self.provider}")
        return ", ".join(parts)

    @property
    def title(self) -> str:
        return f"{self.period} budget of {format_usd(self.limit_nanousd)} for {self.scope}"


@dataclass(frozen=True, slots=True)
class ModelRule:
    id: int
    project: str | None  # None: every project
    kind: str  # allow | deny
    pattern: str  # a glob on the model name, case-insensitive

    def covers(self, project: str) -> bool:
        return self.project is None or self.project == project

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model.lower(), self.pattern.lower())


@dataclass(slots=True)
class PolicyEvent:
    """One row of `policy_events`, queued into the ledger by the engine or the relay."""

    SQL = ("INSERT INTO policy_events (at, kind, budget_id, policy_id, project, provider, model, "
           "period_start, spend_nanousd, limit_nanousd, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    kind: str
    message: str
    at: float = field(default_factory=time.time)
    budget_id: int | None = None
    policy_id: int | None = None
    project: str | None = None
    provider: str | None = None
    model: str | None = None
    period_start: float | None = None
    spend_nanousd: int | None = None
    limit_nanousd: int | None = None

    def values(self) -> tuple:
        return (self.at, self.kind, self.budget_id, self.policy_id, self.project, self.provider, self.model,
                self.period_start, self.spend_nanousd, self.limit_nanousd, self.message)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The proxy's own answer to a call a policy stops: HTTP status and a message naming why."""

    status: int  # 429 for a budget, 403 for a model rule
    error: str  # the kind of error, for the provider's error format: budget | model
    message: str
    event: PolicyEvent


# ---- periods --------------------------------------------------------------------------------


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """The local-time [start, end) of the `period` holding `now`: days start at local midnight,
    weeks on Monday, months on the 1st (DST changes make some days 23 or 25 hours)."""
    today = date.fromtimestamp(now)
    if period == "daily":
        first, after = today, today + timedelta(days=1)
    elif period == "weekly":
        first = today - timedelta(days=today.weekday())
        after = first + timedelta(days=7)
    elif period == "monthly":
        first = today.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return local_midnight(first), local_midnight(after)


def parse_amount(text: str) -> int:
    """`10`, `10.50`, `$0.25` -> nanodollars (exact); at least $0.000000001."""
    cleaned = text.strip().removeprefix("$").replace(",", "").replace("_", "")
    try:
        amount = Decimal(cleaned)
    except InvalidOperation:
        raise PolicyError(f"{text!r} is not an amount in dollars; write it like 10 or 12.50.") from None
    if not amount.is_finite() or not 0 < amount <= MAX_AMOUNT_USD or (amount * NANO) % 1:
        raise PolicyError(f"{text!r} is not a positive amount in dollars (at most ${MAX_AMOUNT_USD:,}, "
                          "nine decimal places).")
    return int(amount * NANO)


# ---- the ledger side ------------------------------------------------------------------------


def read_budgets(db: sqlite3.Connection) -> list[Budget]:
    return [Budget(*row) for row in db.execute(
        "SELECT id, project, provider, period, limit_nanousd, action FROM budgets ORDER BY id")]


def read_rules(db: sqlite3.Connection) -> list[ModelRule]:
    return [ModelRule(*row) for row in db.execute(
        "SELECT id, project, kind, pattern FROM model_policies ORDER BY id")]


def period_spend(db: sqlite3.Connection, budget: Budget, since: float) -> tuple[int, int]:
    """(priced cost, unpriced calls) of the calls in `budget`'s scope that started at `since` or later."""
    cost, unpriced = db.execute(
        "SELECT COALESCE(SUM(cost_nanousd), 0), COUNT(unpriced_reason) FROM calls WHERE started_at >= ? "
        "AND (? IS NULL OR COALESCE(project, 'default') = ?) AND (? IS NULL OR provider = ?) "
        "AND provider IS NOT ?",
        (since, budget.project, budget.project, budget.provider, budget.provider, SELFTEST_PROVIDER)).fetchone()
    return cost, unpriced


def _fired(db: sqlite3.Connection, budget: Budget, start: float) -> set[str]:
    """Threshold events already raised this period for this budget at its current limit."""
    return {kind for (kind,) in db.execute(
        f"SELECT DISTINCT kind FROM policy_events WHERE budget_id = ? AND period_start = ? AND limit_nanousd = ? "
        f"AND kind IN ({', '.join('?' * len(THRESHOLD_KINDS))})",
        (budget.id, start, budget.limit_nanousd, *THRESHOLD_KINDS))}


# ---- the daemon's engine --------------------------------------------------------------------


@dataclass(slots=True)
class _Tracked:
    """A budget with its running total for the current period."""

    budget: Budget
    start: float
    end: float
    spend: int
    unpriced: int
    fired: set[str]

    @property
    def blocking(self) -> bool:
        return self.budget.action == "block" and self.spend >= self.budget.limit_nanousd


class PolicyEngine:
    """Budgets with running totals and model rules, shared by the writer thread and the relay.

    The relay's questions (`active`, `needs_project`, `rules_for`, `refusal`) read tuples that the
    writer replaces whole, under a lock only where a total changes.
    """

    def __init__(self, *, warn_at_percent: int = DEFAULT_WARN_AT_PERCENT,
                 notify: Callable[[PolicyEvent], None] | None = None) -> None:
        self.warn_at_percent = warn_at_percent
        self.notify = notify
        self.emit: Callable[[PolicyEvent], None] = lambda event: None  # the ledger's event queue
        self.active = False  # any budget or rule at all: the relay's only question when there is none
        # A model rule, or a budget blocking now, names a project: a call must know its project.
        self.needs_project = False
        self._tracked: tuple[_Tracked, ...] = ()
        self._rules: tuple[ModelRule, ...] = ()
        self._blocking: tuple[_Tracked, ...] = ()
        self._roll_at = float("inf")
        self._fingerprint: object = None
        self._lock = threading.Lock()
        self.refusals = 0  # calls refused since start, for /metrics

    # -- writer thread --

    def load(self, db: sqlite3.Connection, now: float | None = None) -> None:
        """(Re)load from the ledger if budgets, rules or the counted history changed.

        Called by the writer inside its transaction whenever another connection committed: a
        `budget`/`policy` command, a `reprice`, a `project rename` (each writes an audit event).
        """
        budgets, rules = read_budgets(db), read_rules(db)
        audit = db.execute("SELECT COALESCE(MAX(id), 0) FROM audit_events").fetchone()[0]
        fingerprint = (tuple(budgets), tuple(rules), audit)
        if fingerprint == self._fingerprint:
            return
        now = time.time() if now is None else now
        raised = {(t.budget.id, t.budget.limit_nanousd, t.start): t.fired for t in self._tracked}
        tracked = []
        for budget in budgets:
            start, end = period_bounds(budget.period, now)
            spend, unpriced = period_spend(db, budget, start)
            # Raised before this reload may still be queued, not yet in the database.
            fired = _fired(db, budget, start) | raised.get((budget.id, budget.limit_nanousd, start), set())
            tracked.append(_Tracked(budget, start, end, spend, unpriced, fired))
        with self._lock:
            self._fingerprint = fingerprint
            self._tracked, self._rules = tuple(tracked), tuple(rules)
            self._settle(now)
            events = self._crossings(self._tracked, now)
        self._raise(events)

    def on_commit(self, rows: Iterable) -> None:
        """Add the committed rows' costs to the running totals (writer thread, after commit)."""
        if not self._tracked:
            return
        now = time.time()
        with self._lock:
            if now >= self._roll_at:
                self._roll(now)
            touched = []
            for row in rows:
                if row.provider == SELFTEST_PROVIDER:
                    continue  # init's and doctor's check: deleted once verified, never spend
                project = row.project or "default"
                for tracked in self._tracked:
                    if row.started_at >= tracked.start and tracked.budget.covers(project, row.provider):
                        tracked.spend += row.cost_nanousd or 0
                        tracked.unpriced += row.unpriced_reason is not None
                        touched.append(tracked)
            events = self._crossings(touched, now)
            self._refresh_blocking()
        self._raise(events)

    def _settle(self, now: float) -> None:
        self.active = bool(self._tracked or self._rules)
        self._refresh_blocking()
        self._roll_at = min((t.end for t in self._tracked), default=float("inf"))

    def _refresh_blocking(self) -> None:
        self._blocking = tuple(t for t in self._tracked if t.blocking)
        self.needs_project = (any(rule.project for rule in self._rules)
                              or any(t.budget.project for t in self._blocking))

    def _roll(self, now: float) -> None:
        """A period ended: its budgets start again from zero (calls that started before the
        boundary belong to the old period, as in `report`)."""
        for tracked in self._tracked:
            if now >= tracked.end:
                tracked.start, tracked.end = period_bounds(tracked.budget.period, now)
                tracked.spend = tracked.unpriced = 0
                tracked.fired = set()
        self._settle(now)

    def _crossings(self, tracked: Iterable[_Tracked], now: float) -> list[PolicyEvent]:
        events = []
        seen = set()
        for item in tracked:
            if id(item) in seen:
                continue
            seen.add(id(item))
            budget = item.budget
            if budget.limit_nanousd * self.warn_at_percent <= item.spend * 100 < budget.limit_nanousd * 100:
                kinds = [BUDGET_WARNING]
            elif item.spend >= budget.limit_nanousd:
                # Past the whole budget at once (a budget set below today's spend): both events.
                kinds = [BUDGET_WARNING, BUDGET_BLOCKING if budget.action == "block" else BUDGET_EXCEEDED]
            else:
                continue
            for kind in kinds:
                if kind in item.fired:
                    continue
                item.fired.add(kind)
                events.append(self._threshold_event(item, kind, now))
        return events

    def _threshold_event(self, item: _Tracked, kind: str, now: float) -> PolicyEvent:
        budget = item.budget
        used = f"{format_usd(item.spend)} of {format_usd(budget.limit_nanousd)}"
        message = {
            BUDGET_WARNING: f"{self.warn_at_percent}% of the {budget.title} used ({used})",
            BUDGET_EXCEEDED: f"{budget.title} exceeded ({used}); calls go on (action warn)",
            BUDGET_BLOCKING: f"{budget.title} used up ({used}); new calls are refused until the period ends",
        }[kind]
        return PolicyEvent(kind=kind, message=message, at=now, budget_id=budget.id, project=budget.project,
                           provider=budget.provider, period_start=item.start, spend_nanousd=item.spend,
                           limit_nanousd=budget.limit_nanousd)

    def _raise(self, events: list[PolicyEvent]) -> None:
        for event in events:
            log.warning("policy_event kind=%s budget_id=%s message=%s", event.kind, event.budget_id, event.message)
            self.emit(event)
            if self.notify is not None:
                self.notify(event)

    # -- the relay (event loop thread) --

    def rules_for(self, project: str) -> bool:
        """True when a model rule covers `project`: the relay must read the model before forwarding."""
        return any(rule.covers(project) for rule in self._rules)

    def blocking_for(self, project: str, provider: str | None) -> bool:
        self._roll_if_due()
        return any(t.budget.covers(project, provider) for t in self._blocking)

    def _roll_if_due(self) -> None:
        """Start the new period of budgets whose period ended (any reader may be the first to see it)."""
        now = time.time()
        if now >= self._roll_at:
            with self._lock:
                if now >= self._roll_at:
                    self._roll(now)

    def refusal(self, project: str, provider: str | None, model: str | None) -> Refusal | None:
        """Why this call must not reach the provider, or None. Model rules first, then budgets."""
        self._roll_if_due()
        if model:
            refused = self._model_refusal(project, provider, model)
            if refused is not None:
                return refused
        for tracked in self._blocking:
            budget = tracked.budget
            if budget.covers(project, provider):
                message = (f"halton-meter: the {budget.title} is used up ({format_usd(tracked.spend)} spent "
                           f"since {time.strftime('%Y-%m-%d %H:%M', time.localtime(tracked.start))}). This call "
                           f"was not sent. It resets at {time.strftime('%Y-%m-%d %H:%M', time.localtime(tracked.end))}; "
                           f"raise it with `halton-meter budget set` or remove it with `halton-meter budget rm {budget.id}`.")
                event = PolicyEvent(kind=CALL_BLOCKED, message=message, budget_id=budget.id, project=project,
                                    provider=provider, model=model, period_start=tracked.start,
                                    spend_nanousd=tracked.spend, limit_nanousd=budget.limit_nanousd)
                return Refusal(429, "budget", message, event)
        return None

    def _model_refusal(self, project: str, provider: str | None, model: str) -> Refusal | None:
        rules = [rule for rule in self._rules if rule.covers(project)]
        denied = next((rule for rule in rules if rule.kind == "deny" and rule.matches(model)), None)
        allows = [rule for rule in rules if rule.kind == "allow"]
        if denied is None and (not allows or any(rule.matches(model) for rule in allows)):
            return None
        if denied is not None:
            why, rule = f"model {model} is denied for project {project} (rule {denied.id}: deny {denied.pattern})", denied
        else:
            patterns = ", ".join(rule.pattern for rule in allows)
            why, rule = f"model {model} is not in the allow list of project {project} ({patterns})", allows[0]
        message = (f"halton-meter: {why}. This call was not sent. Change it with `halton-meter policy list` "
                   f"and `halton-meter policy rm {rule.id}`.")
        event = PolicyEvent(kind=MODEL_BLOCKED, message=message, policy_id=rule.id, project=project,
                            provider=provider, model=model)
        return Refusal(403, "model", message, event)

    def snapshot(self) -> list[dict]:
        """The running totals, for `/health`."""
        self._roll_if_due()
        with self._lock:
            return [{"budget_id": t.budget.id, "scope": t.budget.scope, "period": t.budget.period,
                     "action": t.budget.action, "limit_nanousd": t.budget.limit_nanousd, "spend_nanousd": t.spend,
                     "unpriced_calls": t.unpriced, "period_start": t.start, "period_end": t.end,
                     "blocking": t.blocking} for t in self._tracked]


# ---- desktop notifications --------------------------------------------------------------------


def desktop_notifier() -> Callable[[PolicyEvent], None] | None:
    """A notifier for budget events where the platform has one (notify-send with a desktop
    session, osascript on macOS); None elsewhere. It never blocks or fails the caller."""
    if sys.platform == "darwin" and shutil.which("osascript"):
        def command(title: str, text: str) -> list[str]:
            script = f"display notification {_applescript(text)} with title {_applescript(title)}"
            return ["osascript", "-e", script]
    elif shutil.which("notify-send"):
        def command(title: str, text: str) -> list[str]:
            return ["notify-send", "--app-name=halton-meter", title, text]
    else:
        return None

    def notify(event: PolicyEvent) -> None:
        if event.kind not in THRESHOLD_KINDS:
            return
        argv = command("halton-meter: budget", event.message)
        threading.Thread(target=_run_quietly, args=(argv,), name="notify", daemon=True).start()

    return notify


def _applescript(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _run_quietly(argv: list[str]) -> None:
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=NOTIFY_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("notify_failed error=%r", exc)


# ---- the `budget` and `policy` commands -------------------------------------------------------


def known_providers() -> list[str]:
    from halton_meter.adapters import _PROVIDER_OF_HOST
    from halton_meter.adapters.selftest import PROVIDER as SELFTEST

    return sorted(set(_PROVIDER_OF_HOST.values()) - {SELFTEST})


def _scope_project(db: sqlite3.Connection, project: str | None, out: TextIO) -> str | None:
    """A valid project name, following a rename's alias to the name calls are recorded under."""
    if project is None:
        return None
    try:
        check_project(project)
    except ProjectNameError as exc:
        raise PolicyError(str(exc)) from None
    alias = db.execute("SELECT project FROM project_aliases WHERE alias = ?", (project,)).fetchone()
    if alias is not None:
        out.write(f"{project} was renamed to {alias[0]}: the rule applies to {alias[0]}.\n")
        return alias[0]
    return project


def _scope_provider(provider: str | None) -> str | None:
    if provider is None:
        return None
    providers = known_providers()
    if provider.lower() not in providers:
        raise PolicyError(f"There is no provider {provider!r}. Use one of: {', '.join(providers)}.")
    return provider.lower()


def set_budget(db: sqlite3.Connection, *, project: str | None, provider: str | None, period: str,
               amount: str, action: str, out: TextIO) -> int:
    """Create the budget of this scope and period, or change its amount and action."""
    project, provider = _scope_project(db, project, out), _scope_provider(provider)
    limit = parse_amount(amount)
    with db:
        found = db.execute("SELECT id FROM budgets WHERE coalesce(project, '') = ? AND coalesce(provider, '') = ? "
                           "AND period = ?", (project or "", provider or "", period)).fetchone()
        if found is None:
            budget_id = db.execute(
                "INSERT INTO budgets (project, provider, period, limit_nanousd, action, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (project, provider, period, limit, action, time.time())).lastrowid
        else:
            budget_id = found[0]
            db.execute("UPDATE budgets SET limit_nanousd = ?, action = ? WHERE id = ?", (limit, action, budget_id))
        write_audit(db, "budget_set", {"id": budget_id, "project": project, "provider": provider,
                                       "period": period, "limit_nanousd": limit, "action": action})
    budget = Budget(budget_id, project, provider, period, limit, action)
    start, _ = period_bounds(period, time.time())
    spend, _ = period_spend(db, budget, start)
    verb = "Set" if found is None else "Changed"
    consequence = "new calls are refused once it is used up" if action == "block" else "a warning when it is used up"
    out.write(f"{verb} budget {budget_id}: {budget.title}, {action} ({consequence}).\n"
              f"  spent so far this period: {format_usd(spend)} ({_percent(spend, limit)}).\n")
    return 0


def _percent(spend: int, limit: int) -> str:
    return f"{spend * 100 / limit:.0f}%"


def budget_states(db: sqlite3.Connection, now: float, warn_at_percent: int = DEFAULT_WARN_AT_PERCENT) -> list[dict]:
    """Every budget with this period's spend, as `budget list` and `status` show them."""
    states = []
    for budget in read_budgets(db):
        start, end = period_bounds(budget.period, now)
        spend, unpriced = period_spend(db, budget, start)
        over = spend >= budget.limit_nanousd
        if over:
            state = "blocking" if budget.action == "block" else "exceeded"
        elif spend * 100 >= budget.limit_nanousd * warn_at_percent:
            state = "near"
        else:
            state = "ok"
        states.append({
            "id": budget.id, "project": budget.project, "provider": budget.provider, "scope": budget.scope,
            "period": budget.period, "action": budget.action, "limit_nanousd": budget.limit_nanousd,
            "limit_usd": usd_string(budget.limit_nanousd), "spend_nanousd": spend, "spend_usd": usd_string(spend),
            "percent": round(spend * 100 / budget.limit_nanousd, 1), "unpriced_calls": unpriced, "state": state,
            "period_start": iso_local(start), "period_end": iso_local(end), "title": budget.title,
        })
    return states


def list_budgets(db: sqlite3.Connection, *, as_json: bool, out: TextIO, now: float | None = None,
                 warn_at_percent: int = DEFAULT_WARN_AT_PERCENT) -> int:
    states = budget_states(db, time.time() if now is None else now, warn_at_percent)
    if as_json:
        out.write(json.dumps({"budgets": states}, indent=2) + "\n")
        return 0
    if not states:
        out.write("No budgets. Set one with `halton-meter budget set --daily 10` "
                  "(add --project P, --provider X, --action block).\n")
        return 0
    header = ("id", "scope", "period", "limit", "spent", "used", "action", "state", "resets")
    rows = [(str(s["id"]), s["scope"], s["period"], format_usd(s["limit_nanousd"]),
             format_usd(s["spend_nanousd"]) + ("*" if s["unpriced_calls"] else ""), f"{s['percent']:.0f}%",
             s["action"], s["state"], s["period_end"][:16].replace("T", " ")) for s in states]
    _table(header, rows, out, right=(3, 4, 5))
    if any(s["unpriced_calls"] for s in states):
        out.write("* some calls in the period are unpriced and not counted: see `halton-meter report`.\n")
    return 0


def remove_budgets(db: sqlite3.Connection, ids: list[int], out: TextIO) -> int:
    return _remove(db, "budgets", "budget", ids, out)


def add_rules(db: sqlite3.Connection, *, kind: str, project: str | None, patterns: list[str], out: TextIO) -> int:
    """Add allow or deny globs for a project (or every project); an existing rule is kept once."""
    project = _scope_project(db, project, out)
    for pattern in patterns:
        if not pattern.strip() or len(pattern) > 200 or any(c.isspace() for c in pattern):
            raise PolicyError(f"{pattern!r} is not a model pattern; write a model name or a glob like 'claude-opus-*'.")
    with db:
        for pattern in patterns:
            db.execute("INSERT OR IGNORE INTO model_policies (project, kind, pattern, created_at) "
                       "VALUES (?, ?, ?, ?)", (project, kind, pattern, time.time()))
        write_audit(db, "model_policy_added", {"project": project, "kind": kind, "patterns": patterns})
    who = f"project {project}" if project else "every project"
    if kind == "allow":
        out.write(f"For {who}, only models matching an allow rule may be called now.\n")
    else:
        out.write(f"For {who}, models matching {', '.join(patterns)} are refused now.\n")
    return list_rules(db, as_json=False, out=out)


def list_rules(db: sqlite3.Connection, *, as_json: bool, out: TextIO) -> int:
    rules = read_rules(db)
    if as_json:
        out.write(json.dumps({"rules": [{"id": r.id, "project": r.project, "kind": r.kind, "pattern": r.pattern}
                                        for r in rules]}, indent=2) + "\n")
        return 0
    if not rules:
        out.write("No model rules. Add one with `halton-meter policy deny --project ci 'claude-opus-*'`.\n")
        return 0
    _table(("id", "project", "rule", "models"),
           [(str(r.id), r.project or "(every project)", r.kind, r.pattern) for r in rules], out)
    return 0


def remove_rules(db: sqlite3.Connection, ids: list[int], out: TextIO) -> int:
    return _remove(db, "model_policies", "model rule", ids, out)


def _remove(db: sqlite3.Connection, table: str, noun: str, ids: list[int], out: TextIO) -> int:
    missing = [i for i in ids if db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (i,)).fetchone() is None]
    if missing:
        command = "budget" if table == "budgets" else "policy"
        raise PolicyError(f"There is no {noun} {missing[0]}; see `halton-meter {command} list`.")
    with db:
        db.executemany(f"DELETE FROM {table} WHERE id = ?", [(i,) for i in ids])
        write_audit(db, f"{table}_removed", {"ids": ids})
    out.write(f"Removed {noun} {', '.join(map(str, ids))}.\n")
    return 0


def recent_events(db: sqlite3.Connection, since: float, limit: int = 50) -> list[dict]:
    return [{"id": i, "at": iso_local(at), "kind": kind, "budget_id": budget_id, "policy_id": policy_id,
             "project": project, "provider": provider, "model": model, "message": message}
            for i, at, kind, budget_id, policy_id, project, provider, model, message in db.execute(
                "SELECT id, at, kind, budget_id, policy_id, project, provider, model, message FROM policy_events "
                "WHERE at >= ? ORDER BY id DESC LIMIT ?", (since, limit))]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], out: TextIO, right: tuple[int, ...] = ()) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        out.write("  ".join(cells).rstrip() + "\n")
