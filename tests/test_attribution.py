"""Process attribution against real client processes on real loopback sockets, the pure parsers
on recorded text, and the lsof/ps path against scripted stand-ins for those tools."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from halton_meter.attribution import (
    PROJECT_NAME,
    Attribution,
    ProcessAttributor,
    Rule,
    find_socket_inode,
    is_project_name,
    parse_environ,
    parse_lsof_connections,
    parse_lsof_name,
    parse_ps_environment,
    parse_ps_table,
    parse_rules,
    parse_stat,
    slugify_project,
)
from halton_meter.config import ConfigError

LINUX = sys.platform.startswith("linux") and Path("/proc/self/fd").is_dir()
needs_proc = pytest.mark.skipif(not LINUX, reason="reads /proc")
# Our own ancestors are the client's ancestors too: a HALTON_PROJECT set around the test run
# would (rightly) win over what these tests expect.
clean_chain = pytest.mark.skipif("HALTON_PROJECT" in os.environ,
                                 reason="HALTON_PROJECT is set for the test run itself")

# Connects to argv[1]:argv[2], says its pid, and holds the connection until stdin closes.
CLIENT = textwrap.dedent("""
    import os, socket, sys
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    print(os.getpid(), flush=True)
    sys.stdin.read()
""")
# Runs CLIENT as its child with HALTON_PROJECT removed from the child's environment.
PARENT = textwrap.dedent("""
    import os, subprocess, sys
    env = {k: v for k, v in os.environ.items() if k != "HALTON_PROJECT"}
    sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1]] + sys.argv[2:], env=env))
""")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HALTON_PROJECT"}
    env.update(extra)
    return env


@contextmanager
def client_process(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                   host: str = "127.0.0.1", connect_to: str | None = None):
    """A listener on `host`, a real process connected to it: yields (accepted socket, client pid, Popen)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(4)
    listener.settimeout(10)
    port = listener.getsockname()[1]
    process = subprocess.Popen(argv + [connect_to or host, str(port)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env=env or clean_env(), cwd=cwd, text=True)
    conn = None
    try:
        conn, _ = listener.accept()
        pid = int(process.stdout.readline())
        yield conn, pid, process
    finally:
        process.stdin.close()
        process.wait(10)
        process.stdout.close()
        if conn is not None:
            conn.close()
        listener.close()


def lookup(attributor: ProcessAttributor, conn: socket.socket) -> Attribution | None:
    return attributor.lookup(conn.getpeername(), conn.getsockname())


def python_client() -> list[str]:
    return [sys.executable, "-c", CLIENT]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A temp directory with no `.git` above it, so git_repo attribution only comes from the test."""
    for directory in (tmp_path, *tmp_path.parents):
        if (directory / ".git").exists():
            pytest.skip(f"{directory} holds .git; temp directories must be outside a repository")
    return tmp_path.resolve()


# --- real processes on real sockets ----------------------------------------------------------

@needs_proc
def test_env_var_on_the_client_process(workdir):
    with client_process(python_client(), env=clean_env(HALTON_PROJECT="alpha"), cwd=workdir) as (conn, pid, _):
        assert lookup(ProcessAttributor(), conn) == Attribution("alpha", "process_env", pid)


@needs_proc
def test_env_value_is_slugified(workdir):
    with client_process(python_client(), env=clean_env(HALTON_PROJECT="Team A/web app"), cwd=workdir) as (conn, pid, _):
        assert lookup(ProcessAttributor(), conn) == Attribution("Team-A-web-app", "process_env", pid)


@needs_proc
def test_env_var_only_on_the_parent(workdir):
    argv = [sys.executable, "-c", PARENT, CLIENT]
    with client_process(argv, env=clean_env(HALTON_PROJECT="alpha"), cwd=workdir) as (conn, pid, parent):
        assert b"HALTON_PROJECT=" not in Path(f"/proc/{pid}/environ").read_bytes()
        assert parse_stat(Path(f"/proc/{pid}/stat").read_text())[1] == parent.pid
        assert lookup(ProcessAttributor(), conn) == Attribution("alpha", "process_env", pid)


@needs_proc
@clean_chain
def test_git_repository_of_the_cwd(workdir):
    deep = workdir / "myrepo" / "src" / "pkg"
    deep.mkdir(parents=True)
    (workdir / "myrepo" / ".git").mkdir()
    with client_process(python_client(), cwd=deep) as (conn, pid, _):
        assert lookup(ProcessAttributor(), conn) == Attribution("myrepo", "git_repo", pid)


@needs_proc
@clean_chain
def test_git_file_as_in_a_worktree(workdir):
    tree = workdir / "feature-tree"
    (tree / "docs").mkdir(parents=True)
    (tree / ".git").write_text("gitdir: /elsewhere/.git/worktrees/feature-tree\n")
    with client_process(python_client(), cwd=tree / "docs") as (conn, pid, _):
        assert lookup(ProcessAttributor(), conn) == Attribution("feature-tree", "git_repo", pid)


@needs_proc
def test_env_wins_over_git_and_git_wins_over_rules(workdir):
    repo = workdir / "repo"
    (repo / ".git").mkdir(parents=True)
    rules = parse_rules([{"cwd": str(repo), "project": "by-rule"}])
    with client_process(python_client(), env=clean_env(HALTON_PROJECT="by-env"), cwd=repo) as (conn, pid, _):
        assert lookup(ProcessAttributor(rules), conn) == Attribution("by-env", "process_env", pid)
    if "HALTON_PROJECT" not in os.environ:
        with client_process(python_client(), cwd=repo) as (conn, pid, _):
            assert lookup(ProcessAttributor(rules), conn) == Attribution("repo", "git_repo", pid)


@needs_proc
@clean_chain
def test_cwd_rule_matches_whole_path_components(workdir):
    cwd = workdir / "work" / "client-a" / "sub"
    cwd.mkdir(parents=True)
    rules = parse_rules([
        {"cwd": str(workdir / "work" / "client"), "project": "wrong"},  # a string prefix only
        {"cwd": str(workdir / "work" / "client-a"), "project": "client-a"},
        {"cwd": str(workdir), "project": "too-late"},
    ])
    with client_process(python_client(), cwd=cwd) as (conn, pid, _):
        assert lookup(ProcessAttributor(rules), conn) == Attribution("client-a", "rule_cwd", pid)


@needs_proc
@clean_chain
def test_process_rule_on_the_client_by_its_comm(workdir):
    link = workdir / "hm-client-py"  # 12 chars: the kernel's comm holds it whole
    link.symlink_to(sys.executable)
    with client_process([str(link), "-c", CLIENT], cwd=workdir) as (conn, pid, _):
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "hm-client-py"
        rules = parse_rules([{"process": "nothing-like-it", "project": "no"},
                             {"process": "HM-Client-Py", "project": "gamma"}])
        assert lookup(ProcessAttributor(rules), conn) == Attribution("gamma", "rule_process", pid)


@needs_proc
@clean_chain
def test_process_rule_on_an_ancestor_with_a_name_longer_than_comm(workdir):
    link = workdir / "halton-long-parent-name"  # comm keeps 15 chars; argv[0] has it all
    link.symlink_to(sys.executable)
    with client_process([str(link), "-c", PARENT, CLIENT], cwd=workdir) as (conn, pid, parent):
        assert Path(f"/proc/{parent.pid}/comm").read_text().strip() == "halton-long-par"
        rules = parse_rules([{"process": "halton-long-parent-name", "project": "delta"}])
        assert lookup(ProcessAttributor(rules), conn) == Attribution("delta", "rule_process", pid)


@needs_proc
@clean_chain
def test_nothing_matches(workdir):
    rules = parse_rules([{"cwd": str(workdir / "elsewhere"), "project": "x"},
                         {"process": "no-such-program", "project": "y"}])
    with client_process(python_client(), cwd=workdir) as (conn, _, _):
        assert lookup(ProcessAttributor(rules), conn) is None


@needs_proc
def test_ipv6_loopback(workdir):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not available")
    with client_process(python_client(), env=clean_env(HALTON_PROJECT="six"), cwd=workdir,
                        host="::1") as (conn, pid, _):
        assert len(conn.getpeername()) == 4
        assert lookup(ProcessAttributor(), conn) == Attribution("six", "process_env", pid)


@needs_proc
def test_ipv4_mapped_client_socket_in_tcp6(workdir):
    # The client uses an AF_INET6 socket to reach an IPv4 listener: its side is listed in
    # /proc/net/tcp6 as ::ffff:127.0.0.1, while we see the peer as plain 127.0.0.1.
    try:
        socket.create_connection(("::ffff:127.0.0.1", 9), timeout=1).close()
    except ConnectionRefusedError:
        pass
    except OSError:
        pytest.skip("IPv4-mapped IPv6 sockets are not available")
    with client_process(python_client(), env=clean_env(HALTON_PROJECT="mapped"), cwd=workdir,
                        connect_to="::ffff:127.0.0.1") as (conn, pid, _):
        assert conn.getpeername()[0] == "127.0.0.1"
        assert "0000000000000000FFFF00000100007F" in Path("/proc/net/tcp6").read_text()
        assert lookup(ProcessAttributor(), conn) == Attribution("mapped", "process_env", pid)


@needs_proc
def test_the_same_client_connecting_again_is_found_again(workdir):
    attributor = ProcessAttributor()
    for _ in range(2):
        with client_process(python_client(), env=clean_env(HALTON_PROJECT="again"), cwd=workdir) as (conn, pid, _):
            assert lookup(attributor, conn) == Attribution("again", "process_env", pid)


@needs_proc
def test_a_client_that_has_gone_and_nonsense_addresses_give_none_quickly(workdir):
    attributor = ProcessAttributor()
    with client_process(python_client(), env=clean_env(HALTON_PROJECT="gone"), cwd=workdir) as (conn, _, process):
        process.kill()
        process.wait(10)
        started = time.monotonic()
        assert lookup(attributor, conn) is None
        assert time.monotonic() - started < 0.5
    for client, server in [(("203.0.113.9", 1), ("127.0.0.1", 2)), (("not an ip", "x"), ("127.0.0.1", 2)),
                           ((), ()), (None, None)]:
        assert attributor.lookup(client, server) is None


@needs_proc
def test_our_own_connection_is_never_attributed_to_us():
    listener = socket.create_server(("127.0.0.1", 0))
    with socket.create_connection(listener.getsockname()) as own_client:
        conn, _ = listener.accept()
        with conn, listener:
            assert own_client.getsockname() == conn.getpeername()
            assert lookup(ProcessAttributor(), conn) is None


@needs_proc
def test_disabled_zero_deadline_and_missing_proc_give_none(workdir):
    with client_process(python_client(), env=clean_env(HALTON_PROJECT="alpha"), cwd=workdir) as (conn, pid, _):
        assert lookup(ProcessAttributor(), conn) == Attribution("alpha", "process_env", pid)
        assert lookup(ProcessAttributor(enabled=False), conn) is None
        assert lookup(ProcessAttributor(timeout_s=0), conn) is None
        assert lookup(ProcessAttributor(timeout_s=1e-6), conn) is None
        assert lookup(ProcessAttributor(proc_root=workdir / "no-proc"), conn) is None
        (workdir / "a-file").write_text("not a directory")
        assert lookup(ProcessAttributor(proc_root=workdir / "a-file"), conn) is None


@needs_proc
def test_lookup_time(workdir):
    attributor = ProcessAttributor()
    with client_process(python_client(), env=clean_env(HALTON_PROJECT="timed"), cwd=workdir) as (conn, pid, _):
        times = []
        for _ in range(20):
            started = time.perf_counter()
            assert lookup(attributor, conn) == Attribution("timed", "process_env", pid)
            times.append(time.perf_counter() - started)
        cold_started = time.perf_counter()
        assert lookup(ProcessAttributor(), conn) is not None  # no recent-owner cache
        cold = time.perf_counter() - cold_started
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()):
        conn, _ = listener.accept()
        with conn:  # our own socket: skipped, so every pid on the machine is scanned
            started = time.perf_counter()
            assert lookup(attributor, conn) is None
            full_scan = time.perf_counter() - started
    pids = sum(name.isdigit() for name in os.listdir("/proc"))
    print(f"\nlookup median={statistics.median(times) * 1e3:.2f}ms max={max(times) * 1e3:.2f}ms "
          f"cold={cold * 1e3:.2f}ms full_scan_no_owner={full_scan * 1e3:.2f}ms pids={pids}")
    assert statistics.median(times) < 0.5


# --- /proc parsing on a hand-built tree --------------------------------------------------------

def fake_proc(root: Path, processes: dict[int, dict], tcp: str = "", tcp6: str = "") -> Path:
    """A /proc look-alike: net/tcp{,6} and, per pid, stat, environ, cwd, exe, cmdline, fd/."""
    (root / "net").mkdir(parents=True)
    (root / "net" / "tcp").write_text(tcp)
    (root / "net" / "tcp6").write_text(tcp6)
    for pid, info in processes.items():
        base = root / str(pid)
        (base / "fd").mkdir(parents=True)
        (base / "stat").write_text(f"{pid} ({info['comm']}) S {info['ppid']} 1 1 0 -1 4194560\n")
        (base / "environ").write_bytes(b"\0".join(info.get("environ", [])) + b"\0")
        (base / "cmdline").write_bytes(info.get("cmdline", b""))
        (base / "cwd").symlink_to(info.get("cwd", "/nonexistent-cwd"))
        (base / "exe").symlink_to(info.get("exe", "/usr/bin/unknown"))
        for number, target in enumerate(info.get("fds", [])):
            (base / "fd" / str(number)).symlink_to(target)
    return root


TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
              "timeout inode\n")
# client 127.0.0.1:50000 -> server 127.0.0.1:8081 (inode 777), and our side of it (inode 778)
TCP_LINES = (
    "   0: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 100 1\n"
    "   1: 0100007F:C350 0100007F:1F91 01 00000000:00000000 00:00000000 00000000  1000        0 777 1\n"
    "   2: 0100007F:1F91 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 778 1\n"
)


def test_chain_env_names_and_a_comm_with_parens_from_a_built_proc(tmp_path):
    root = fake_proc(tmp_path / "proc", {
        1: {"comm": "init", "ppid": 0, "environ": [b"HALTON_PROJECT=from-init"]},
        40: {"comm": "weird) (name", "ppid": 1, "environ": [b"A=1", b"HALTON_PROJECT=grand"],
             "cmdline": b"-zsh\0"},
        41: {"comm": "node", "ppid": 40, "environ": [b"HALTON_PROJECT="]},  # empty: unset
        42: {"comm": "curl", "ppid": 41, "environ": [b"PATH=/bin"], "fds": ["/dev/null", "socket:[777]"]},
        43: {"comm": "proxy", "ppid": 1, "fds": ["socket:[778]"]},
    }, tcp=TCP_HEADER + TCP_LINES)
    client, server = ("127.0.0.1", 50000), ("127.0.0.1", 8081)
    assert ProcessAttributor(proc_root=root, platform="linux").lookup(client, server) == \
        Attribution("grand", "process_env", 42)
    (root / "40" / "environ").write_bytes(b"A=1\0")
    (root / "1" / "environ").write_bytes(b"")
    rules = parse_rules([{"process": "zsh", "project": "shell"}])  # argv[0] "-zsh" of pid 40
    assert ProcessAttributor(rules, proc_root=root, platform="linux").lookup(client, server) == \
        Attribution("shell", "rule_process", 42)
    rules = parse_rules([{"process": "weird) (name", "project": "parens"}])
    assert ProcessAttributor(rules, proc_root=root, platform="linux").lookup(client, server) == \
        Attribution("parens", "rule_process", 42)
    assert ProcessAttributor(proc_root=root, platform="linux").lookup(client, server) is None
    # our side of the connection (local = server) is not the client's socket
    assert ProcessAttributor(proc_root=root, platform="linux").lookup(server, client) is None


# --- pure parsers on recorded text -------------------------------------------------------------

def test_find_socket_inode_in_tcp_and_in_tcp6_with_a_mapped_address():
    lines = (TCP_HEADER + TCP_LINES).splitlines()
    client, server = ("127.0.0.1", 50000), ("127.0.0.1", 8081)
    assert find_socket_inode(lines, client, server, tcp6=False, byteorder="little") == 777
    assert find_socket_inode(lines, server, client, tcp6=False, byteorder="little") == 778
    assert find_socket_inode(lines, client, ("127.0.0.1", 8082), tcp6=False, byteorder="little") == 0
    assert find_socket_inode(lines, client, server, tcp6=True, byteorder="little") == 0
    assert find_socket_inode(lines, ("::1", 50000), server, tcp6=False, byteorder="little") == 0
    tcp6 = (
        "  sl  local_address                         remote_address                        st tx_queue "
        "rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0000000000000000FFFF00000100007F:D431 0000000000000000FFFF00000100007F:1F91 06 "
        "00000000:00000000 03:00000E5B 00000000     0        0 0 3 0000000000000000\n"
        "   1: 0000000000000000FFFF00000100007F:D431 0000000000000000FFFF00000100007F:1F91 01 "
        "00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 20 4 30 10 -1\n"
        "   2: 00000000000000000000000001000000:A2C4 00000000000000000000000001000000:1F91 01 "
        "00000000:00000000 00:00000000 00000000  1000        0 4243 1 0000000000000000 20 4 30 10 -1\n"
        "   3: B80D0120000000000000000001000000:0050 00000000000000000000000000000000:0000 0A "
        "00000000:00000000 00:00000000 00000000     0        0 4244 1\n"
        "   4: garbage\n"
    ).splitlines()
    # the TIME_WAIT entry (inode 0) for the same addresses is passed over
    assert find_socket_inode(tcp6, ("127.0.0.1", 54321), server, tcp6=True, byteorder="little") == 4242
    assert find_socket_inode(tcp6, ("::1", 41668), ("::1", 8081), tcp6=True, byteorder="little") == 4243
    assert find_socket_inode(tcp6, ("2001:db8::1", 80), ("::", 0), tcp6=True, byteorder="little") == 4244
    assert find_socket_inode(tcp6, ("127.0.0.1", 54321), server, tcp6=True, byteorder="big") == 0


def test_parse_stat_takes_comm_up_to_the_last_paren():
    assert parse_stat("1234 (a) (b) c)) S 99 1234 1234 0 -1 4194560 0 0\n") == ("a) (b) c)", 99)
    assert parse_stat("7 (my prog) R 1 7 7 0 -1\n") == ("my prog", 1)


def test_parse_environ():
    data = b"PATH=/bin\0XHALTON_PROJECT=no\0HALTON_PROJECT=caf\xc3\xa9 app\0HALTON_PROJECT=second\0"
    assert parse_environ(data, "HALTON_PROJECT") == "café app"
    assert parse_environ(b"PATH=/bin\0", "HALTON_PROJECT") is None


LSOF_CONNECTIONS = """\
p501
f7
n127.0.0.1:8081->127.0.0.1:50123
p4242
f3
n127.0.0.1:50123->127.0.0.1:8081
f4
n[::1]:50124->[::1]:8081
p777
f9
n127.0.0.1:50999->127.0.0.1:8081
"""


def test_parse_lsof_connections_and_cwd():
    assert parse_lsof_connections(LSOF_CONNECTIONS) == [
        (501, ("127.0.0.1", 8081), ("127.0.0.1", 50123)),
        (4242, ("127.0.0.1", 50123), ("127.0.0.1", 8081)),
        (4242, ("::1", 50124), ("::1", 8081)),
        (777, ("127.0.0.1", 50999), ("127.0.0.1", 8081)),
    ]
    assert parse_lsof_connections("p12\nf3\nn*:8081\npx\nnbad->worse\n") == []
    assert parse_lsof_name("p4242\nfcwd\nn/Users/ann/code/my app\n") == "/Users/ann/code/my app"
    assert parse_lsof_name("") is None


def test_parse_ps_table_and_environment():
    table = "    1     0 /sbin/launchd\n  4200     1 /Applications/My Editor.app/Contents/MacOS/My Editor\n 4242  4200 node\n"
    assert parse_ps_table(table) == {
        1: (0, "/sbin/launchd"),
        4200: (1, "/Applications/My Editor.app/Contents/MacOS/My Editor"),
        4242: (4200, "node"),
    }
    eww = (
        " 4242 node server.js --flag HALTON_PROJECT=arg-like TERM=xterm HALTON_PROJECT=beta HOME=/Users/ann\n"
        " 4200 /bin/zsh -l XHALTON_PROJECT=no PATH=/usr/bin\n"
        "    1 /sbin/launchd\n"
    )
    assert parse_ps_environment(eww, "HALTON_PROJECT") == {4242: "beta"}


# --- macOS path, with scripted lsof and ps ------------------------------------------------------

FAKE_TOOL = """#!{python}
import sys, time
args = sys.argv[1:]
{body}
"""
FAKE_LSOF = """
if "{sleep}":
    time.sleep(5)
if args[-1] == "-Fn" and "cwd" in args:
    print("p" + args[args.index("-p") + 1] + "\\nfcwd\\nn" + {cwd!r})
elif "-iTCP@127.0.0.1:8081" in args and "-sTCP:ESTABLISHED" in args:
    sys.stdout.write({connections!r})
    sys.exit(0)
sys.exit(1)
"""
FAKE_PS = """
if "-A" in args:
    print("    1     0 /sbin/launchd\\n 4200     1 /bin/zsh\\n 4242  4200 /usr/local/bin/node\\n  501     1 halton-meter")
elif "eww" in args and args[-1] == "4242,4200,1":
    print(" 4242 node app.js TERM=xterm\\n 4200 -zsh {env}PATH=/usr/bin\\n    1 /sbin/launchd")
else:
    sys.exit(1)
"""


def fake_tools(bin_dir: Path, *, cwd: str, env: str = "", sleep: bool = False) -> Path:
    bin_dir.mkdir(exist_ok=True)
    bodies = {"lsof": FAKE_LSOF.format(sleep="yes" if sleep else "", cwd=cwd, connections=LSOF_CONNECTIONS),
              "ps": FAKE_PS.format(env=env)}
    for name, body in bodies.items():
        tool = bin_dir / name
        tool.write_text(FAKE_TOOL.format(python=sys.executable, body=body))
        tool.chmod(0o755)
    return bin_dir


CLIENT_DARWIN, SERVER_DARWIN = ("127.0.0.1", 50123), ("127.0.0.1", 8081)


def test_lsof_ps_env_on_the_parent(tmp_path, monkeypatch):
    tools = fake_tools(tmp_path / "bin", cwd=str(tmp_path), env="HALTON_PROJECT=beta ")
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    found = ProcessAttributor(platform="darwin").lookup(CLIENT_DARWIN, SERVER_DARWIN)
    assert found == Attribution("beta", "process_env", 4242)


def test_lsof_ps_git_repo_and_rules(tmp_path, monkeypatch):
    repo = tmp_path / "web-app"
    (repo / ".git").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    fake_tools(tmp_path / "bin", cwd=str(repo / "src"))
    attributor = ProcessAttributor(parse_rules([{"process": "zsh", "project": "shell"}]), platform="darwin")
    assert attributor.lookup(CLIENT_DARWIN, SERVER_DARWIN) == Attribution("web-app", "git_repo", 4242)
    fake_tools(tmp_path / "bin", cwd=str(tmp_path / "plain"))
    assert attributor.lookup(CLIENT_DARWIN, SERVER_DARWIN) == Attribution("shell", "rule_process", 4242)
    rules = parse_rules([{"cwd": str(tmp_path), "project": "by-cwd"}, {"process": "node", "project": "n"}])
    assert ProcessAttributor(rules, platform="darwin").lookup(CLIENT_DARWIN, SERVER_DARWIN) == \
        Attribution("by-cwd", "rule_cwd", 4242)
    # the proxy's own socket (pid 501, local = server) is never taken for the client's
    assert attributor.lookup(("127.0.0.1", 50555), SERVER_DARWIN) is None


def test_lsof_ps_missing_or_hanging_tools_give_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert ProcessAttributor(platform="darwin").lookup(CLIENT_DARWIN, SERVER_DARWIN) is None
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", cwd="/", sleep=True)))
    started = time.monotonic()
    assert ProcessAttributor(timeout_s=0.3, platform="darwin").lookup(CLIENT_DARWIN, SERVER_DARWIN) is None
    assert time.monotonic() - started < 2


# --- names and rules ---------------------------------------------------------------------------

def test_project_names_and_slugify():
    assert PROJECT_NAME.pattern == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    assert is_project_name("My_App.v2-x") and is_project_name("a" * 64)
    for bad in ("", "-lead", ".hidden", "a" * 65, "sp ace", "line\n", None, 7):
        assert not is_project_name(bad)
    assert slugify_project("Team A/web app") == "Team-A-web-app"
    assert slugify_project("  ..._café!!") == "caf-"
    assert slugify_project("x" * 80) == "x" * 64
    assert slugify_project("!!!") is None and slugify_project("") is None


def test_parse_rules_builds_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert parse_rules(None) == () and parse_rules([]) == ()
    assert parse_rules([{"cwd": "~/link/", "project": "a"}, {"process": " Node ", "project": "b"}]) == (
        Rule("cwd", str((tmp_path / "real").resolve()), "a"), Rule("process", "node", "b"))


@pytest.mark.parametrize("table, message", [
    ({"cwd": "/x", "project": "a"}, "must be a list of tables"),
    (["cwd=/x"], "rule 1 is not a table"),
    ([{"cwd": "/x", "project": "ok"}, {"cwd": "/x"}], "rule 2 has no project"),
    ([{"cwd": "/x", "process": "node", "project": "a"}], "has both cwd and process"),
    ([{"project": "a"}], "has neither cwd nor process"),
    ([{"cwd": "/x", "project": "bad name"}], "invalid project 'bad name'"),
    ([{"cwd": "/x", "project": 5}], "invalid project 5"),
    ([{"cwd": "work/repo", "project": "a"}], "relative cwd"),
    ([{"cwd": "", "project": "a"}], "empty or non-text cwd"),
    ([{"process": "/usr/bin/node", "project": "a"}], "a path as process"),
    ([{"cwd": "/x", "project": "a", "comment": "hi"}], "unknown key(s) comment"),
])
def test_parse_rules_errors(table, message):
    with pytest.raises(ConfigError) as caught:
        parse_rules(table, where="/home/ann/.halton-meter/config.toml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("/home/ann/.halton-meter/config.toml: ")


def test_a_dotfiles_repository_in_a_home_directory_is_not_a_project(tmp_path):
    from halton_meter import attribution as attribution_module
    from halton_meter.attribution import _git_repo_name

    home = tmp_path / "home" / "ana"
    (home / ".git").mkdir(parents=True)
    (home / "notes").mkdir()
    assert _git_repo_name(str(home / "notes")) is not None  # tmp_path is not under /home
    assert attribution_module._is_home("/home/ana") and attribution_module._is_home("/Users/ana")
    assert not attribution_module._is_home("/home/ana/src/app")


def test_sock_diag_finds_the_same_inode_as_the_socket_itself():
    from halton_meter.attribution import sock_diag_inode

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                try:
                    inode = sock_diag_inode(accepted.getpeername(), accepted.getsockname())
                except OSError as exc:
                    pytest.skip(f"no netlink sock_diag here: {exc}")
                assert inode == os.fstat(client.fileno()).st_ino
                assert sock_diag_inode(("127.0.0.1", 1), accepted.getsockname()) == 0
