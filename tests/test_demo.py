"""`halton-meter demo`: the whole product offline, in a throwaway home, through the real CLI."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def run_demo(tmp_path, *args):
    env = dict(os.environ, HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HALTON_METER_HOME", None)
    return subprocess.run([sys.executable, "-m", "halton_meter", "demo", *args], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=120)


def test_demo_meters_two_projects_on_three_providers_and_cleans_up(tmp_path):
    result = run_demo(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("HTTP 200") == 5
    assert "Calls    5 across 2 projects and 5 models" in out
    for name in ("web-app", "data-pipeline", "claude-sonnet-4-5-20250929", "gpt-4.1-2025-04-14",
                 "gemini-2.5-flash"):
        assert name in out
    assert "Unpriced" not in out
    assert not (tmp_path / "home").exists()  # the user's own home is never touched
    assert not list(tmp_path.glob("halton-meter-demo-*"))  # the throwaway home is gone


def test_demo_keep_leaves_a_ledger_to_explore(tmp_path):
    result = run_demo(tmp_path, "--keep")
    assert result.returncode == 0, result.stderr
    home = Path(re.search(r"Kept (\S+):", result.stdout).group(1))
    db = sqlite3.connect(home / "db.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT project), COUNT(DISTINCT provider) FROM calls").fetchone() == (
        5, 2, 3)
