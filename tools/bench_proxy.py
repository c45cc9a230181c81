"""Benchmark halton-meter's proxy against a direct connection to the same loopback fake provider.

    python tools/bench_proxy.py [--quick] [--runs N] [--json]

It starts `python -m halton_meter.fakeprovider` and `python -m halton_meter serve` in a temp home,
then measures, alternating proxied and direct samples so drift weighs on both equally:
stream time-to-first-event and small-request latency on kept-alive connections, a fresh
connection (TCP, CONNECT, TLS, one request), requests/s at 16 kept-alive connections (an asyncio
load generator in its own process) and the proxy's peak RSS. With --runs N each figure is the
median of N runs. It prints a table with the targets, or JSON with --json
({"metrics": {name: {direct, proxy, added, ratio}}, "targets": [...], "per_run": [...]}); it
exits 0 whatever the figures are, and 1 only when setup fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
PROVIDER_HOST = "api.anthropic.com"
STARTUP_TIMEOUT_S = 60.0
LOAD_CONNECTIONS = 16


class BenchError(Exception):
    """Setup failed (a process did not start, a connection was refused): nothing to measure."""


@dataclass(frozen=True)
class Plan:
    """How much to measure in one run."""

    stream_samples: int
    small_samples: int
    fresh_samples: int
    load_duration_s: float
    warmup_requests: int = 50


FULL = Plan(stream_samples=1000, small_samples=3000, fresh_samples=300, load_duration_s=5.0)
QUICK = Plan(stream_samples=300, small_samples=1000, fresh_samples=100, load_duration_s=2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the subprocesses are stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with contextlib.ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="halton-bench-")))
            direct, proxy, serve = start_services(workdir, stack, args.config, policies=args.policies)
            runs = []
            for index in range(args.runs):
                if not args.json:
                    print(f"run {index + 1}/{args.runs} ...", file=sys.stderr, flush=True)
                runs.append(measure_run(plan, direct, proxy, serve))
    except (BenchError, OSError) as exc:  # OSError covers ssl.SSLError and socket timeouts
        print(f"bench_proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    summary = summarize(runs)
    if args.json:
        print(json.dumps(as_json(args, plan, summary, runs), indent=2))
    else:
        print_report(args, plan, summary)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure what halton-meter adds over a direct connection.")
    parser.add_argument("--quick", action="store_true", help="fewer samples and 2 s of load (under ~25 s)")
    parser.add_argument("--runs", type=int, default=1, help="repeat the measurement N times; report medians")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--config", metavar="FILE", help="a config.toml for the proxy's home (e.g. to compare "
                                                          "with [bodies] enabled = false)")
    parser.add_argument("--policies", action="store_true",
                        help="with a block budget that never runs out and a model deny rule for every project, "
                             "so every call is checked (its body parsed) before it is forwarded")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


# --- the fake provider and the proxy, as subprocesses -------------------------------------------


@dataclass(frozen=True)
class Route:
    """A way for a client to reach the provider: straight to the fake, or through the proxy."""

    name: str
    port: int
    ca_file: str
    via_proxy: bool

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


def seed_policies(home: Path) -> None:
    """A daily block budget of $1,000,000 and `policy deny 'claude-opus-*'`, for every project."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for command in (("budget", "set", "--daily", "1000000", "--action", "block"),
                    ("policy", "deny", "claude-opus-*")):
        subprocess.run([sys.executable, "-m", "halton_meter", "--home", str(home), *command], cwd=REPO, env=env,
                       check=True, stdout=subprocess.DEVNULL)


def start_services(workdir: Path, stack: contextlib.ExitStack, config: str | None = None,
                   hosts: tuple[str, ...] = (PROVIDER_HOST,), *,
                   policies: bool = False) -> tuple[Route, Route, subprocess.Popen]:
    """Fake provider, then `serve` (home `workdir/home`, log `workdir/serve.err`) sending every
    host in `hosts` to it; both stopped when `stack` unwinds. `policies`: see --policies."""
    fake_out = spawn(stack, workdir, "fake", "-m", "halton_meter.fakeprovider",
                     "--port", "0", "--ca-dir", str(workdir / "fake-ca"))
    banner = wait_for_line(*fake_out, "  CA: ")
    fake_port = int(banner.split("fake provider on 127.0.0.1:")[1].split()[0])
    fake_ca = banner.split("  CA: ")[1].splitlines()[0]
    home = workdir / "home"
    if config is not None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(Path(config).read_text())
    if policies:
        seed_policies(home)
    upstreams = [arg for host in hosts for arg in ("--upstream", f"{host}=127.0.0.1:{fake_port}")]
    serve_out = spawn(stack, workdir, "serve", "-m", "halton_meter", "serve", "--home", str(home), "--api-port", "0",
                      "--port", "0", *upstreams, "--upstream-ca", fake_ca, home=home)
    banner = wait_for_line(*serve_out, "    export NODE_EXTRA_CA_CERTS=")
    proxy_port = int(banner.split("listening on http://127.0.0.1:")[1].split()[0])
    direct = Route("direct", fake_port, fake_ca, via_proxy=False)
    proxy = Route("proxy", proxy_port, str(home / "ca-bundle.pem"), via_proxy=True)
    return direct, proxy, serve_out[0]


def spawn(stack: contextlib.ExitStack, workdir: Path, name: str, *args: str,
          home: Path | None = None) -> tuple[subprocess.Popen, Path, Path]:
    """Start `python ARGS` with output to files (a full pipe must never stall it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if home is not None:
        env["HALTON_METER_HOME"] = str(home)
    out, err = workdir / f"{name}.out", workdir / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, *args], stdout=stdout, stderr=stderr,
                                   stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    stack.callback(stop_process, process)
    return process, out, err


def wait_for_line(process: subprocess.Popen, out: Path, err: Path, prefix: str) -> str:
    """Everything printed up to and including the first whole line starting with `prefix`."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        if any(line.startswith(prefix) for line in text.splitlines(keepends=True) if line.endswith("\n")):
            return text
        if process.poll() is not None:
            raise BenchError(f"{' '.join(process.args[1:4])} exited with {process.returncode}:\n"
                             f"{err.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise BenchError(f"{' '.join(process.args[1:4])} printed no {prefix.strip()!r} line "
                     f"in {STARTUP_TIMEOUT_S:.0f} s.")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def peak_rss_mb(process: subprocess.Popen) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM in /proc/{process.pid}/status")


# --- one run ------------------------------------------------------------------------------------


def measure_run(plan: Plan, direct: Route, proxy: Route, serve: subprocess.Popen) -> dict[str, dict]:
    """metric -> {"direct": value, "proxy": value} for one pass over every measurement."""
    results: dict[str, dict] = {}
    direct_tls, proxy_tls = direct.context(), proxy.context()
    direct_client, proxy_client = connect(direct, direct_tls), connect(proxy, proxy_tls)
    try:
        for _ in range(plan.warmup_requests):
            small_request_ns(direct_client)
            small_request_ns(proxy_client)
        add_percentiles(results, "stream_ttfb", interleave(
            plan.stream_samples, lambda: stream_ttfb_ns(direct_client), lambda: stream_ttfb_ns(proxy_client)))
        add_percentiles(results, "small_request", interleave(
            plan.small_samples, lambda: small_request_ns(direct_client), lambda: small_request_ns(proxy_client)))
    finally:
        direct_client.close()
        proxy_client.close()
    add_percentiles(results, "fresh_connection", interleave(
        plan.fresh_samples, lambda: fresh_request_ns(direct, direct_tls), lambda: fresh_request_ns(proxy, proxy_tls)))
    results["requests_per_s"] = measure_throughput(plan.load_duration_s, direct, proxy)
    results["peak_rss_mb"] = {"direct": None, "proxy": peak_rss_mb(serve)}
    return results


def interleave(samples: int, measure_direct, measure_proxy) -> tuple[list[int], list[int]]:
    """Alternate the two routes in ABBA order, so neither always goes first."""
    direct: list[int] = []
    proxy: list[int] = []
    pair = ((direct, measure_direct), (proxy, measure_proxy))
    for index in range(samples):
        for out, measure in (pair if index % 2 == 0 else pair[::-1]):
            out.append(measure())
    return direct, proxy


def add_percentiles(results: dict, name: str, samples: tuple[list[int], list[int]]) -> None:
    for pct in (50, 99):
        results[f"{name}_p{pct}_ms"] = {route: percentile(values, pct) / 1e6
                                        for route, values in zip(("direct", "proxy"), samples)}


def percentile(values: list[int], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# --- latency: blocking sockets, one request at a time --------------------------------------------


def build_request(stream: bool) -> bytes:
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "Say hi"}]}).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: {PROVIDER_HOST}\r\nUser-Agent: halton-bench/1\r\n"
            "Content-Type: application/json\r\nAnthropic-Version: 2023-06-01\r\n"
            f"X-Fake-Delay-Ms: 0\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


SMALL_REQUEST = build_request(stream=False)
STREAM_REQUEST = build_request(stream=True)
def connect_request(host: str) -> bytes:
    return f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode()


CONNECT_REQUEST = connect_request(PROVIDER_HOST)


class Client:
    """A blocking TLS connection with just enough HTTP/1.1 to read the fake provider's answers."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_head(self) -> bytes:
        head = self._take_until(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"expected 200, got {head.splitlines()[0]!r}")
        return head

    def read_body(self, head: bytes) -> None:
        self._take(content_length(head))

    def wait_first_chunk_byte(self) -> None:
        """Until the first chunk's size line and at least one byte of its data have arrived."""
        while (end := self.buffer.find(b"\r\n")) < 0 or len(self.buffer) <= end + 2:
            self._fill()

    def read_chunked_body(self) -> None:
        while True:
            size = int(self._take_until(b"\r\n").split(b";")[0], 16)
            self._take(size + 2)  # data and its CRLF; after the last chunk, the empty trailer
            if size == 0:
                return

    def close(self) -> None:
        self.sock.close()

    def _take_until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            self._fill()
        return self._take(end + len(marker))

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise BenchError("the server closed a kept-alive connection.")
        self.buffer += data


def content_length(head: bytes) -> int:
    start = head.lower().index(b"\r\ncontent-length:") + len(b"\r\ncontent-length:")
    return int(head[start:head.index(b"\r\n", start)])


def connect(route: Route, context: ssl.SSLContext) -> Client:
    """New TCP connection, CONNECT when proxied, TLS for the provider's name."""
    try:
        sock = socket.create_connection(("127.0.0.1", route.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if route.via_proxy:
            sock.sendall(CONNECT_REQUEST)
            # The proxy sends nothing after its answer until our ClientHello: no over-read.
            answer = b""
            while not answer.endswith(b"\r\n\r\n"):
                answer += sock.recv(4096) or b"\r\n\r\n"
            if not answer.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"CONNECT answered {answer.splitlines()[0]!r}")
        return Client(context.wrap_socket(sock, server_hostname=PROVIDER_HOST))
    except (OSError, ssl.SSLError) as exc:
        raise BenchError(f"cannot reach {PROVIDER_HOST} via {route.name} (port {route.port}): {exc}") from exc


def small_request_ns(client: Client) -> int:
    start = time.perf_counter_ns()
    client.send(SMALL_REQUEST)
    client.read_body(client.read_head())
    return time.perf_counter_ns() - start


def stream_ttfb_ns(client: Client) -> int:
    start = time.perf_counter_ns()
    client.send(STREAM_REQUEST)
    client.read_head()
    client.wait_first_chunk_byte()
    elapsed = time.perf_counter_ns() - start
    client.read_chunked_body()
    return elapsed


def fresh_request_ns(route: Route, context: ssl.SSLContext) -> int:
    start = time.perf_counter_ns()
    client = connect(route, context)
    try:
        client.send(SMALL_REQUEST)
        client.read_body(client.read_head())
        return time.perf_counter_ns() - start
    finally:
        client.close()


# --- throughput: an asyncio load generator in its own process ------------------------------------


def measure_throughput(duration_s: float, direct: Route, proxy: Route) -> dict[str, float]:
    """Requests/s per route over `duration_s` each, in ABBA blocks of half that."""
    totals = {route.name: [0, 0.0] for route in (direct, proxy)}
    for route in (direct, proxy, proxy, direct):
        completed, elapsed_s = run_load_process(route, duration_s / 2)
        totals[route.name][0] += completed
        totals[route.name][1] += elapsed_s
    return {name: completed / elapsed_s for name, (completed, elapsed_s) in totals.items()}


def run_load_process(route: Route, duration_s: float) -> tuple[int, float]:
    """Run the load generator in a spawned process, so it never competes for our GIL."""
    spawn_context = multiprocessing.get_context("spawn")
    receiver, sender = spawn_context.Pipe(duplex=False)
    worker = spawn_context.Process(target=load_worker, args=(route, LOAD_CONNECTIONS, duration_s, sender),
                                   daemon=True)
    worker.start()
    sender.close()
    try:
        if not receiver.poll(duration_s + STARTUP_TIMEOUT_S):
            raise BenchError(f"the load generator for {route.name} did not finish.")
        outcome = receiver.recv()
    except EOFError:
        raise BenchError(f"the load generator for {route.name} died (exit code {worker.exitcode}).") from None
    finally:
        if worker.is_alive():
            worker.terminate()
        worker.join()
    if isinstance(outcome, str):
        raise BenchError(f"load through {route.name} failed: {outcome}")
    return outcome


def load_worker(route: Route, connections: int, duration_s: float, sender) -> None:
    # The parent handles Ctrl-C and terminates us; a second traceback would only be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sender.send(asyncio.run(generate_load(route, connections, duration_s)))
    except Exception as exc:  # noqa: BLE001 - reported by the parent as a setup failure
        sender.send(f"{type(exc).__name__}: {exc}")


async def generate_load(route: Route, connections: int, duration_s: float) -> tuple[int, float]:
    """Completed requests and the seconds they took, over `connections` kept-alive connections."""
    context = route.context()
    streams = await asyncio.gather(*(open_stream(route, context) for _ in range(connections)))
    try:
        await asyncio.gather(*(exchange(reader, writer) for reader, writer in streams))
        start = time.perf_counter()
        counts = await asyncio.gather(*(hammer(reader, writer, start + duration_s)
                                        for reader, writer in streams))
        return sum(counts), time.perf_counter() - start
    finally:
        for _, writer in streams:
            writer.close()


async def open_stream(route: Route, context: ssl.SSLContext, host: str = PROVIDER_HOST):
    """An asyncio TLS connection to `host`: straight to the fake, or CONNECT through the proxy."""
    if not route.via_proxy:
        return await asyncio.open_connection("127.0.0.1", route.port, ssl=context, server_hostname=host)
    reader, writer = await asyncio.open_connection("127.0.0.1", route.port)
    writer.write(connect_request(host))
    answer = await reader.readuntil(b"\r\n\r\n")
    if not answer.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"CONNECT answered {answer.splitlines()[0]!r}")
    await writer.start_tls(context, server_hostname=host)
    return reader, writer


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SMALL_REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"expected 200, got {head.splitlines()[0]!r}")
    await reader.readexactly(content_length(head))


async def hammer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: float) -> int:
    # Pre-built request, no drain (one small request in flight), minimal parsing: the generator
    # must cost far less CPU than what it measures.
    completed, clock, request = 0, time.perf_counter, SMALL_REQUEST
    while clock() < deadline:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(content_length(head))
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"expected 200, got {head.splitlines()[0]!r}")
        completed += 1
    return completed


# --- summary and report -------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    digits: int
    across_runs: Callable[[list[float]], float] = statistics.median


@dataclass(frozen=True)
class Target:
    key: str
    compares: str  # "added" (proxy - direct) or "proxy"
    limit: float
    at_most: bool
    text: str

    def verdict(self, summary: dict) -> tuple[float | None, bool | None]:
        value = summary[self.key][self.compares]
        if value is None:
            return None, None
        return value, value <= self.limit if self.at_most else value >= self.limit


METRICS = (
    Metric("stream_ttfb_p50_ms", "stream TTFB p50 (ms)", 3),
    Metric("stream_ttfb_p99_ms", "stream TTFB p99 (ms)", 3),
    Metric("small_request_p50_ms", "small request p50 (ms)", 3),
    Metric("small_request_p99_ms", "small request p99 (ms)", 3),
    Metric("fresh_connection_p50_ms", "fresh conn+TLS+request p50 (ms)", 3),
    Metric("fresh_connection_p99_ms", "fresh conn+TLS+request p99 (ms)", 3),
    Metric("requests_per_s", f"requests/s at {LOAD_CONNECTIONS} connections", 0),
    # VmHWM only ever rises, so the figure after the last run is the peak of the whole benchmark.
    Metric("peak_rss_mb", "peak RSS of serve (MB)", 1, across_runs=max),
)
TARGETS = (
    Target("stream_ttfb_p50_ms", "added", 1.0, at_most=True, text="added <= 1 ms"),
    Target("small_request_p50_ms", "added", 1.0, at_most=True, text="added <= 1 ms"),
    Target("requests_per_s", "proxy", 1500.0, at_most=False, text="proxy >= 1,500"),
    Target("peak_rss_mb", "proxy", 40.0, at_most=True, text="proxy <= 40 MB"),
)


def summarize(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per metric: each route's median over runs (RSS: its peak), and the proxy's cost from those."""
    summary = {}
    for metric in METRICS:
        direct, proxy = (across_runs(metric, [run[metric.key][route] for run in runs])
                         for route in ("direct", "proxy"))
        both = direct is not None and proxy is not None
        summary[metric.key] = {
            "direct": direct, "proxy": proxy,
            "added": proxy - direct if both else None,
            "ratio": proxy / direct if both and direct else None,
        }
    return summary


def across_runs(metric: Metric, values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return metric.across_runs(present) if present else None


def print_report(args: argparse.Namespace, plan: Plan, summary: dict) -> None:
    print(f"halton-meter proxy vs direct  ({'quick' if args.quick else 'full'}, "
          f"median of {args.runs} run{'s' * (args.runs > 1)}; Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs)")
    print(f"samples per route per run: stream {plan.stream_samples}, small {plan.small_samples}, "
          f"fresh {plan.fresh_samples}; load {plan.load_duration_s:g} s per route; "
          "RSS = serve's VmHWM after the last run")
    targets = {target.key: target for target in TARGETS}
    rows = [("metric", "direct", "proxy", "added", "ratio", "target", "result")]
    for metric in METRICS:
        figures = summary[metric.key]
        target = targets.get(metric.key)
        verdict = target.verdict(summary)[1] if target else None
        rows.append((
            metric.label,
            fmt(figures["direct"], metric.digits),
            fmt(figures["proxy"], metric.digits),
            fmt(figures["added"], metric.digits, signed=True),
            "-" if figures["ratio"] is None else f"{figures['ratio']:.2f}x",
            target.text if target else "",
            "" if verdict is None else ("PASS" if verdict else "MISS"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:5], widths[1:5])]
        cells += [row[5].ljust(widths[5]), row[6]]
        print("  ".join(cells).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:{'+' if signed else ''},.{digits}f}"


def as_json(args: argparse.Namespace, plan: Plan, summary: dict, runs: list[dict]) -> dict:
    return {
        "mode": "quick" if args.quick else "full",
        "runs": args.runs,
        "plan": plan.__dict__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "metrics": summary,
        "targets": [
            {"metric": target.key, "compares": target.compares, "limit": target.limit,
             "at_most": target.at_most, "value": value, "pass": verdict}
            for target in TARGETS
            for value, verdict in [target.verdict(summary)]
        ],
        "per_run": runs,
    }


if __name__ == "__main__":
    sys.exit(main())
