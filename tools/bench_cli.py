"""Cold start of `halton-meter --help` as a user gets it: the wheel installed in a fresh venv.

    python tools/bench_cli.py [--runs 21]

Builds the wheel, installs it with no index into a temp venv (no site packages from this
machine, as after `pipx install`), then times `halton-meter --help` and `python -m halton_meter
--help`, each run a new process; prints the median and the spread next to `python -c pass`, the
floor any Python CLI pays.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(argv: list[str], runs: int) -> list[float]:
    subprocess.run(argv, capture_output=True, check=True)  # warm the page cache once
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                        str(work / "dist"), str(REPO)], check=True)
        wheel = next((work / "dist").glob("halton_meter-*.whl"))
        subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
        python = work / "venv" / "bin" / "python"
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-index", str(wheel)], check=True)
        cases = {
            "python -c pass (floor)": [str(python), "-c", "pass"],
            "halton-meter --help": [str(work / "venv" / "bin" / "halton-meter"), "--help"],
            "python -m halton_meter --help": [str(python), "-m", "halton_meter", "--help"],
            "halton-meter status --help": [str(work / "venv" / "bin" / "halton-meter"), "status", "--help"],
        }
        print(f"{'command':<32} {'median':>8} {'min':>8} {'max':>8}  ({args.runs} runs)")
        for name, argv in cases.items():
            samples = timed(argv, args.runs)
            print(f"{name:<32} {statistics.median(samples):>6.1f}ms {min(samples):>6.1f}ms {max(samples):>6.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
