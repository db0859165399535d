"""The console while a run runs: every step goes through `announce`, one line on the
`spin.console` logger as it starts and one as it finishes (with the time taken), and the
step that failed is remembered (`last_failure`) so the command line can name it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

console = logging.getLogger("spin.console")


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
