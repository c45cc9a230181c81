"""Soak halton-meter: hundreds of concurrent streams and a thousand small calls for minutes.

    python tools/soak.py [--duration 300] [--streams 200] [--small 1000] [--workers 2]
                         [--warmup S] [--seed N] [--config FILE] [--json]

Starts the fake provider and `python -m halton_meter serve` (a fresh home) as processes of their
own, then drives them from asyncio client processes: `--streams` streaming calls kept in flight
for the whole duration (SSE paced 150-350 ms an event, 2-8 s a stream; a slot makes 1-3 calls on
one connection, then opens a fresh one) and `--small` non-streaming calls spread evenly over it
(every third on a fresh connection, the rest on kept-alive ones), split between
api.anthropic.com and api.openai.com. A warm-up at full load comes first; then every connection closes and the
idle proxy is measured (the baseline); after the run everything closes again and it is measured
once more. Serve's descriptors, RSS and threads are sampled every 5 s throughout.

It exits 1 if a check fails: a client call failed; the calls and the rows differ (matched one to
one by the provider's request id, per phase); a row lacks exact usage, the expected tokens or a
cost; a `proxy_error` row or a lost row; connections, descriptors or RSS did not come back to the
baseline; serve logged a warning or did not exit 0. --json prints the figures, the checks and
every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import random
import signal
import sqlite3
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_proxy as bp  # noqa: E402

SAMPLE_INTERVAL_S = 5.0
CALL_TIMEOUT_S = 60.0  # a stream lasts at most ~8 s; anything near this is a hang, not noise
CLOSE_TIMEOUT_S = 10.0
QUIESCE_TIMEOUT_S = 60.0
SETTLE_S = 2.0  # descriptors unchanged this long: every connection the clients had is closed
ROWS_TIMEOUT_S = 30.0
RAMP_S = 2.0  # stream slots start spread over this, not as one burst of 200 handshakes
# A stream: 8-16 text deltas 150-350 ms apart, so a few seconds with real gaps between events.
EVENTS_RANGE = (8, 16)
DELAY_MS_RANGE = (150, 350)
# Idle descriptors may differ by a few: the first API read leaves one on db.sqlite open (SQLite
# defers closing it while the writer's connection holds a lock). A leak of one per connection
# would be thousands.
FD_SLACK = 5
# Idle RSS after a full-load warm-up vs idle RSS after the run. Measured at 200 streams: +3 MiB
# after 30 s, +6 to +11.5 MiB after 120-300 s (4-15% of an ~80 MiB baseline), all of it memory
# glibc's malloc keeps after it was freed (malloc_trim gives it back; bytes in use and Python's
# allocations stay flat). A quarter of the baseline (~20 MiB) leaves room for that and still
# fails a leak of a connection's TLS state (tens of KiB) or of 1.5 KiB per call over 300 s.
RSS_GROWTH_LIMIT_SHARE = 0.25
MIN_IN_FLIGHT_SHARE = 0.9
# serve logs key=value lines at INFO for start-up only; under a soak anything louder is a fault.
LOG_MARKERS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback", "proxy_error", "never retrieved",
               "Task was destroyed")


@dataclass(frozen=True)
class Dialect:
    """One provider's wire format, and the usage the fake provider reports for it."""

    name: str
    host: str
    path: str
    model: str
    small_usage: tuple[int, int]  # (input, output) tokens of a non-streaming answer
    stream_input_tokens: int  # a stream's output is its text deltas + 1
    stream_end: bytes  # in the last frame of a complete stream
    frames_besides_deltas: int  # the fake's stream frames around the text deltas (for its pacing)

    def request(self, project: str, marker: str, *, events: int = 0, delay_ms: int = 0) -> bytes:
        stream = events > 0
        payload = {"model": self.model, "max_tokens": 64, "stream": stream,
                   "messages": [{"role": "user", "content": f"soak call {marker}"}]}
        headers = [("Host", self.host), ("User-Agent", "halton-soak/1"), ("Content-Type", "application/json"),
                   ("X-Halton-Project", project)]
        if self.name == "anthropic":
            headers.append(("Anthropic-Version", "2023-06-01"))
        elif stream:
            payload["stream_options"] = {"include_usage": True}
        if stream:
            headers += [("X-Fake-Events", str(events)), ("X-Fake-Delay-Ms", str(delay_ms))]
        body = json.dumps(payload).encode()
        head = "".join(f"{name}: {value}\r\n" for name, value in [*headers, ("Content-Length", str(len(body)))])
        return f"POST {self.path} HTTP/1.1\r\n{head}\r\n".encode() + body

    def expected_usage(self, events: int) -> tuple[int, int]:
        return (self.stream_input_tokens, events + 1) if events else self.small_usage


DIALECTS = (
    Dialect("anthropic", "api.anthropic.com", "/v1/messages", "claude-sonnet-4-5", (12, 9), 20, b"message_stop", 6),
    Dialect("openai", "api.openai.com", "/v1/chat/completions", "gpt-4.1", (50, 6), 50, b"[DONE]", 3),
)
HOSTS = tuple(dialect.host for dialect in DIALECTS)


@dataclass(frozen=True)
class Plan:
    duration_s: float = 300.0
    streams: int = 200
    small: int = 1000
    workers: int = 2
    warmup_s: float | None = None  # default: a tenth of the duration, 8-30 s
    seed: int = 1
    config: str | None = None  # a config.toml for serve's home

    @property
    def warmup_duration_s(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(30.0, max(8.0, self.duration_s / 10))


@dataclass(frozen=True)
class Phase:
    """One load phase: its project name tells its rows apart in the ledger."""

    project: str
    duration_s: float
    streams: int
    small: int


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(duration_s=args.duration, streams=args.streams, small=args.small, workers=args.workers,
                warmup_s=args.warmup, seed=args.seed, config=args.config)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the subprocesses stop
    progress = None if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        report = run_soak(plan, progress)
    except (bp.BenchError, OSError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if all(check["pass"] for check in report["checks"]) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Soak the proxy: concurrent streams and small calls for minutes.")
    parser.add_argument("--duration", type=float, default=300.0, metavar="SECONDS", help="measured run (300)")
    parser.add_argument("--streams", type=int, default=200, help="streaming calls kept in flight (200)")
    parser.add_argument("--small", type=int, default=1000, help="non-streaming calls spread over the run (1000)")
    parser.add_argument("--workers", type=int, default=2, help="client processes (2)")
    parser.add_argument("--warmup", type=float, metavar="SECONDS", help="full-load warm-up (a tenth, 8-30 s)")
    parser.add_argument("--seed", type=int, default=1, help="seed for stream lengths and pacing")
    parser.add_argument("--config", metavar="FILE", help="a config.toml for the proxy's home (e.g. to compare "
                                                          "with [bodies] enabled = false)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.streams < 1 or args.small < 0 or args.workers < 1:
        parser.error("--duration must be positive, --streams and --workers at least 1, --small not negative")
    return args


# --- the soak -----------------------------------------------------------------------------------


def run_soak(plan: Plan, progress=None) -> dict:
    """Start the services, warm up, measure the run, verify the ledger; the report as a dict."""
    say = progress or (lambda text: None)
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="halton-soak-")))
        _, route, serve = bp.start_services(workdir, stack, plan.config, hosts=HOSTS)
        api = ApiClient(int((workdir / "home" / "run" / "api.port").read_text()))
        monitor = Monitor(serve.pid)
        monitor.start()
        warmup = Phase("soak-warmup", plan.warmup_duration_s, plan.streams,
                       round(plan.small * plan.warmup_duration_s / plan.duration_s))
        say(f"warm-up: {warmup.duration_s:g} s at full load")
        warm = run_phase(plan, warmup, route, monitor)
        baseline = quiesce(api, monitor, "baseline")
        say(f"baseline: {baseline['fds']} fds, {baseline['rss_kib'] / 1024:.1f} MiB; "
            f"run: {plan.duration_s:g} s, {plan.streams} streams, {plan.small} small calls")
        cpu_start = cpu_seconds(serve.pid)
        run = run_phase(plan, Phase("soak", plan.duration_s, plan.streams, plan.small), route, monitor)
        serve_cpu_s = cpu_seconds(serve.pid) - cpu_start
        end = quiesce(api, monitor, "end")
        monitor.stop()
        say("verifying the ledger")
        db = workdir / "home" / "db.sqlite"
        for result in (warm, run):
            result["rows"] = wait_for_rows(db, result["project"], len(result["calls"]))
        proxy_errors = count_rows(db, "outcome = 'proxy_error'")
        health = api.health()
        peak_rss_kib = round(bp.peak_rss_mb(serve) * 1024)
        bp.stop_process(serve)
        serve_log = (workdir / "serve.err").read_text(errors="replace")
    figures = summarize(run, baseline, end, monitor.samples, serve_cpu_s, peak_rss_kib, health)
    figures["load_average_before"], figures["load_average_after"] = load_before, os.getloadavg()
    checks = judge(plan, (warm, run), baseline, end, proxy_errors, health, serve_log, serve.returncode)
    return {"plan": asdict(plan), "figures": figures, "checks": checks, "samples": monitor.samples}


def run_phase(plan: Plan, phase: Phase, route: bp.Route, monitor: Monitor) -> dict:
    """Run the client processes for one phase; their calls, errors and figures merged."""
    monitor.phase = phase.project
    spawn = multiprocessing.get_context("spawn")
    processes, receivers = [], []
    for index in range(plan.workers):
        receiver, sender = spawn.Pipe(duplex=False)
        spec = WorkerSpec(route, phase, index, plan.workers, plan.seed)
        process = spawn.Process(target=client_worker, args=(spec, sender), daemon=True)
        process.start()
        sender.close()
        processes.append(process)
        receivers.append(receiver)
    try:
        results = [collect(receiver, process, phase.duration_s + CALL_TIMEOUT_S + bp.STARTUP_TIMEOUT_S)
                   for receiver, process in zip(receivers, processes)]
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    monitor.phase = "idle"
    return {"project": phase.project, **merge(results)}


def collect(receiver, process, timeout_s: float) -> dict:
    try:
        if not receiver.poll(timeout_s):
            raise bp.BenchError(f"client worker {process.pid} did not finish in {timeout_s:.0f} s.")
        outcome = receiver.recv()
    except EOFError:
        raise bp.BenchError(f"client worker {process.pid} died (exit code {process.exitcode}).") from None
    if isinstance(outcome, str):
        raise bp.BenchError(f"client worker failed: {outcome}")
    return outcome


def merge(results: list[dict]) -> dict:
    return {
        "calls": [call for result in results for call in result["calls"]],
        "errors": [error for result in results for error in result["errors"]],
        "in_flight_mean": sum(result["in_flight_mean"] for result in results),
        "elapsed_s": max(result["elapsed_s"] for result in results),
        "client_cpu_s": [round(result["cpu_s"], 1) for result in results],
        "client_lag_p99_ms": max(result["lag_p99_ms"] for result in results),
    }


def quiesce(api: ApiClient, monitor: Monitor, label: str) -> dict:
    """Once the clients are gone: wait until serve's descriptors stop changing, sample it, then
    ask how many connections it still counts open (after the sample: a scrape allocates)."""
    deadline = time.monotonic() + QUIESCE_TIMEOUT_S
    previous = None
    while (fds := fd_count(monitor.pid)) != previous and time.monotonic() < deadline:
        previous = fds
        time.sleep(SETTLE_S)
    return {**monitor.sample(label), "open_connections": api.open_connections()}


# --- the serve process, seen from outside -------------------------------------------------------


class Monitor:
    """Samples a process's descriptors, RSS and threads every few seconds in a daemon thread."""

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.phase = "idle"
        self.samples: list[dict] = []
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self, phase: str | None = None) -> dict:
        status = proc_status(self.pid)
        sample = {"t_s": round(time.monotonic() - self._started, 1), "phase": phase or self.phase,
                  "fds": fd_count(self.pid), "rss_kib": status["VmRSS"], "threads": status["Threads"],
                  # Heap vs mapped files (SQLite's WAL index, shared libraries): where growth lives.
                  "rss_anon_kib": status["RssAnon"], "rss_file_kib": status["RssFile"] + status["RssShmem"]}
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # serve died: the checks will say so
            while not self._stop.wait(self.interval_s):
                self.sample()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    # /proc/PID/stat: utime and stime are fields 14 and 15, after the parenthesised name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ApiClient:
    """The proxy's local API: /health for lost rows, /metrics for open connections."""

    def __init__(self, port: int) -> None:
        self.port = port

    def health(self) -> dict:
        return json.loads(self._get("/health"))

    def open_connections(self) -> int:
        for line in self._get("/metrics").splitlines():
            if line.startswith("halton_meter_open_connections "):
                return int(float(line.split()[1]))
        raise bp.BenchError("/metrics has no halton_meter_open_connections gauge.")

    def _get(self, path: str) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read().decode()
            if response.status != 200:
                raise bp.BenchError(f"GET {path} answered {response.status}: {body[:200]}")
            return body
        finally:
            connection.close()


def wait_for_rows(db: Path, project: str, expected: int) -> list[dict]:
    """The project's rows, once there are `expected` of them (or the wait is over)."""
    deadline = time.monotonic() + ROWS_TIMEOUT_S
    while count_rows(db, "project = ?", project) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute(
            "SELECT request_id, outcome, is_stream, usage_status, input_tokens, output_tokens, cost_nanousd "
            "FROM calls WHERE project = ?", (project,))]
    finally:
        connection.close()


def count_rows(db: Path, where: str, *params) -> int:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return connection.execute(f"SELECT count(*) FROM calls WHERE {where}", params).fetchone()[0]
    finally:
        connection.close()


# --- the clients: asyncio in spawned processes --------------------------------------------------


class Call(NamedTuple):
    """One completed call, as the client saw it."""

    kind: str  # stream | small
    dialect: str
    request_id: str | None
    input_tokens: int  # what the row must say
    output_tokens: int
    ttfb_ms: float  # request written -> first body byte
    total_ms: float  # request written -> last byte
    paced_ms: int  # a stream's frames times the fake's delay between them (0 for small calls)


@dataclass(frozen=True)
class WorkerSpec:
    route: bp.Route
    phase: Phase
    index: int
    workers: int
    seed: int

    @property
    def streams(self) -> int:
        return len(range(self.index, self.phase.streams, self.workers))

    def small_schedule(self) -> list[tuple[float, int]]:
        """(seconds after the start, call number) of this worker's share, spread evenly overall."""
        spacing = self.phase.duration_s / max(1, self.phase.small)
        return [((number + 0.5) * spacing, number) for number in range(self.index, self.phase.small, self.workers)]


def client_worker(spec: WorkerSpec, sender) -> None:
    # The parent handles Ctrl-C and terminates us; a second traceback would only be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sender.send(asyncio.run(Driver(spec).run()))
    except Exception as exc:  # noqa: BLE001 - reported by the parent as a setup failure
        sender.send(f"{type(exc).__name__}: {exc}")


class CallFailed(Exception):
    """The proxy's answer was not a complete 200 response."""


class Driver:
    """One client process: its stream slots and its share of the small calls, on one event loop."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.context = spec.route.context()
        self.random = random.Random(spec.seed * 1000 + spec.index)
        self.calls: list[Call] = []
        self.errors: list[tuple[str, str]] = []
        self.in_flight = 0
        self.markers = 0
        self.start = self.deadline = 0.0

    async def run(self) -> dict:
        self.start = time.monotonic()
        self.deadline = self.start + self.spec.phase.duration_s
        watcher = asyncio.create_task(self._watch())
        await asyncio.gather(*(self._stream_slot() for _ in range(self.spec.streams)), self._small_calls())
        watcher.cancel()
        lag_ms, in_flight = await watcher
        return {"calls": self.calls, "errors": self.errors, "cpu_s": time.process_time(),
                "elapsed_s": time.monotonic() - self.start, "lag_p99_ms": bp.percentile(lag_ms or [0.0], 99),
                "in_flight_mean": sum(in_flight) / len(in_flight) if in_flight else 0.0}

    def _marker(self) -> str:
        self.markers += 1
        return f"{self.spec.phase.project}-{self.spec.index}-{self.markers}"

    async def _stream_slot(self) -> None:
        await asyncio.sleep(self.random.uniform(0, min(RAMP_S, self.spec.phase.duration_s / 4)))
        while time.monotonic() < self.deadline:
            dialect = self.random.choice(DIALECTS)
            try:
                reader, writer = await self._open(dialect)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                await self._failed("connect", exc)
                continue
            try:
                # The first call always goes out: every connection carries calls (one closed right
                # after its handshake is another client, tested on its own in test_soak.py).
                for number in range(self.random.randint(1, 3)):
                    if number and time.monotonic() >= self.deadline:
                        break
                    await self._stream_call(dialect, reader, writer)
            except (OSError, asyncio.IncompleteReadError, CallFailed, TimeoutError, ValueError) as exc:
                await self._failed("stream", exc)
            finally:
                await _close(writer)

    async def _stream_call(self, dialect: Dialect, reader, writer) -> None:
        events = self.random.randint(*EVENTS_RANGE)
        delay_ms = self.random.randint(*DELAY_MS_RANGE)
        request = dialect.request(self.spec.phase.project, self._marker(), events=events, delay_ms=delay_ms)
        self.in_flight += 1
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                sent = time.monotonic()
                writer.write(request)
                request_id = _request_id(await _read_head(reader))
                first_byte, last_frame = await _read_chunks(reader)
                done = time.monotonic()
        finally:
            self.in_flight -= 1
        if dialect.stream_end not in last_frame:
            raise CallFailed(f"stream ended without {dialect.stream_end!r}: {last_frame[-80:]!r}")
        paced_ms = (events + dialect.frames_besides_deltas) * delay_ms
        self.calls.append(Call("stream", dialect.name, request_id, *dialect.expected_usage(events),
                               (first_byte - sent) * 1000, (done - sent) * 1000, paced_ms))

    async def _small_calls(self) -> None:
        pools: dict[str, list] = {dialect.host: [] for dialect in DIALECTS}
        tasks = []
        for offset_s, number in self.spec.small_schedule():
            await asyncio.sleep(max(0.0, self.start + offset_s - time.monotonic()))
            tasks.append(asyncio.create_task(self._small_call(number, pools)))
        await asyncio.gather(*tasks)
        for pool in pools.values():
            await asyncio.gather(*(_close(writer) for _, writer in pool))

    async def _small_call(self, number: int, pools: dict[str, list]) -> None:
        dialect = DIALECTS[number % len(DIALECTS)]
        fresh = number % 3 == 0
        pool = pools[dialect.host]
        connection = None
        try:
            connection = pool.pop() if pool and not fresh else await self._open(dialect)
            reader, writer = connection
            async with asyncio.timeout(CALL_TIMEOUT_S):
                sent = time.monotonic()
                writer.write(dialect.request(self.spec.phase.project, self._marker()))
                head = await _read_head(reader)
                await reader.readexactly(bp.content_length(head))
                done = time.monotonic()
        except (OSError, asyncio.IncompleteReadError, CallFailed, TimeoutError, ValueError) as exc:
            if connection is not None:
                await _close(connection[1])
            await self._failed("small", exc)
            return
        self.calls.append(Call("small", dialect.name, _request_id(head), *dialect.expected_usage(0),
                               (done - sent) * 1000, (done - sent) * 1000, 0))
        if fresh:
            await _close(writer)
        else:
            pool.append(connection)

    async def _open(self, dialect: Dialect):
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return await bp.open_stream(self.spec.route, self.context, dialect.host)

    async def _failed(self, kind: str, exc: BaseException) -> None:
        self.errors.append((kind, f"{type(exc).__name__}: {exc}"[:300]))
        await asyncio.sleep(0.5)  # a dead proxy must not turn the slot into a busy loop

    async def _watch(self) -> tuple[list[float], list[int]]:
        """Event-loop lag (is this client keeping up?) and streams in flight once all slots run."""
        lag_ms, in_flight, tick = [], [], 0.1
        steady = self.start + min(RAMP_S, self.spec.phase.duration_s / 4) + 1.0
        try:
            while True:
                before = time.monotonic()
                await asyncio.sleep(tick)
                now = time.monotonic()
                lag_ms.append((now - before - tick) * 1000)
                if steady <= now < self.deadline:
                    in_flight.append(self.in_flight)
        except asyncio.CancelledError:
            return lag_ms, in_flight


async def _read_head(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise CallFailed(f"answered {head.splitlines()[0]!r}")
    return head


def _request_id(head: bytes) -> str | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"request-id":
            return value.strip().decode()
    return None


async def _read_chunks(reader) -> tuple[float, bytes]:
    """Read a chunked body to its end: when its first data arrived, and its last chunk."""
    first_byte, last = None, b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return first_byte if first_byte is not None else time.monotonic(), last
        if first_byte is None:
            first_byte = time.monotonic()
        last = data


async def _close(writer) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)


# --- verdicts and the report --------------------------------------------------------------------


def verify_rows(calls: list[Call], rows: list[dict]) -> dict[str, list[str]]:
    """Calls and rows matched by request id: what is missing, extra, doubled or wrong."""
    by_id: dict[str | None, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["request_id"], []).append(row)
    problems: dict[str, list[str]] = {"missing": [], "extra": [], "duplicate": [], "wrong": []}
    called = set()
    for call in calls:
        called.add(call.request_id)
        matched = by_id.get(call.request_id, [])
        if not matched:
            problems["missing"].append(f"{call.kind} {call.request_id}")
            continue
        if len(matched) > 1:
            problems["duplicate"].append(f"{call.request_id} x{len(matched)}")
        row = matched[0]
        expected = {"outcome": "ok", "is_stream": int(call.kind == "stream"), "usage_status": "exact",
                    "input_tokens": call.input_tokens, "output_tokens": call.output_tokens}
        wrong = {name: row[name] for name, value in expected.items() if row[name] != value}
        if not row["cost_nanousd"]:
            wrong["cost_nanousd"] = row["cost_nanousd"]
        if wrong:
            problems["wrong"].append(f"{call.request_id}: {wrong} (expected {expected})")
    problems["extra"] = [f"{row['request_id']} {row['outcome']}" for row in rows if row["request_id"] not in called]
    return problems


def judge(plan: Plan, results: tuple[dict, ...], baseline: dict, end: dict, proxy_errors: int,
          health: dict, serve_log: str, serve_exit: int | None) -> list[dict]:
    """Every check with its verdict and what it saw; `results` are the phases, the measured run last."""
    checks = []

    def check(name: str, passed: bool, detail: str) -> None:
        checks.append({"name": name, "pass": bool(passed), "detail": detail})

    run = results[-1]
    errors = [error for result in results for error in result["errors"]]
    check("every client call succeeded", not errors, f"{len(errors)} errors: {errors[:5]}")
    small_done = sum(1 for call in run["calls"] if call.kind == "small")
    check("all small calls made", small_done == plan.small, f"{small_done} of {plan.small}")
    check("streams kept in flight", run["in_flight_mean"] >= MIN_IN_FLIGHT_SHARE * plan.streams,
          f"mean {run['in_flight_mean']:.1f} of {plan.streams}")
    for result in results:
        problems = verify_rows(result["calls"], result["rows"])
        matched = not (problems["missing"] or problems["extra"] or problems["duplicate"])
        check(f"one row per call ({result['project']})", matched and len(result["rows"]) == len(result["calls"]),
              f"{len(result['calls'])} calls, {len(result['rows'])} rows; "
              + "; ".join(f"{len(v)} {k}: {v[:3]}" for k, v in problems.items() if k != "wrong" and v))
        check(f"exact usage, tokens and a cost on every row ({result['project']})", not problems["wrong"],
              f"{len(problems['wrong'])} wrong: {problems['wrong'][:3]}")
    check("no proxy_error rows", proxy_errors == 0, f"{proxy_errors} rows")
    check("no rows lost (/health)", health["rows_lost"] == 0, f"rows_lost={health['rows_lost']}")
    check("every connection closed at the end", end["open_connections"] == 0,
          f"{end['open_connections']} still open")
    check(f"descriptors back to baseline (+{FD_SLACK})", end["fds"] <= baseline["fds"] + FD_SLACK,
          f"baseline {baseline['fds']}, end {end['fds']}")
    growth = end["rss_kib"] - baseline["rss_kib"]
    check(f"RSS growth at most {RSS_GROWTH_LIMIT_SHARE:.0%} of the baseline",
          growth <= RSS_GROWTH_LIMIT_SHARE * baseline["rss_kib"],
          f"baseline {baseline['rss_kib'] / 1024:.1f} MiB, end {end['rss_kib'] / 1024:.1f} MiB "
          f"({growth / 1024:+.1f} MiB)")
    noisy = [line for line in serve_log.splitlines() if any(marker in line for marker in LOG_MARKERS)]
    check("serve log clean", not noisy, f"{len(noisy)} lines like {noisy[:3]}")
    check("serve exited 0", serve_exit == 0, f"exit code {serve_exit}")
    return checks


def summarize(run: dict, baseline: dict, end: dict, samples: list[dict], serve_cpu_s: float,
              peak_rss_kib: int, health: dict) -> dict:
    streams = [call for call in run["calls"] if call.kind == "stream"]
    small = [call for call in run["calls"] if call.kind == "small"]
    loaded = [sample for sample in samples if sample["phase"] == "soak"] or [end]

    def pct(values: list[float], p: int) -> float | None:
        return round(bp.percentile(values, p), 1) if values else None

    overrun = [call.total_ms - call.paced_ms for call in streams]
    return {
        "calls": len(run["calls"]), "streams": len(streams), "small": len(small),
        "elapsed_s": round(run["elapsed_s"], 1), "calls_per_s": round(len(run["calls"]) / run["elapsed_s"], 1),
        "streams_in_flight_mean": round(run["in_flight_mean"], 1),
        "rows": len(run["rows"]), "rows_written": health["rows_written"], "rows_lost": health["rows_lost"],
        "client_errors": len(run["errors"]),
        "stream_ttfb_ms": {"p50": pct([call.ttfb_ms for call in streams], 50),
                           "p99": pct([call.ttfb_ms for call in streams], 99)},
        "stream_overrun_ms": {"p50": pct(overrun, 50), "p99": pct(overrun, 99)},
        "small_latency_ms": {"p50": pct([call.total_ms for call in small], 50),
                             "p99": pct([call.total_ms for call in small], 99)},
        "fds": {"baseline": baseline["fds"], "peak": max(s["fds"] for s in loaded), "end": end["fds"]},
        "rss_mib": {"baseline": round(baseline["rss_kib"] / 1024, 1),
                    "peak_under_load": round(max(s["rss_kib"] for s in loaded) / 1024, 1),
                    "peak_vmhwm": round(peak_rss_kib / 1024, 1), "end": round(end["rss_kib"] / 1024, 1),
                    "trend_under_load_per_min": round(trend_per_min(loaded, "rss_kib") / 1024, 2)},
        "threads": {"baseline": baseline["threads"], "peak": max(s["threads"] for s in loaded),
                    "end": end["threads"]},
        "serve_cpu_percent": round(100 * serve_cpu_s / run["elapsed_s"], 1),
        "client_cpu_s": run["client_cpu_s"], "client_lag_p99_ms": round(run["client_lag_p99_ms"], 1),
    }


def trend_per_min(samples: list[dict], name: str) -> float:
    """Least-squares slope of a sampled figure, per minute: creep shows here before it adds up."""
    if len(samples) < 2:
        return 0.0
    times = [sample["t_s"] for sample in samples]
    values = [sample[name] for sample in samples]
    mean_t, mean_v = sum(times) / len(times), sum(values) / len(values)
    spread = sum((t - mean_t) ** 2 for t in times)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values)) / spread if spread else 0.0


def format_report(report: dict) -> str:
    plan, figures = report["plan"], report["figures"]
    fds, rss, threads = figures["fds"], figures["rss_mib"], figures["threads"]
    lines = [
        f"halton-meter soak: {plan['duration_s']:g} s, {plan['streams']} concurrent streams, "
        f"{plan['small']} small calls, {plan['workers']} client processes",
        "load average (1/5/15 min): before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
            *figures["load_average_before"], *figures["load_average_after"]),
        f"calls          {figures['calls']} ({figures['streams']} streams, {figures['small']} small) in "
        f"{figures['elapsed_s']} s = {figures['calls_per_s']}/s; streams in flight (mean) "
        f"{figures['streams_in_flight_mean']}",
        f"rows           {figures['rows']} for the run ({figures['rows_written']} written with the warm-up), "
        f"{figures['rows_lost']} lost; "
        f"client errors {figures['client_errors']}",
        f"stream TTFB    p50 {figures['stream_ttfb_ms']['p50']} ms, p99 {figures['stream_ttfb_ms']['p99']} ms; "
        f"stream past its pacing p50 {figures['stream_overrun_ms']['p50']} ms, "
        f"p99 {figures['stream_overrun_ms']['p99']} ms",
        f"small call     p50 {figures['small_latency_ms']['p50']} ms, p99 {figures['small_latency_ms']['p99']} ms",
        f"descriptors    baseline {fds['baseline']}, peak {fds['peak']}, end {fds['end']}",
        f"RSS (MiB)      baseline {rss['baseline']}, peak under load {rss['peak_under_load']}, "
        f"VmHWM {rss['peak_vmhwm']}, end {rss['end']}; under load {rss['trend_under_load_per_min']:+} MiB/min",
        f"threads        baseline {threads['baseline']}, peak {threads['peak']}, end {threads['end']}",
        f"CPU            serve {figures['serve_cpu_percent']}% of one core; clients {figures['client_cpu_s']} s; "
        f"client loop lag p99 {figures['client_lag_p99_ms']} ms",
        "",
    ]
    lines += [f"{'PASS' if check['pass'] else 'FAIL'}  {check['name']}"
              + ("" if check["pass"] else f": {check['detail']}") for check in report["checks"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
