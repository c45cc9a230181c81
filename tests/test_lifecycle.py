"""The install/run lifecycle through the real CLI in subprocesses, each test in its own machine:
a temp HOME, HALTON_METER_HOME and trust root, fake `systemctl`/`launchctl`/`security` on PATH
(the only things mocked: the OS boundary), and the detached supervisor for real.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

FAKEBIN = REPO / "tests" / "fakebin"


class Machine:
    def __init__(self, root: Path, supervisor: str | None = "detached") -> None:
        self.root = root
        self.user = root / "user"
        self.home = root / "halton"
        self.trust_root = root / "sysroot"
        self.fakes = root / "fakes"
        for path in (self.user, self.fakes, self.trust_root / "usr/local/share/ca-certificates"):
            path.mkdir(parents=True, exist_ok=True)
        (self.user / ".bashrc").write_text("# the user's own bashrc\nalias ll='ls -l'\n")
        self.env = dict(os.environ)
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "SSL_CERT_FILE",
                     "HALTON_METER_SUPERVISOR", "XDG_RUNTIME_DIR", "ZDOTDIR"):
            self.env.pop(name, None)
        self.env.update({
            "HOME": str(self.user), "XDG_CONFIG_HOME": str(self.user / ".config"),
            "HALTON_METER_HOME": str(self.home), "HALTON_METER_TRUST_ROOT": str(self.trust_root),
            "FAKE_SUPERVISOR_STATE": str(self.fakes), "FAKE_SYSTEM_STATE": str(self.fakes),
            "PATH": f"{FAKEBIN}{os.pathsep}{os.environ['PATH']}", "SHELL": "/bin/bash",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        })
        if supervisor:
            self.env["HALTON_METER_SUPERVISOR"] = supervisor

    def cli(self, *args: str, timeout: float = 60, check: int | None = 0) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "halton_meter", *args], capture_output=True, text=True,
                                env=self.env, cwd=str(self.root), timeout=timeout)
        if check is not None:
            assert result.returncode == check, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def status(self, *args: str) -> dict:
        return json.loads(self.cli("status", "--json", *args, check=None).stdout)

    def state(self) -> dict:
        return json.loads((self.home / "install.json").read_text())

    def calls(self) -> list[list[str]]:
        path = self.fakes / "calls.jsonl"
        if not path.exists():
            return []
        calls = []
        for line in path.read_text().splitlines():  # the fakes log [tool, *args] or {tool, argv}
            entry = json.loads(line)
            calls.append([entry["tool"], *entry["argv"]] if isinstance(entry, dict) else entry)
        return calls

    def pids(self) -> list[int]:
        found = []
        for path in list((self.home / "run").glob("*.pid")) + list(self.fakes.glob("**/*.pid")):
            try:
                found.append(int(path.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return found

    def kill_everything(self) -> None:
        """Finaliser: whatever a failed test left running."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def wait_until(predicate, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.fixture
def machine(tmp_path):
    made = Machine(tmp_path)
    yield made
    made.cli("uninstall", check=None)
    made.kill_everything()


def with_upstream(machine: Machine, fake) -> None:
    """config.toml sends api.anthropic.com to the loopback fake provider (and trusts its CA)."""
    machine.home.mkdir(parents=True, exist_ok=True)
    (machine.home / "config.toml").write_text(
        "[proxy]\n"
        f'upstreams = {{ "api.anthropic.com" = "127.0.0.1:{fake.port}" }}\n'
        f'upstream_ca = ["{fake.ca_path}"]\n')


def curl_through(machine: Machine, project: str | None, *, expect_exit: int = 0) -> subprocess.CompletedProcess:
    """curl, started by `halton-meter run`, calls the Anthropic API with only the environment run sets."""
    args = ["run"] + (["--project", project] if project else []) + [
        "--", "curl", "-sS", "--fail", "-X", "POST", "https://api.anthropic.com/v1/messages",
        "-H", "content-type: application/json", "-H", "x-fake-delay-ms: 1",
        "--data", '{"model": "claude-haiku-4-5", "max_tokens": 5, "stream": true, '
                  '"messages": [{"role": "user", "content": "hi"}]}']
    return machine.cli(*args, check=expect_exit)


def rows(machine: Machine, project: str) -> list[dict]:
    db = sqlite3.connect(machine.home / "db.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM calls WHERE project = ?", (project,))]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


# -- init, status, idempotency, uninstall ------------------------------------------------------

def test_init_detached_end_to_end_then_idempotent_then_uninstall_leaves_only_the_database(machine):
    first = machine.cli("init", "--non-interactive", "--port", "0", "--api-port", "0")
    assert "self-test" in first.stdout and "passed" in first.stdout, first.stdout
    assert "halton-meter is metering" in first.stdout and "CA SHA-256" in first.stdout
    state = machine.state()
    assert state["mode"] == "run" and state["supervisor"] == "detached"
    assert state["edge_port"] > 0 and state["api_port"] > 0
    assert machine.home.stat().st_mode & 0o777 == 0o700, "the home (ledger, CA) is owner-only"
    # Trust: the sysroot's Debian-style anchors dir is writable, so the CA went there.
    anchor = machine.trust_root / "usr/local/share/ca-certificates/halton-meter.crt"
    assert anchor.read_bytes().strip() == (machine.home / "ca" / "ca.pem").read_bytes().strip()
    assert ["update-ca-certificates"] in machine.calls()
    # The self-test's row was removed again: reports never show it.
    db = sqlite3.connect(machine.home / "db.sqlite")
    try:
        assert db.execute("SELECT count(*) FROM calls WHERE provider = 'selftest'").fetchone()[0] == 0
    finally:
        db.close()

    status = machine.status()
    assert status["verdict"] == "HEALTHY", status
    assert {c["name"] for c in status["components"]} >= {
        "edge", "daemon", "api", "ca", "trust", "supervisor", "shell rc", "database"}
    assert status["ports"] == {"edge": state["edge_port"], "api": state["api_port"]}

    again = machine.cli("init", "--non-interactive")
    assert machine.state()["edge_port"] == state["edge_port"], "a re-run keeps the running ports"
    assert "unchanged" in again.stdout and "passed" in again.stdout
    pids = machine.pids()
    assert pids and all(alive(pid) for pid in pids)

    gone = machine.cli("uninstall")
    assert "removed" in gone.stdout
    assert not anchor.exists()
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 10)
    leftover = sorted(p.name for p in machine.home.iterdir())
    assert "install.json" not in leftover and "db.sqlite" in leftover
    machine.cli("uninstall", "--purge")
    assert sorted(p.name for p in machine.home.iterdir()) == ["db.sqlite"]
    assert (machine.user / ".bashrc").read_text() == "# the user's own bashrc\nalias ll='ls -l'\n"
    assert machine.status()["verdict"] == "BROKEN"
    machine.cli("uninstall", "--purge", "--include-logs")
    assert not machine.home.exists()


def test_apps_mode_writes_the_rc_block_and_init_reconciles_back(machine):
    machine.cli("init", "--apps", "--non-interactive", "--port", "0", "--api-port", "0")
    port = machine.state()["edge_port"]
    bashrc = (machine.user / ".bashrc").read_text()
    assert bashrc.startswith("# the user's own bashrc\nalias ll='ls -l'\n")
    assert "# >>> halton-meter >>>" in bashrc and f"export HTTPS_PROXY=http://127.0.0.1:{port}" in bashrc
    assert f"NODE_EXTRA_CA_CERTS={machine.home / 'ca-bundle.pem'}" in bashrc
    assert machine.status()["verdict"] == "HEALTHY"

    machine.cli("init", "--non-interactive")  # back to run mode: the block goes
    assert (machine.user / ".bashrc").read_text() == "# the user's own bashrc\nalias ll='ls -l'\n"
    assert machine.state()["rc_files"] == []
    rc_row = next(c for c in machine.status()["components"] if c["name"] == "shell rc")
    assert rc_row["state"] == "off"


def test_full_mode_on_linux_says_what_is_not_supported(machine):
    result = machine.cli("init", "--full", "--non-interactive", "--no-shell-rc", "--port", "0", "--api-port", "0")
    assert "not supported on Linux" in result.stdout
    assert machine.state()["mode"] == "full" and machine.state()["rc_files"] == []


def test_a_failed_self_test_rolls_everything_back(machine):
    machine.home.mkdir(parents=True)
    (machine.home / "db.sqlite").mkdir()  # the daemon cannot open its ledger: it never comes up
    result = machine.cli("init", "--apps", "--non-interactive", "--port", "0", "--api-port", "0",
                         "--timeout", "3", check=1)
    assert "init failed" in result.stderr and "daemon" in result.stderr
    assert "rolling back" in result.stderr
    assert not (machine.home / "install.json").exists()
    assert (machine.user / ".bashrc").read_text() == "# the user's own bashrc\nalias ll='ls -l'\n"
    assert not (machine.trust_root / "usr/local/share/ca-certificates/halton-meter.crt").exists()
    assert wait_until(lambda: not any(alive(pid) for pid in machine.pids()), 10)


# -- run ---------------------------------------------------------------------------------------

def test_run_attributes_a_child_process_call_to_its_project(machine, fake):
    with_upstream(machine, fake)
    machine.cli("init", "--non-interactive", "--port", "0", "--api-port", "0")
    done = curl_through(machine, "alpha")
    assert "message_stop" in done.stdout
    found = wait_until(lambda: rows(machine, "alpha"), 5)
    assert len(found) == 1 and found[0]["client"] == "curl" and found[0]["usage_status"] == "exact"
    assert found[0]["output_tokens"] > 0 and found[0]["cost_nanousd"] > 0


def test_run_starts_the_stack_when_nothing_is_installed_and_passes_exit_codes_and_signals(machine, fake):
    with_upstream(machine, fake)
    done = curl_through(machine, "beta")
    assert "message_stop" in done.stdout
    assert wait_until(lambda: rows(machine, "beta"), 5)
    assert machine.state()["supervisor"] == "detached"

    exit7 = machine.cli("run", "--", sys.executable, "-c", "import sys; sys.exit(7)", check=7)
    assert exit7.stderr == ""  # quiet when the stack is already up
    machine.cli("run", "--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
                check=-signal.SIGTERM)
    env = machine.cli("run", "--project", "gamma", "--", sys.executable, "-c",
                      "import json, os; print(json.dumps(dict(os.environ)))").stdout
    seen = json.loads(env)
    port = machine.state()["edge_port"]
    assert seen["HTTPS_PROXY"] == seen["http_proxy"] == f"http://gamma@127.0.0.1:{port}"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert seen[name] == str(machine.home / "ca-bundle.pem")
    assert seen["NO_PROXY"].split(",")[-3:] == ["localhost", "127.0.0.1", "::1"]
    assert seen["HALTON_PROJECT"] == "gamma"

    shell = machine.cli("run", "--project", "delta", "--shell", "--", "echo $HALTON_PROJECT-x | tr x y")
    assert shell.stdout == "delta-y\n"
    assert machine.cli("run", "--", "no-such-command-xyz", check=127).stderr.endswith("command not found\n")
    assert "not allowed" in machine.cli("run", "--project", "bad name", "--", "true", check=2).stderr
    assert machine.cli("run", check=2).returncode == 2


# -- the edge never refuses while the daemon dies and comes back --------------------------------

def test_edge_keeps_tunnelling_while_the_daemon_is_killed_and_restarted(machine, fake):
    import http.client
    import ssl

    with_upstream(machine, fake)
    machine.cli("init", "--non-interactive", "--port", "0", "--api-port", "0")
    port = machine.state()["edge_port"]
    context = ssl.create_default_context(cafile=str(machine.home / "ca-bundle.pem"))
    context.load_verify_locations(cafile=str(fake.ca_path))  # unmetered, the fake's own leaf arrives

    def call(n: int) -> int:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.set_tunnel("api.anthropic.com", 443)
        try:
            conn.request("POST", "/v1/messages", body=json.dumps({"model": "claude-haiku-4-5", "max_tokens": 5}),
                         headers={"content-type": "application/json", "x-halton-project": f"kill-{n}"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    daemon_pid = int((machine.home / "run" / "daemon.pid").read_text().split()[0])
    os.kill(daemon_pid, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 8
    n = 0
    while time.monotonic() < deadline:
        statuses.append(call(n))
        n += 1
        if rows(machine, f"kill-{n - 1}") and len(statuses) > 5:
            break  # metered again: the restarted daemon took over
        time.sleep(0.05)
    assert statuses and set(statuses) == {200}, statuses
    assert wait_until(lambda: rows(machine, f"kill-{n - 1}"), 5), "the restarted daemon meters again"
    new_pid = int((machine.home / "run" / "daemon.pid").read_text().split()[0])
    assert new_pid != daemon_pid
    assert machine.status()["verdict"] == "HEALTHY"


# -- start / stop / restart and the verdicts ---------------------------------------------------

def test_stop_start_restart_and_status_doctor_verdicts(machine):
    machine.cli("init", "--non-interactive", "--port", "0", "--api-port", "0")
    doctor = json.loads(machine.cli("doctor", "--json").stdout)
    assert doctor["verdict"] == "HEALTHY", doctor
    assert {"python", "openssl", "disk", "end to end"} <= {c["name"] for c in doctor["components"]}

    stopped = machine.cli("stop")
    assert "keeps forwarding" in stopped.stdout
    status = machine.status()
    assert status["verdict"] == "INCONSISTENT"
    daemon = next(c for c in status["components"] if c["name"] == "daemon")
    assert daemon["state"] == "warn" and daemon["fix"]
    assert machine.cli("status", check=1).stdout.startswith("halton-meter status: INCONSISTENT")
    broken = json.loads(machine.cli("doctor", "--json", check=1).stdout)
    assert broken["verdict"] == "BROKEN"
    e2e = next(c for c in broken["components"] if c["name"] == "end to end")
    assert e2e["state"] == "fail" and "no row" in e2e["detail"]

    machine.cli("stop", "--all")
    status = machine.status()
    assert status["verdict"] == "BROKEN"
    assert next(c for c in status["components"] if c["name"] == "edge")["fix"] == "halton-meter start"
    assert "stopped" in machine.cli("stop", "--all").stdout  # idempotent

    started = machine.cli("start")
    assert "Running" in started.stdout
    assert "Already running" in machine.cli("start").stdout
    assert machine.status()["verdict"] == "HEALTHY"
    before = int((machine.home / "run" / "daemon.pid").read_text().split()[0])
    machine.cli("restart")
    after = int((machine.home / "run" / "daemon.pid").read_text().split()[0])
    assert before != after and machine.status()["verdict"] == "HEALTHY"


def test_status_before_init_is_broken_with_the_fix(machine):
    status = machine.status()
    assert status["verdict"] == "BROKEN" and status["mode"] is None
    install = next(c for c in status["components"] if c["name"] == "install")
    assert install["fix"] == "halton-meter init"
    assert "Nothing to stop" in machine.cli("stop").stdout


# -- supervision mocked at the systemctl / launchctl boundary ----------------------------------

def test_init_with_systemd_user_units(tmp_path):
    machine = Machine(tmp_path, supervisor=None)  # detected: the fake systemctl answers
    try:
        machine.cli("init", "--non-interactive", "--port", "0", "--api-port", "0")
        assert machine.state()["supervisor"] == "systemd"
        units = machine.user / ".config" / "systemd" / "user"
        edge = (units / "halton-meter-edge.service").read_text()
        assert "Restart=always" in edge and "edge" in edge and str(machine.state()["edge_port"]) in edge
        assert any(argv[:3] == ["systemctl", "--user", "enable"] or "enable" in argv for argv in machine.calls())
        assert machine.status()["verdict"] == "HEALTHY"
        machine.cli("uninstall")
        assert not (units / "halton-meter-edge.service").exists()
        assert any("disable" in argv for argv in machine.calls())
    finally:
        machine.cli("uninstall", check=None)
        machine.kill_everything()


def test_init_apps_with_launchd_keychain_and_launchctl_env(tmp_path):
    machine = Machine(tmp_path, supervisor="launchd")
    try:
        machine.cli("init", "--apps", "--non-interactive", "--port", "0", "--api-port", "0")
        agents = machine.user / "Library" / "LaunchAgents"
        assert (agents / "com.halton-meter.edge.plist").exists()
        calls = machine.calls()
        assert any(argv[:2] == ["security", "add-trusted-cert"] for argv in calls)
        setenv = [argv for argv in calls if argv[:2] == ["launchctl", "setenv"]]
        assert {argv[2] for argv in setenv} >= {"HTTPS_PROXY", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"}
        assert machine.status()["verdict"] == "HEALTHY"

        result = machine.cli("uninstall")
        calls = machine.calls()
        untrust = next(i for i, argv in enumerate(calls) if argv[:2] == ["security", "delete-certificate"])
        bootout = next(i for i, argv in enumerate(calls) if argv[:2] == ["launchctl", "bootout"])
        assert untrust < bootout, "trust is removed before supervision"
        assert any(argv[:2] == ["launchctl", "unsetenv"] for argv in calls)
        assert not (agents / "com.halton-meter.edge.plist").exists()
        assert "new terminal" in result.stdout
    finally:
        machine.cli("uninstall", check=None)
        machine.kill_everything()


# -- every command: --help and --version -------------------------------------------------------

@pytest.mark.parametrize("command", ["init", "run", "start", "stop", "restart", "status", "doctor",
                                     "uninstall", "demo", "serve", "report", "tail", "reprice"])
def test_every_command_has_help(tmp_path, command):
    result = subprocess.run([sys.executable, "-m", "halton_meter", command, "--help"], capture_output=True,
                            text=True, cwd=str(REPO), env={**os.environ, "HALTON_METER_HOME": str(tmp_path)})
    assert result.returncode == 0 and f"halton-meter {command}" in result.stdout


def test_version_and_bare_invocation(tmp_path):
    version = subprocess.run([sys.executable, "-m", "halton_meter", "--version"], capture_output=True, text=True,
                             cwd=str(REPO))
    assert version.returncode == 0 and version.stdout.startswith("halton-meter ")
    bare = subprocess.run([sys.executable, "-m", "halton_meter"], capture_output=True, text=True, cwd=str(REPO))
    assert bare.returncode == 2 and "init" in bare.stdout


# -- failures half-way, damaged state, and run never blocked -----------------------------------

def test_a_step_failing_half_way_is_rolled_back_from_what_really_happened(machine):
    (machine.fakes / "fail-update").write_text("")  # the trust step fails after the rc block was written
    result = machine.cli("init", "--apps", "--non-interactive", "--port", "0", "--api-port", "0", check=1)
    assert "init failed" in result.stderr and "rolling back" in result.stderr
    assert (machine.user / ".bashrc").read_text() == "# the user's own bashrc\nalias ll='ls -l'\n"
    assert not (machine.home / "install.json").exists()
    assert wait_until(lambda: not any(alive(pid) for pid in machine.pids()), 10)


def test_uninstall_that_fails_keeps_its_record_and_purges_nothing(machine):
    machine.cli("init", "--non-interactive", "--port", "0", "--api-port", "0")
    (machine.fakes / "fail-update").write_text("")
    result = machine.cli("uninstall", "--purge", check=1)
    assert "nothing was purged" in result.stderr
    assert (machine.home / "install.json").exists() and (machine.home / "ca" / "ca.pem").exists()
    (machine.fakes / "fail-update").unlink()
    machine.cli("uninstall", "--purge")
    assert not (machine.trust_root / "usr/local/share/ca-certificates/halton-meter.crt").exists()
    assert sorted(p.name for p in machine.home.iterdir()) == ["db.sqlite"]


def test_a_damaged_install_record_is_swept_by_uninstall_and_rewritten_by_init(machine):
    machine.cli("init", "--apps", "--non-interactive", "--port", "0", "--api-port", "0")
    pids = machine.pids()
    (machine.home / "install.json").write_text('{"mode": "apps",')
    assert machine.status()["verdict"] == "BROKEN"
    machine.cli("uninstall")
    assert (machine.user / ".bashrc").read_text() == "# the user's own bashrc\nalias ll='ls -l'\n"
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 10)
    assert not (machine.trust_root / "usr/local/share/ca-certificates/halton-meter.crt").exists()

    (machine.home / "install.json").write_text("not json")
    machine.cli("init", "--non-interactive", "--port", "0", "--api-port", "0")
    assert machine.state()["mode"] == "run"


def test_run_still_runs_the_command_when_the_config_is_broken(machine):
    machine.home.mkdir(parents=True)
    (machine.home / "config.toml").write_text('[proxy]\nport = "abc')
    result = machine.cli("run", "--", sys.executable, "-c", "import os; print(os.environ.get('HTTPS_PROXY'))")
    assert result.stdout == "None\n" and "UNMETERED" in result.stderr
    status = machine.status()
    assert next(c for c in status["components"] if c["name"] == "config")["state"] == "fail"


def test_the_keeper_is_not_a_child_of_the_command_run_execs(machine):
    result = machine.cli("run", "--", sys.executable, "-c",
                         "import os\ntry:\n    os.wait()\nexcept ChildProcessError:\n    print('no children')",
                         timeout=30)
    assert result.stdout == "no children\n"
