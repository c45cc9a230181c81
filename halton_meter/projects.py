"""`halton-meter project list|rename|merge|set`: the projects calls are attributed to.

Renaming or merging rewrites the recorded calls and leaves the old name as an alias, so calls
still arriving under it (a header, a repository name) are recorded under the new name: the
daemon's writer reads aliases and body-capture settings again whenever this file changes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import TextIO

from halton_meter.attribution import check_project
from halton_meter.ledger import write_audit
from halton_meter.report import format_usd, usd_string


class ProjectError(ValueError):
    """A project command that cannot be done; the message says why and what to do instead."""


def list_projects(db: sqlite3.Connection, *, as_json: bool, out: TextIO) -> int:
    """Every project: calls and cost (all time), last call, body capture, how calls got there."""
    spend = {name: (calls, cost or 0, unpriced, last) for name, calls, cost, unpriced, last in db.execute(
        "SELECT COALESCE(project, 'default'), COUNT(*), SUM(cost_nanousd), COUNT(unpriced_reason), "
        "MAX(started_at) FROM calls GROUP BY 1")}
    sources = attribution_sources(db)
    aliases: dict[str, list[str]] = {}
    for alias, project in db.execute("SELECT alias, project FROM project_aliases ORDER BY alias"):
        aliases.setdefault(project, []).append(alias)
    projects = []
    for name, created_at, body_capture in db.execute("SELECT name, created_at, body_capture FROM projects"):
        calls, cost, unpriced, last = spend.get(name, (0, 0, 0, None))
        projects.append({
            "project": name, "calls": calls, "cost_nanousd": cost, "cost_usd": usd_string(cost),
            "unpriced_calls": unpriced, "created_at": created_at, "last_call_at": last,
            "body_capture": None if body_capture is None else bool(body_capture),
            "sources": sources.get(name, {}), "aliases": aliases.get(name, []),
        })
    projects.sort(key=lambda p: (-p["cost_nanousd"], -p["calls"], p["project"]))
    if as_json:
        out.write(json.dumps({"projects": projects}, indent=2) + "\n")
        return 0
    if not projects:
        out.write("No projects yet: every call is attributed to one (`default` when nothing names it).\n")
        return 0
    header = ("project", "calls", "cost", "last call", "bodies", "attributed by")
    rows = [(p["project"] + (f" (was {', '.join(p['aliases'])})" if p["aliases"] else ""),
             f"{p['calls']:,}", format_usd(p["cost_nanousd"]) + ("*" if p["unpriced_calls"] else ""),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(p["last_call_at"])) if p["last_call_at"] else "-",
             {None: "default", True: "on", False: "off"}[p["body_capture"]],
             ", ".join(f"{source} {n:,}" for source, n in sorted(p["sources"].items(), key=lambda i: -i[1])) or "-")
            for p in projects]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [str(cell).rjust(w) if i in (1, 2) else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        out.write("  ".join(cells).rstrip() + "\n")
    if any(p["unpriced_calls"] for p in projects):
        out.write("* some calls are unpriced; `halton-meter report` says which models.\n")
    return 0


def attribution_sources(db: sqlite3.Connection, since: float = 0.0,
                        until: float = float("inf")) -> dict[str, dict[str, int]]:
    """project -> {how its calls were attributed: count} for calls started in [since, until)."""
    sources: dict[str, dict[str, int]] = {}
    for name, source, count in db.execute(
            "SELECT COALESCE(project, 'default'), COALESCE(project_source, 'unknown'), COUNT(*) FROM calls "
            "WHERE started_at >= ? AND started_at < ? GROUP BY 1, 2", (since, until)):
        sources.setdefault(name, {})[source] = count
    return sources


def rename(db: sqlite3.Connection, old: str, new: str, *, out: TextIO) -> int:
    """Give OLD's calls and settings the name NEW (which must not exist yet)."""
    check_project(new)
    with _transaction(db):
        _require(db, old)
        if _exists(db, new):
            raise ProjectError(f"Project {new!r} already exists. To combine the two, run "
                               f"`halton-meter project merge {old} {new}`.")
        db.execute("UPDATE projects SET name = ? WHERE name = ?", (new, old))
        moved = _move_calls(db, old, new)
        _move_policies(db, old, new)
        _alias(db, old, new)
        write_audit(db, "project_renamed", {"from": old, "to": new, "calls": moved})
    out.write(f"Renamed project {old} to {new} ({moved:,} call(s)). Calls still arriving as {old} "
              f"are recorded as {new}.\n")
    return 0


def _move_policies(db: sqlite3.Connection, old: str, new: str) -> None:
    """Budgets and model rules follow the project (budgets.py); where both had one of the same
    scope and period (a merge), the target's stays, as its other settings do."""
    for table in ("budgets", "model_policies"):
        db.execute(f"UPDATE OR IGNORE {table} SET project = ? WHERE project = ?", (new, old))
        db.execute(f"DELETE FROM {table} WHERE project = ?", (old,))


def merge(db: sqlite3.Connection, source: str, target: str, *, out: TextIO) -> int:
    """Fold SOURCE into TARGET: its calls move, its name becomes an alias, TARGET's settings stay."""
    check_project(target)
    with _transaction(db):
        target = _resolved(db, target)  # an old name: merge into what it became
        if source == target:
            raise ProjectError("A project cannot be merged into itself. Name two different projects.")
        _require(db, source)
        if not _exists(db, target):
            db.execute("INSERT INTO projects (name, created_at, body_capture) "
                       "SELECT ?, created_at, body_capture FROM projects WHERE name = ?", (target, source))
        db.execute("DELETE FROM projects WHERE name = ?", (source,))
        moved = _move_calls(db, source, target)
        _move_policies(db, source, target)
        _alias(db, source, target)
        write_audit(db, "project_merged", {"from": source, "into": target, "calls": moved})
    out.write(f"Merged project {source} into {target} ({moved:,} call(s) moved). Calls still arriving "
              f"as {source} are recorded as {target}.\n")
    return 0


def set_body_capture(db: sqlite3.Connection, project: str, value: str, *, out: TextIO) -> int:
    """`project set NAME body-capture on|off|default`; an unseen project is created, so the
    setting holds from its first call."""
    check_project(project)
    setting = {"on": 1, "off": 0, "default": None}[value]
    with _transaction(db):
        project = _resolved(db, project)
        db.execute("INSERT OR IGNORE INTO projects (name, created_at) VALUES (?, ?)", (project, time.time()))
        db.execute("UPDATE projects SET body_capture = ? WHERE name = ?", (setting, project))
        write_audit(db, "project_body_capture", {"project": project, "body_capture": value})
    meaning = {"on": "stored (redacted)", "off": "not stored",
               "default": "stored as [bodies] enabled says"}[value]
    out.write(f"Bodies of {project}'s calls are now {meaning}; a running daemon follows within a second.\n")
    return 0


# --- helpers ---------------------------------------------------------------------------------


class _transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error): the writer waits, nothing interleaves."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _exists(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone() is not None


def _resolved(db: sqlite3.Connection, name: str) -> str:
    row = db.execute("SELECT project FROM project_aliases WHERE alias = ?", (name,)).fetchone()
    return row[0] if row else name


def _require(db: sqlite3.Connection, name: str) -> None:
    if _exists(db, name):
        return
    target = _resolved(db, name)
    hint = (f"It was renamed or merged into {target!r}." if target != name
            else "`halton-meter project list` shows the projects there are.")
    raise ProjectError(f"There is no project {name!r}. {hint}")


def _move_calls(db: sqlite3.Connection, old: str, new: str) -> int:
    if old == "default":
        return db.execute("UPDATE calls SET project = ? WHERE project IS NULL OR project = 'default'",
                          (new,)).rowcount
    return db.execute("UPDATE calls SET project = ? WHERE project = ?", (new, old)).rowcount


def _alias(db: sqlite3.Connection, old: str, new: str) -> None:
    """`old` now means `new`; aliases of `old` follow, and `new` stops being an alias itself."""
    db.execute("DELETE FROM project_aliases WHERE alias = ?", (new,))
    db.execute("UPDATE project_aliases SET project = ? WHERE project = ?", (new, old))
    db.execute("INSERT OR REPLACE INTO project_aliases (alias, project) VALUES (?, ?)", (old, new))
