"""What outlives a ledger that cannot be written or a daemon that died: the spool of unwritten
items (JSON lines under <home>/spool/), the daemon's heartbeat file, and the edge's notes of the
provider connections it tunnelled unmetered while the daemon was away.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".jsonl"
# Past this size the edge stops noting unmetered connections (about 80,000); its log still has each.
MAX_GAP_NOTES_BYTES = 1 << 20


def spool_dir(db_path: Path) -> Path:
    return db_path.parent / "spool"


def encode(item: object, **extra: object) -> str:
    """One spool line for a queued ledger item: a halton_meter dataclass whose fields are JSON.

    `extra` carries what the writer already worked out for it (the rates applied, the stored
    body), so a replay records the call exactly as it would have been. TypeError or ValueError
    if the item cannot be written down."""
    kind = type(item)
    if not dataclasses.is_dataclass(item) or not kind.__module__.startswith("halton_meter."):
        raise TypeError(f"{kind.__name__} is not a ledger item")
    values = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    return json.dumps({"type": f"{kind.__module__}:{kind.__qualname__}", "fields": values, **extra},
                      separators=(",", ":"), allow_nan=False)


def decode(line: str) -> tuple[object, dict]:
    """The item a spool line holds and its extras; ValueError if the line is not one."""
    try:
        entry = json.loads(line)
        module, _, name = entry.pop("type").partition(":")
        if not module.startswith("halton_meter."):
            raise ValueError(f"{module} is not a halton_meter module")
        kind = getattr(importlib.import_module(module), name)
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            raise ValueError(f"{name} is not a ledger item")
        return kind(**entry.pop("fields")), entry
    except (KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ValueError(f"not a spooled item ({exc!r})") from exc


def write_spool(directory: Path, lines: list[str]) -> Path:
    """Write `lines` durably as a new spool file (0600, fsynced, renamed into place, directory
    fsynced); OSError if the disk refuses, with nothing left behind."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{time.time_ns():020d}-{os.getpid()}{SPOOL_SUFFIX}"
    partial = path.with_name(path.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w", encoding="utf-8") as out:
            for line in lines:
                out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, path)
        _fsync_directory(directory)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def spool_files(directory: Path) -> list[Path]:
    """Complete spool files, oldest first (a `.partial` one was never renamed: nothing in it was
    counted as spooled)."""
    try:
        return sorted(directory.glob("*" + SPOOL_SUFFIX))
    except OSError:
        return []


def spooled_items(directory: Path) -> tuple[int, int]:
    """(files, items) waiting in the spool, for `status`."""
    files = spool_files(directory)
    items = 0
    for path in files:
        try:
            with open(path, "rb") as spooled:  # one line per item; files can be tens of MB
                items += sum(block.count(b"\n") for block in iter(lambda: spooled.read(1 << 20), b""))
        except OSError:
            continue
    return len(files), items


def read_spool(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Backlog:
    """The items the ledger's writer holds, oldest first: taken off its queue and not yet settled
    (committed, or counted lost), because the database refused them or a spool file gave them back.

    Each item keeps what the writer already worked out for it (`extras`: the rates applied, the
    stored body), and each item read from a spool file remembers it: the file is deleted once all
    its items are settled, so nothing in it is written twice (a crash in between replays the file
    again; the writer skips the rows already present).
    """

    def __init__(self, directory: Path, is_row: Callable[[object], bool]) -> None:
        self.directory = directory
        self.is_row = is_row
        self.rows = 0  # rows among the items held, including those taken for a write in progress
        self._rows_from_spool = 0  # of which read from a spool file
        self.body_bytes = 0  # text of the bodies kept in `extras`
        self._items: deque = deque()
        self._extras: dict[int, dict] = {}  # id(item) -> {"rates": ..., "body": ...}
        self._origin: dict[int, Path] = {}  # id(item) -> the spool file it was read from
        self._unsettled: dict[Path, int] = {}  # spool file read -> its items not settled yet

    def __len__(self) -> int:
        """Items waiting to be taken (not those taken for a write in progress)."""
        return len(self._items)

    def append(self, item: object) -> None:
        self._items.append(item)
        self.rows += self.is_row(item)

    def take(self, count: int) -> list:
        """The oldest `count` items, for one write; they stay held until settled or put back."""
        return [self._items.popleft() for _ in range(min(count, len(self._items)))]

    def put_back(self, items: list) -> None:
        """Taken items that were not written after all: back at the head, in order."""
        self._items.extendleft(reversed(items))

    def push_front(self, item: object) -> None:
        """A new item that must go before everything held (an audit event about the outage)."""
        self._items.appendleft(item)
        self.rows += self.is_row(item)

    def held(self) -> list:
        """Every item waiting, oldest first."""
        return list(self._items)

    def extras(self, item: object) -> dict | None:
        return self._extras.get(id(item))

    def keep_extras(self, item: object, extras: dict) -> None:
        self._extras[id(item)] = extras
        self.body_bytes += _text_size(extras.get("body"))

    def from_spool(self, item: object) -> bool:
        return id(item) in self._origin

    def settle(self, items: list) -> None:
        """Forget `items` (written, found already written, or counted lost); a spool file whose
        items are all settled is deleted."""
        for item in items:
            origin = self._forget(item)
            if origin is not None:
                self._unsettled[origin] -= 1
                if not self._unsettled[origin]:
                    del self._unsettled[origin]
                    _unlink_quietly(origin)

    def spool(self) -> tuple[Path | None, int, list]:
        """Write the waiting items that exist only in memory to a new spool file and let them go
        (items read from a spool file are safe in it already, and stay). Returns the file (None:
        nothing to write), the rows in it, and the items that cannot be written down (let go
        too; the caller counts them). OSError if the disk refuses; then nothing is let go."""
        lines, unwritable = [], []
        for item in self._items:
            if id(item) in self._origin:
                continue
            try:
                lines.append(encode(item, **(self._extras.get(id(item)) or {})))
            except (TypeError, ValueError):
                unwritable.append(item)
        path = write_spool(self.directory, lines) if lines else None
        rows, _ = self.let_go()
        return path, rows - sum(self.is_row(item) for item in unwritable), unwritable

    def let_go(self) -> tuple[int, int]:
        """Let go of the waiting items that exist only in memory (after they were spooled, or
        when the spool failed too); returns how many were rows and how many other items (audit
        and policy events). Items read from a spool file stay, as does their file."""
        rows = others = 0
        kept: deque = deque()
        for item in self._items:
            if id(item) in self._origin:
                kept.append(item)
                continue
            self._forget(item)
            if self.is_row(item):
                rows += 1
            else:
                others += 1
        self._items = kept
        return rows, others

    def load(self, limit: int) -> tuple[int, int, bool]:
        """Hold the items of spool files not held yet, oldest file first, until `limit` rows are
        held. Returns the rows read, the lines that could not be read (logged here; the caller
        counts them lost), and whether files were left for later."""
        rows = unreadable = 0
        for path in spool_files(self.directory):
            if path in self._unsettled:
                continue
            if self.rows >= limit:
                return rows, unreadable, True
            try:
                lines = read_spool(path)
            except (OSError, UnicodeDecodeError) as exc:
                log.error("spool_unreadable file=%s error=%r action=kept_for_next_start", path, exc)
                continue
            entries = []
            for number, line in enumerate(lines, 1):
                try:
                    entries.append(decode(line))
                except ValueError as exc:
                    log.error("spool_line_unreadable file=%s line=%d error=%s", path, number, exc)
                    unreadable += 1
            if not entries:
                _unlink_quietly(path)
                continue
            self._unsettled[path] = len(entries)
            for item, extras in entries:
                self._origin[id(item)] = path
                if extras:
                    self.keep_extras(item, extras)
                self.append(item)
                rows += self.is_row(item)
                self._rows_from_spool += self.is_row(item)
        return rows, unreadable, False

    @property
    def rows_only_here(self) -> int:
        """Held rows that no spool file has: the ones memory is bounded for, and a crash would cost."""
        return self.rows - self._rows_from_spool

    def _forget(self, item: object) -> Path | None:
        self.rows -= self.is_row(item)
        self.body_bytes -= _text_size((self._extras.pop(id(item), None) or {}).get("body"))
        origin = self._origin.pop(id(item), None)
        if origin is not None:
            self._rows_from_spool -= self.is_row(item)
        return origin


def _text_size(values: object) -> int:
    """About how much memory a stored-body row holds: the length of its text columns."""
    if not values:
        return 0
    return sum(len(value) for value in values if isinstance(value, str))


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # a read-only disk: replayed again next start, duplicates skipped
        log.warning("spool_not_deleted file=%s error=%r", path, exc)


# -- the daemon's heartbeat and the edge's gap notes ------------------------------------------

def heartbeat_path(run_dir: Path) -> Path:
    return run_dir / "daemon.alive"


def gap_notes_path(run_dir: Path) -> Path:
    return run_dir / "metering_gaps"


def beat(path: Path) -> None:
    """Refresh the heartbeat's mtime: a sign of life that costs no database write."""
    try:
        path.touch()
    except OSError:
        pass  # a read-only or full disk: the database's own times stand in for it


def last_beat(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def note_metering_gap(path: Path, now: float) -> None:
    """Append the time of one provider connection that went straight through, unmetered."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return  # the gap is still in the edge's log
    try:
        if os.fstat(fd).st_size < MAX_GAP_NOTES_BYTES:
            os.write(fd, f"{now:.3f}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def take_gap_notes(path: Path) -> list[float]:
    """The times the edge noted since the last call; its next note starts a new file. (A note
    being appended at the very instant of the rename may be missed; the edge's log has it.)"""
    taken = path.with_name(path.name + ".taken")
    try:
        os.rename(path, taken)
    except OSError:
        return []
    try:
        text = taken.read_text(encoding="ascii", errors="replace")
        taken.unlink()
    except OSError:
        return []
    times = []
    for line in text.split():
        try:
            times.append(float(line))
        except ValueError:
            continue
    return times
