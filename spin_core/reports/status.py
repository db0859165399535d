"""Where a run stands, after the fact: `spin status DIR` (the console's lines while a run
runs are spin_core/console.py's).

`run_status(DIR)` reads what a run left on disk, the step journal `steps.jsonl` and the
lock `.lock`, and says what is done, what is running (pid, since when), what failed
(the step, its error line), and the next step; `render` prints it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from spin_core.console import duration, where
from spin_core.errors import InputError
from spin_core.storage.journal import read_journal
from spin_core.storage.rundir import RunDir, RunLock, pid_alive

# The steps of one iteration, in the order run_iteration runs them (spin_core/pipeline.py;
# tests/spin_core/test_status.py checks it: importing the pipeline would load torch here).
ITERATION_STEPS = (
    "sample-prompts",
    "generate-responses",
    "build-training-set",
    "train-policy",
    "evaluate-model",
)


@dataclass
class StepState:
    step: str
    iteration: int | None
    state: str  # finished, reused, running, failed, stale (its process died mid-step)
    started: str | None = None
    ended: str | None = None
    pid: int | None = None
    error: str | None = None

    def seconds(self) -> float | None:
        if self.started and self.ended:
            return (_time(self.ended) - _time(self.started)).total_seconds()
        return None


@dataclass
class RunStatus:
    run_dir: Path
    steps: list[StepState] = field(default_factory=list)
    holder: dict | None = None  # the lock's content, when a live process holds it
    stale_lock: dict | None = None  # a lock whose process is gone
    iterations: int | None = None  # run.iterations of the saved config
    finished: bool = False  # report.md written after the last step

    @property
    def state(self) -> str:
        if any(s.state == "running" for s in self.steps) or self.holder:
            return "running"
        if self.steps and self.steps[-1].state in ("failed", "stale"):
            return self.steps[-1].state
        if self.finished:
            return "finished"
        return "stopped" if self.steps else "not started"

    def next_step(self) -> str | None:
        """The step a rerun starts with (resume), from the journal's last record."""
        if self.finished and self.state == "finished":
            return None
        if not self.steps:
            return "check the inputs, then evaluate θ0"
        last = self.steps[-1]
        if last.state in ("failed", "stale", "running"):
            return f"{last.step} of {where(last.iteration)}"
        if last.iteration is None:
            return f"sample-prompts of {where(0)}"
        if last.step in ITERATION_STEPS[:-1]:
            nxt = ITERATION_STEPS[ITERATION_STEPS.index(last.step) + 1]
            return f"{nxt} of {where(last.iteration)}"
        if self.iterations is not None and last.iteration + 1 >= self.iterations:
            return "write-report"
        return f"sample-prompts of {where(last.iteration + 1)}"


def _time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S")


def run_status(run_dir: str | Path) -> RunStatus:
    """What the journal and the lock of `run_dir` say (see the module docstring)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"{run_dir}: run directory not found")
    status = RunStatus(root)
    run = RunDir(root)
    lock = RunLock(run).holder()
    if lock:
        if RunLock.alive(lock):
            status.holder = lock
        else:
            status.stale_lock = lock
    open_steps: dict[tuple, StepState] = {}
    for record in read_journal(root):
        key = (record["step"], record.get("iteration"))
        event = record["event"]
        if event == "started":
            state = StepState(key[0], key[1], "running", record["time"], pid=record.get("pid"))
            open_steps[key] = state
            status.steps.append(state)
            continue
        state = open_steps.pop(key, None)
        if state is None:  # "reused" (loaded from complete outputs) has no "started"
            state = StepState(key[0], key[1], event, record["time"], pid=record.get("pid"))
            status.steps.append(state)
        state.state, state.ended = event, record["time"]
        if event == "failed":
            state.error = _error_line(record.get("error", ""))
    for state in open_steps.values():
        alive = state.pid is not None and pid_alive(state.pid)
        if not alive or (status.holder is None and state.pid != (lock or {}).get("pid")):
            state.state = "stale"
    _read_config(status, run)
    report = run.report
    last_end = max((s.ended or s.started or "" for s in status.steps), default="")
    status.finished = report.exists() and (
        not last_end
        or time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(report.stat().st_mtime)) >= last_end
    )
    return status


def _read_config(status: RunStatus, run: RunDir) -> None:
    import yaml

    from spin_core.config import RunConfig

    try:
        saved = yaml.safe_load(run.config.read_text()) or {}
        default = RunConfig.model_fields["iterations"].default
        status.iterations = int(saved.get("run", {}).get("iterations", default))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        status.iterations = None


def _error_line(error: str) -> str:
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def render(status: RunStatus) -> str:
    """The status as text: a header line, one line per step, the next step."""
    lines = [f"{status.run_dir}: {status.state}"]
    if status.holder:
        lines.append(
            f"  held by pid {status.holder.get('pid')} on {status.holder.get('host')} "
            f"since {status.holder.get('started')}"
        )
    if status.stale_lock:
        lines.append(
            f"  stale lock of pid {status.stale_lock.get('pid')} (started "
            f"{status.stale_lock.get('started')}, no longer running); a rerun takes it over"
        )
    for s in status.steps:
        taken = s.seconds()
        line = f"  {where(s.iteration):<18} {s.step:<22} {s.state:<8} {s.started or ''}"
        if taken is not None:
            line += f"  {duration(taken)}"
        if s.state == "running":
            line += f"  (pid {s.pid})"
        if s.state == "stale":
            line += f"  (pid {s.pid} died without finishing it)"
        if s.error:
            line += f"\n      error: {s.error}"
        lines.append(line)
    nxt = status.next_step()
    if nxt and status.state == "running":
        lines.append(f"  now: {nxt}")
    elif nxt:
        lines.append(f"  next: {nxt} (run the same command again to resume)")
    return "\n".join(lines)
