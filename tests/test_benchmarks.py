"""Every benchmark starts: its command line parses (`--help`), so `make bench` cannot break
unnoticed between the runs that produce docs/PERFORMANCE.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "_common")
BENCHMARKS = [name for name in BENCHMARKS if name != "__init__"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_command_line_parses(name):
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
