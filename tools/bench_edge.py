"""What the edge adds: the same calls through the edge and straight to the daemon behind it.

    python tools/bench_edge.py [--runs 3] [--samples 1000]

Starts the fake provider, `halton-meter daemon` and `halton-meter edge` in a temp home, then
measures, alternating the two routes: a fresh connection (TCP + CONNECT + TLS + one request,
where the edge accepts and hands the socket over), and streaming TTFB and a small request on a
kept-alive connection (after the hand-off the edge is out of the byte path). Medians of --runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_proxy as bp  # noqa: E402


def start(workdir: Path, stack: contextlib.ExitStack) -> tuple[bp.Route, bp.Route]:
    fake_out = bp.spawn(stack, workdir, "fake", "-m", "halton_meter.fakeprovider",
                        "--port", "0", "--ca-dir", str(workdir / "fake-ca"))
    banner = bp.wait_for_line(*fake_out, "  CA: ")
    fake_port = int(banner.split("fake provider on 127.0.0.1:")[1].split()[0])
    fake_ca = banner.split("  CA: ")[1].splitlines()[0]
    home = workdir / "home"
    upstream = ["--upstream", f"{bp.PROVIDER_HOST}=127.0.0.1:{fake_port}", "--upstream-ca", fake_ca]
    daemon_out = bp.spawn(stack, workdir, "daemon", "-m", "halton_meter", "daemon", "--home", str(home), "--api-port", "0",
                          *upstream, home=home)
    banner = bp.wait_for_line(*daemon_out, "    export NODE_EXTRA_CA_CERTS=")
    daemon_port = int(banner.split("listening on http://127.0.0.1:")[1].split()[0])
    edge_out = bp.spawn(stack, workdir, "edge", "-m", "halton_meter", "edge", "--home", str(home),
                        "--port", "0", *upstream, home=home)
    banner = bp.wait_for_line(*edge_out, "  daemon hand-off")
    edge_port = int(banner.split("listening on http://127.0.0.1:")[1].split()[0])
    bundle = str(home / "ca-bundle.pem")
    return (bp.Route("daemon", daemon_port, bundle, via_proxy=True),
            bp.Route("edge", edge_port, bundle, via_proxy=True))


def measure(daemon: bp.Route, edge: bp.Route, samples: int) -> dict[str, tuple[float, float]]:
    out = {}
    d_tls, e_tls = daemon.context(), edge.context()
    d, e = bp.interleave(samples // 3, lambda: bp.fresh_request_ns(daemon, d_tls),
                         lambda: bp.fresh_request_ns(edge, e_tls))
    out["fresh connection p50 (ms)"] = (bp.percentile(d, 50) / 1e6, bp.percentile(e, 50) / 1e6)
    d_client, e_client = bp.connect(daemon, d_tls), bp.connect(edge, e_tls)
    try:
        for _ in range(50):
            bp.small_request_ns(d_client)
            bp.small_request_ns(e_client)
        d, e = bp.interleave(samples, lambda: bp.stream_ttfb_ns(d_client), lambda: bp.stream_ttfb_ns(e_client))
        out["stream TTFB p50 (ms)"] = (bp.percentile(d, 50) / 1e6, bp.percentile(e, 50) / 1e6)
        d, e = bp.interleave(samples, lambda: bp.small_request_ns(d_client), lambda: bp.small_request_ns(e_client))
        out["small request p50 (ms)"] = (bp.percentile(d, 50) / 1e6, bp.percentile(e, 50) / 1e6)
    finally:
        d_client.close()
        e_client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        daemon, edge = start(Path(tmp), stack)
        runs = [measure(daemon, edge, args.samples) for _ in range(args.runs)]
    print(f"edge vs daemon direct (median of {args.runs} runs, {args.samples} samples each)")
    print(f"{'metric':<28} {'daemon':>8} {'edge':>8} {'added':>8} {'ratio':>6}")
    for metric in runs[0]:
        direct = statistics.median(run[metric][0] for run in runs)
        via = statistics.median(run[metric][1] for run in runs)
        print(f"{metric:<28} {direct:>8.3f} {via:>8.3f} {via - direct:>+8.3f} {via / direct:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
