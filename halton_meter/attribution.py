"""Which project a client connection belongs to, found from the process that opened it.

Linux reads /proc (socket -> inode -> pid -> environment, cwd, names); other systems ask lsof and ps.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from halton_meter.config import ConfigError

log = logging.getLogger(__name__)

PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_VAR = "HALTON_PROJECT"
DEFAULT_TIMEOUT_S = 0.5
MAX_ANCESTORS = 64  # a bound on the parent walk, in case /proc changes under us and loops
RECENT_OWNERS = 32  # pids that owned matched sockets, scanned first: clients reconnect

Endpoint = tuple[str, int]  # (normalised ip text, port)


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str  # "cwd" | "process"
    match: str  # an absolute, resolved path for cwd rules; a lowercased name for process rules
    project: str


@dataclass(frozen=True, slots=True)
class Attribution:
    project: str
    source: str  # "process_env" | "git_repo" | "rule_cwd" | "rule_process"
    pid: int | None = None


class ProcessAttributor:
    """Maps a loopback connection to its client process, then to a project (see `lookup`)."""

    def __init__(self, rules: tuple[Rule, ...] = (), *, enabled: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S, proc_root: Path = Path("/proc"),
                 platform: str = sys.platform) -> None:
        self.rules = tuple(rules)
        self.enabled = enabled
        self.timeout_s = timeout_s
        self._processes = _ProcFs(proc_root) if platform.startswith("linux") else _LsofPs()

    def lookup(self, client: tuple[str, int], server: tuple[str, int]) -> Attribution | None:
        """Blocking; for a worker thread. Never raises: any failure or a passed deadline is None.

        Precedence: HALTON_PROJECT of the process or its nearest ancestor, then the git
        repository holding its cwd, then the rules in config order.
        """
        if not self.enabled:
            return None
        deadline = _Deadline(self.timeout_s)
        try:
            pid = self._processes.owner_pid(_endpoint(client), _endpoint(server), deadline)
            if pid is None:
                log.debug("attribution_none client=%r reason=no_owner", client)
                return None
            found = self._attribute(pid, deadline)
            deadline.check()  # an answer found late is dropped: the caller has stopped waiting
            log.debug("attribution client=%r pid=%d source=%s", client, pid,
                      found.source if found else "none")
            return found
        except _DeadlinePassed:
            log.debug("attribution_timeout client=%r timeout_s=%s", client, self.timeout_s)
        except Exception as exc:  # metering must never break a connection
            log.debug("attribution_failed client=%r error=%r", client, exc)
        return None

    def _attribute(self, pid: int, deadline: _Deadline) -> Attribution | None:
        processes = self._processes
        chain = processes.chain(pid, deadline)
        for value in processes.env_values(chain, deadline):
            project = slugify_project(value)
            if project:  # an empty or unusable value counts as unset: the parent may still say
                return Attribution(project, "process_env", pid)
        cwd = processes.cwd(pid, deadline)
        repo = _git_repo_name(cwd) if cwd else None
        if repo:
            return Attribution(repo, "git_repo", pid)
        names: set[str] | None = None
        for rule in self.rules:
            if rule.kind == "cwd":
                if cwd and _is_within(cwd, rule.match):
                    return Attribution(rule.project, "rule_cwd", pid)
                continue
            if names is None:
                names = processes.names(chain, deadline)
            if rule.match in names:
                return Attribution(rule.project, "rule_process", pid)
        return None


class ProjectNameError(ValueError):
    """A project name that cannot be stored or travel in a proxy URL unchanged."""


def check_project(name: str) -> str:
    """`name` if it is a valid project name, else ProjectNameError saying what is allowed."""
    if not is_project_name(name):
        raise ProjectNameError(
            f"Project name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (for example my-app).")
    return name


def is_project_name(text: object) -> bool:
    return isinstance(text, str) and PROJECT_NAME.fullmatch(text) is not None


def slugify_project(text: str) -> str | None:
    """A usable project name from free text (an env value, a directory name), or None."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip())
    slug = re.sub(r"^[^A-Za-z0-9]+", "", slug)[:64]
    return slug or None


def parse_rules(table: object, *, where: str = "config.toml") -> tuple[Rule, ...]:
    """`[[attribution.rules]]` entries -> Rules; raises ConfigError naming the bad entry."""
    if table is None:
        return ()
    if not isinstance(table, list):
        raise ConfigError(f"{where}: attribution.rules must be a list of tables. "
                          "Write each rule as its own [[attribution.rules]] block.")
    return tuple(_parse_rule(entry, f"{where}: attribution rule {number}")
                 for number, entry in enumerate(table, 1))


def _parse_rule(entry: object, label: str) -> Rule:
    if not isinstance(entry, dict):
        raise ConfigError(f"{label} is not a table. Write it as an [[attribution.rules]] block "
                          'with cwd = "PATH" or process = "NAME", and project = "NAME".')
    unknown = sorted(set(entry) - {"cwd", "process", "project"})
    if unknown:
        raise ConfigError(f"{label} has unknown key(s) {', '.join(unknown)}. "
                          "Use only cwd or process, and project.")
    kinds = [kind for kind in ("cwd", "process") if kind in entry]
    if len(kinds) != 1:
        raise ConfigError(f"{label} has {'both cwd and process' if kinds else 'neither cwd nor process'}. "
                          'Give it exactly one of cwd = "PATH" or process = "NAME" (one rule per match).')
    if "project" not in entry:
        raise ConfigError(f'{label} has no project. Add project = "NAME" to it.')
    project = entry["project"]
    if not is_project_name(project):
        raise ConfigError(f"{label} has an invalid project {project!r}. Use 1-64 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit.")
    kind, value = kinds[0], entry[kinds[0]]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f'{label} has an empty or non-text {kind}. Write it as {kind} = "...".')
    if kind == "process":
        name = value.strip().lower()
        if "/" in name:
            raise ConfigError(f"{label} has a path as process ({value!r}). "
                              "Give the program name only, like process = \"node\".")
        return Rule("process", name, project)
    try:
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"{label} has a relative cwd ({value!r}). "
                              "Use an absolute path or one starting with ~.")
        return Rule("cwd", str(path.resolve()), project)
    except (RuntimeError, OSError) as exc:  # ~unknownuser, a symlink loop
        raise ConfigError(f"{label} has a cwd that cannot be resolved ({exc}). "
                          "Use an existing absolute path or one starting with ~.") from exc


# --- Linux: /proc ---------------------------------------------------------------------------

class _Proc(NamedTuple):
    pid: int
    comm: str  # the kernel's name for it: the executable's basename, cut to 15 chars


class _ProcFs:
    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._netlink = self.root == "/proc"  # sock_diag answers about this system's sockets only
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()  # lookups run in several worker threads at once

    def owner_pid(self, client: Endpoint, server: Endpoint, deadline: _Deadline) -> int | None:
        inode = 0
        if self._netlink:
            try:
                inode = sock_diag_inode(client, server)
            except TimeoutError:
                pass  # a slow answer this once: read the tables
            except OSError as exc:  # no netlink here (a sandbox, an old kernel): read the tables
                log.debug("sock_diag_unavailable error=%r", exc)
                self._netlink = False
        # An IPv4 client using an AF_INET6 socket is listed in tcp6, as ::ffff:a.b.c.d.
        for table in () if inode else ("tcp6",) if ":" in client[0] else ("tcp", "tcp6"):
            try:
                # Line by line, stopping at the match: each read makes the kernel walk its whole
                # connection hash table (~2 ms here), so the rest of the file is not read.
                with open(f"{self.root}/net/{table}", encoding="ascii", errors="replace") as lines:
                    inode = find_socket_inode(lines, client, server, tcp6=table == "tcp6")
            except OSError:
                continue
            if inode:
                break
        if not inode:
            return None
        target = f"socket:[{inode}]"
        own = os.getpid()
        with self._lock:
            recent = [pid for pid in reversed(self._recent) if pid != own]
        try:
            listing = os.listdir(self.root)
        except OSError:
            listing = []
        # Newest first: a client that has just connected is usually a young process (curl, a
        # script); long-lived daemons sit at low pids.
        others = sorted((int(name) for name in listing if name.isdigit()), reverse=True)
        seen = set(recent)
        for pid in recent + [pid for pid in others if pid not in seen and pid != own]:
            deadline.check()
            if self._holds(pid, target, deadline):
                with self._lock:
                    self._recent[pid] = None
                    self._recent.move_to_end(pid)
                    while len(self._recent) > RECENT_OWNERS:
                        self._recent.popitem(last=False)
                return pid
        return None

    def _holds(self, pid: int, target: str, deadline: _Deadline) -> bool:
        try:
            with os.scandir(f"{self.root}/{pid}/fd") as entries:
                for count, entry in enumerate(entries):
                    if count % 256 == 255:  # a process with 100k descriptors must not blow the deadline
                        deadline.check()
                    try:
                        if os.readlink(entry.path) == target:
                            return True
                    except OSError:  # closed meanwhile
                        continue
        except OSError:  # another user's process, or it exited: normal, skip it
            pass
        return False

    def chain(self, pid: int, deadline: _Deadline) -> list[_Proc]:
        chain: list[_Proc] = []
        while pid > 0 and len(chain) < MAX_ANCESTORS and all(pid != p.pid for p in chain):
            deadline.check()
            stat = _read_bytes(f"{self.root}/{pid}/stat")
            if stat is None:
                break
            comm, ppid = parse_stat(stat.decode("utf-8", "replace"))
            chain.append(_Proc(pid, comm))
            pid = ppid
        return chain or [_Proc(pid, "")]

    def env_values(self, chain: list[_Proc], deadline: _Deadline) -> Iterator[str]:
        for proc in chain:
            deadline.check()
            data = _read_bytes(f"{self.root}/{proc.pid}/environ")
            value = parse_environ(data, ENV_VAR) if data else None
            if value is not None:
                yield value

    def cwd(self, pid: int, deadline: _Deadline) -> str | None:
        deadline.check()
        path = _readlink(f"{self.root}/{pid}/cwd")
        return path if path and not path.endswith(" (deleted)") else None

    def names(self, chain: list[_Proc], deadline: _Deadline) -> set[str]:
        # comm (the same text as /proc/PID/comm) is cut to 15 chars; the executable and argv[0]
        # carry the full name, and argv[0] the name a symlink (python3 -> python3.11) was run by.
        names = set()
        for proc in chain:
            deadline.check()
            exe = _readlink(f"{self.root}/{proc.pid}/exe") or ""
            argv = _read_bytes(f"{self.root}/{proc.pid}/cmdline") or b""
            argv0 = argv.split(b"\0", 1)[0].decode("utf-8", "replace")
            names.update((proc.comm, exe.removesuffix(" (deleted)"), argv0))
        return _basenames(names)


# --- macOS and other systems: lsof and ps ----------------------------------------------------

class _LsofPs:
    def owner_pid(self, client: Endpoint, server: Endpoint, deadline: _Deadline) -> int | None:
        host = f"[{server[0]}]" if ":" in server[0] else server[0]
        text = _run(["lsof", "-nP", f"-iTCP@{host}:{server[1]}", "-sTCP:ESTABLISHED", "-Fpn"],
                    deadline)
        own = os.getpid()
        return next((pid for pid, local, remote in parse_lsof_connections(text or "")
                     if local == client and remote == server and pid != own), None)

    def chain(self, pid: int, deadline: _Deadline) -> list[_Proc]:
        table = parse_ps_table(_run(["ps", "-A", "-o", "pid=,ppid=,comm="], deadline) or "")
        chain: list[_Proc] = []
        while pid in table and len(chain) < MAX_ANCESTORS and all(pid != p.pid for p in chain):
            ppid, comm = table[pid]
            chain.append(_Proc(pid, comm))
            pid = ppid
        return chain or [_Proc(pid, "")]

    def env_values(self, chain: list[_Proc], deadline: _Deadline) -> Iterator[str]:
        pids = ",".join(str(proc.pid) for proc in chain)
        found = parse_ps_environment(_run(["ps", "eww", "-o", "pid=,command=", "-p", pids],
                                          deadline) or "", ENV_VAR)
        return (found[proc.pid] for proc in chain if proc.pid in found)

    def cwd(self, pid: int, deadline: _Deadline) -> str | None:
        return parse_lsof_name(_run(["lsof", "-nP", "-a", "-p", str(pid), "-d", "cwd", "-Fn"],
                                    deadline) or "")

    def names(self, chain: list[_Proc], deadline: _Deadline) -> set[str]:
        return _basenames(proc.comm for proc in chain)  # ps may give comm as a full path


def _run(args: list[str], deadline: _Deadline) -> str | None:
    """A tool's stdout, whatever its exit status (lsof exits 1 when nothing matched); None if absent."""
    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=deadline.remaining(),
                              env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise _DeadlinePassed from None
    except OSError as exc:
        log.debug("attribution_tool_failed tool=%s error=%r", args[0], exc)
        return None
    return done.stdout.decode("utf-8", "replace")


def sock_diag_inode(client: Endpoint, server: Endpoint) -> int:
    """The inode of the TCP socket from client to server, asked of the kernel by netlink
    sock_diag (linux/inet_diag.h): one exact lookup in ~20 µs, where reading /proc/net/tcp walks
    every connection, TIME_WAIT ones included. 0 if there is none; OSError if netlink is not
    available."""
    client_ip, server_ip = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    if client_ip.version == 4:
        # An IPv4 client may hold an AF_INET socket, or an AF_INET6 one with mapped addresses.
        attempts = [(socket.AF_INET, client_ip, server_ip),
                    (socket.AF_INET6, _mapped(client_ip), _mapped(server_ip))]
    else:
        attempts = [(socket.AF_INET6, client_ip, server_ip)]
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as channel:
        channel.settimeout(0.2)
        for family, local, remote in attempts:
            # struct inet_diag_req_v2, then inet_diag_sockid: ports and addresses in network
            # order, any interface, no cookie.
            sockid = (struct.pack("!HH", client[1], server[1]) + local.packed.ljust(16, b"\0")
                      + remote.packed.ljust(16, b"\0") + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))
            request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _ALL_TCP_STATES) + sockid
            channel.send(struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
                         + request)
            reply = channel.recv(8192)
            if len(reply) >= 88 and struct.unpack_from("=H", reply, 4)[0] == _SOCK_DIAG_BY_FAMILY:
                # nlmsghdr (16) + inet_diag_msg: family, state, timer, retrans (4), sockid (48),
                # expires, rqueue, wqueue, uid (16), then the inode.
                inode = struct.unpack_from("=I", reply, 84)[0]
                if inode:
                    return inode
    return 0


def _mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NO_COOKIE = 0xFFFFFFFF
_ALL_TCP_STATES = 0xFFF


# --- pure parsers ----------------------------------------------------------------------------

def find_socket_inode(lines: Iterable[str], client: Endpoint, server: Endpoint, *, tcp6: bool,
                      byteorder: str = sys.byteorder) -> int:
    """The inode of the socket from client to server in `/proc/net/tcp` (or `tcp6`) lines; 0 if none.

    Addresses are compared as the kernel prints them (cheaper than decoding every line): each
    32-bit word in host byte order, in tcp6 an IPv4 address as ::ffff:a.b.c.d; the port in hex.
    """
    local, remote = _proc_address(client, tcp6, byteorder), _proc_address(server, tcp6, byteorder)
    if local is None or remote is None:
        return 0
    for line in lines:
        fields = line.split(None, 10)
        if len(fields) > 9 and fields[1] == local and fields[2] == remote:
            inode = int(fields[9]) if fields[9].isdigit() else 0
            if inode:  # 0: no process holds it (TIME_WAIT, which loopback may reuse, or an orphan)
                return inode
    return 0


def parse_stat(text: str) -> tuple[str, int]:
    """`/proc/PID/stat` -> (comm, ppid). comm may hold spaces and ')': it ends at the LAST ')'."""
    close = text.rindex(")")
    return text[text.index("(") + 1:close], int(text[close + 1:].split()[1])


def parse_environ(data: bytes, name: str) -> str | None:
    prefix = name.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode("utf-8", "replace")
    return None


def parse_lsof_connections(text: str) -> list[tuple[int, Endpoint, Endpoint]]:
    """`lsof -F pn` output -> [(pid, local, remote)] for each connected socket."""
    found: list[tuple[int, Endpoint, Endpoint]] = []
    pid = None
    for line in text.splitlines():
        tag, value = line[:1], line[1:]
        try:
            if tag == "p":
                pid = int(value)
            elif tag == "n" and pid is not None and "->" in value:
                local, _, remote = value.partition("->")
                found.append((pid, _text_endpoint(local), _text_endpoint(remote)))
        except ValueError:
            continue
    return found


def parse_lsof_name(text: str) -> str | None:
    """The first name field of `lsof -F n` output (with `-d cwd`: the directory)."""
    return next((line[1:] for line in text.splitlines() if line.startswith("n") and line[1:]), None)


def parse_ps_table(text: str) -> dict[int, tuple[int, str]]:
    """`ps -o pid=,ppid=,comm=` -> {pid: (ppid, comm)}; comm is last, so it may hold spaces."""
    table = {}
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = (int(parts[1]), parts[2].strip() if len(parts) > 2 else "")
    return table


def parse_ps_environment(text: str, name: str) -> dict[int, str]:
    """`ps eww -o pid=,command=` -> {pid: value of `name`}.

    ps appends the environment after the arguments, so the last `NAME=` token is taken: an
    earlier one is more likely an argument. Values holding spaces are cut at the first one.
    """
    pattern = re.compile(rf"(?:^|\s){re.escape(name)}=(\S*)")
    found = {}
    for line in text.splitlines():
        pid, _, command = line.strip().partition(" ")
        values = pattern.findall(command)
        if pid.isdigit() and values:
            found[int(pid)] = values[-1]
    return found


# --- helpers ---------------------------------------------------------------------------------

class _DeadlinePassed(Exception):
    pass


class _Deadline:
    __slots__ = ("at",)

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed
        return left

    def check(self) -> None:
        self.remaining()


def _endpoint(address: tuple) -> Endpoint:
    """(ip, port[, flow, scope]) -> (canonical ip, port); `::ffff:a.b.c.d` becomes `a.b.c.d`."""
    ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(address[1])


def _proc_address(endpoint: Endpoint, tcp6: bool, byteorder: str) -> str | None:
    ip = ipaddress.ip_address(endpoint[0])
    if tcp6 and isinstance(ip, ipaddress.IPv4Address):
        ip = _mapped(ip)
    elif not tcp6 and isinstance(ip, ipaddress.IPv6Address):
        return None
    raw = ip.packed
    if byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{raw.hex().upper()}:{endpoint[1]:04X}"


def _text_endpoint(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return _endpoint((host.strip("[]"), int(port)))


def _git_repo_name(cwd: str) -> str | None:
    """The name of the nearest directory at or above cwd holding `.git` (a directory, or a file
    in worktrees and submodules)."""
    directory = cwd
    while not os.path.exists(os.path.join(directory, ".git")):
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent
    if _is_home(directory):
        return None  # a dotfiles repository would swallow every project under the home directory
    return slugify_project(os.path.basename(directory))


def _is_home(directory: str) -> bool:
    return (directory in ("/", "/root", os.path.expanduser("~"))
            or os.path.dirname(directory) in ("/home", "/Users"))


def _is_within(path: str, root: str) -> bool:
    """Path-component prefix: /a/b holds /a/b/c but not /a/bc."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _basenames(paths: Iterable[str]) -> set[str]:
    # a login shell's argv[0] is "-zsh"
    return {name for path in paths if (name := os.path.basename(path).lstrip("-").lower())}


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
