"""Where a run stands: the console's step lines while it runs, and `spin status DIR` after.

While a run runs, every step goes through `announce`: one line on the `spin.console`
logger as it starts and one as it finishes (with the time taken), and the step that
failed is remembered (`last_failure`) so the command line can name it.

`run_status(DIR)` reads what a run left on disk, the step journal `steps.jsonl` and the
lock `.lock`, and says what is done, what is running (pid, since when), what failed
(the step, its error line), and the next step; `render` prints it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from spin_core.errors import InputError
from spin_core.rundir import RunDir, RunLock, pid_alive
from spin_core.step import read_journal

console = logging.getLogger("spin.console")

# The steps of one iteration, in the order run_iteration runs them (spin_core/steps.py).
ITERATION_STEPS = (
    "sample-prompts",
    "generate-responses",
    "build-training-set",
    "train-policy",
    "evaluate-model",
)


@dataclass
class Failure:
    step: str
    iteration: int | None


_failure: list[Failure] = []


def last_failure() -> Failure | None:
    """The innermost step that raised in this process, if any."""
    return _failure[-1] if _failure else None


def where(iteration: int | None) -> str:
    return "run" if iteration is None else f"iteration {iteration}"


QUIET_STEPS = ("track-experiment",)  # announced on the console only with --verbose


def step_label(name: str, params: dict) -> str:
    """ "iteration 1: train-policy", "θ0: evaluate-model", "iteration 0: evaluate-model (SFT
    baseline)": where in the run a step is, from its parameters."""
    iteration = params.get("iteration")
    if iteration is None and params.get("out_dir"):
        out = Path(params["out_dir"])
        if out.name == "baseline" and out.parent.name.startswith("iter_"):
            return f"iteration {out.parent.name.removeprefix('iter_')}: {name} (SFT baseline)"
        if out.name == "theta0":
            return f"θ0: {name}"
    return f"{where(iteration)}: {name}"


@contextmanager
def announce(name: str, params: dict, complete: bool = False) -> Iterator[None]:
    """One console line when step `name` starts and one when it ends, with the time taken.

    complete: its outputs are already on disk (it will be loaded, not run): one line.
    """
    label, iteration = step_label(name, params), params.get("iteration")
    level = logging.DEBUG if name in QUIET_STEPS else logging.INFO
    if complete:
        console.log(level, "%s already done", label)
        yield
        return
    console.log(level, "%s ...", label)
    started = time.monotonic()
    try:
        yield
    except BaseException:
        if not _failure or _failure[-1].step != name:
            _failure.append(Failure(name, iteration))
        console.debug("%s failed after %.1f s", label, time.monotonic() - started)
        raise
    console.log(level, "%s done in %s", label, duration(time.monotonic() - started))


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ------------------------------------------------------------------ spin status DIR


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
