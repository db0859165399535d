"""The run's step journal, `steps.jsonl`: one line per step started, finished, failed or
reused (spin_core/execution.py writes it; `spin status` and the tests read it)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

JOURNAL = "steps.jsonl"


def journal(run_dir: str | Path, step: str, iteration: int | None, event: str, **extra) -> None:
    """Append one line to the run's step journal (O_APPEND: lines from ranks do not interleave)."""
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "step": step,
        "iteration": iteration,
        "event": event,
        "pid": os.getpid(),
    } | extra
    path = Path(run_dir) / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_journal(run_dir: str | Path) -> list[dict]:
    """Every record of the journal, oldest first ([] before the first step)."""
    path = Path(run_dir) / JOURNAL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
