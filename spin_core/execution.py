"""What a pipeline step is: a body with declared inputs and outputs, run by an executor.

A `Step` (made with `@step`) is a function `body(ctx, config, run_dir, ...)` plus:

- `sections`: the config sections its result depends on;
- `inputs(params)`: the files it reads (cache keys fingerprint them);
- `outputs`: what it writes, each an `Output` (a path and its kind), declared once;
  from them come `done(params)` (every output is complete on disk) and `load(params)`
  (the first output read back: a path, or a JSON file's content), and the remote
  dispatch (`flows/dispatch.py`) knows what a worker's run leaves behind. A step whose
  completeness is more than its files' (a generation worker's shards, lm-eval's
  settings) gives `done` and `load` itself.

`execute(step, ctx, params)` is the one way a step runs: when `done` says the
outputs are complete, `load` answers and the body is not called; otherwise the
body runs between "started" and "finished" (or "failed") lines of the run's
journal, `steps.jsonl` (spin_core/storage/journal.py). The plain driver (`spin_core/driver.py`) calls it
directly; the Prefect layer (`tasks/caching.py`) calls it inside a cached task.

The body talks to whoever runs it through `ctx` (a `Context`): a logger, progress
reporting and artifacts.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from spin_core.storage.journal import journal


class Progress(Protocol):
    def update(self, done: float, total: float) -> None: ...


class Context(Protocol):
    """What a step body may ask of the orchestrator running it."""

    log: logging.Logger | logging.LoggerAdapter

    def progress(self, key: str, description: str) -> Progress: ...

    def table(self, key: str, rows: list[dict], description: str) -> None: ...

    def markdown(self, key: str, text: str, description: str) -> None: ...

    def phase(self, name: str, event: str) -> None:
        """A phase inside the body starts or ends (`train.train_iteration`'s on_phase)."""


class _NoProgress:
    def update(self, done: float, total: float) -> None:
        pass


class PlainContext:
    """The context without an orchestrator: Python logging, work mapped in turn, no artifacts."""

    def __init__(self, log: logging.Logger | None = None):
        self.log = log or logging.getLogger("spin")

    def progress(self, key: str, description: str) -> Progress:
        return _NoProgress()

    def table(self, key: str, rows: list[dict], description: str) -> None:
        pass

    def markdown(self, key: str, text: str, description: str) -> None:
        pass

    def phase(self, name: str, event: str) -> None:
        pass


Params = dict[str, Any]


def _no_files(params: Params) -> list[Path]:
    return []


@dataclass(frozen=True)
class Output:
    """One file or directory a step writes. kind: "parquet" (complete: a readable footer,
    with `rows(params)` rows when given), "model" (a Hugging Face model directory) or
    "json" (loaded as its content). Only the first output of a step is loaded."""

    path: Callable[[Params], Path]
    kind: str
    rows: Callable[[Params], int | None] | None = None

    def __post_init__(self):
        if self.kind not in ("parquet", "model", "json"):
            raise ValueError(f"Output kind must be parquet, model or json, got {self.kind!r}")

    def complete(self, params: Params) -> bool:
        path = self.path(params)
        if self.kind == "parquet":
            from spin_core.storage.files import parquet_complete

            return parquet_complete(path, self.rows(params) if self.rows else None)
        if self.kind == "model":
            from spin_core.storage.models import is_model_dir

            return is_model_dir(path)
        return path.is_file()

    def load(self, params: Params) -> Any:
        path = self.path(params)
        return json.loads(path.read_text()) if self.kind == "json" else str(path)


def at_iteration(where: Callable[[Any, int], Path]) -> Callable[[Params], Path]:
    """An output path from a `RunDir` method of the iteration: `at_iteration(RunDir.pairs)`."""

    def path(params: Params) -> Path:
        from spin_core.storage.rundir import RunDir

        return where(RunDir(params["run_dir"]), params["iteration"])

    return path


@dataclass(eq=False)
class Step:
    """One step of the pipeline; see the module docstring."""

    name: str
    body: Callable[..., Any]
    sections: tuple[str, ...] = ()
    inputs: Callable[[Params], list] = _no_files
    done: Callable[[Params], bool] | None = None  # None: the step always runs (a check)
    load: Callable[[Params], Any] | None = None
    retries: int = 0  # extra attempts after a failure that is not bad input
    journaled: bool = True  # written to steps.jsonl (checks and reports are not)
    outputs: tuple[Output, ...] = ()
    signature: inspect.Signature = field(init=False, repr=False)

    def __post_init__(self):
        parameters = list(inspect.signature(self.body).parameters.values())[1:]  # minus ctx
        self.signature = inspect.Signature(parameters)
        self.__doc__ = self.body.__doc__
        if self.outputs:
            if self.done is not None or self.load is not None:
                raise ValueError(f"{self.name}: outputs, or done and load, not both")
            self.done = lambda params: all(o.complete(params) for o in self.outputs)
            self.load = self.outputs[0].load

    def output(self, params: Params) -> Path:
        """The path of the step's result (its first output)."""
        return self.outputs[0].path(params)

    def params(self, *args, **kwargs) -> Params:
        """The call's arguments by name, defaults applied (`config`, `run_dir`, ...)."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def complete(self, params: Params) -> bool:
        """Whether the outputs for these parameters are complete on disk."""
        return self.done is not None and self.done(params)


def step(
    name: str,
    *,
    sections: tuple[str, ...] = (),
    inputs: Callable[[Params], list] = _no_files,
    done: Callable[[Params], bool] | None = None,
    load: Callable[[Params], Any] | None = None,
    retries: int = 0,
    journaled: bool = True,
    outputs: tuple[Output, ...] = (),
) -> Callable[[Callable], Step]:
    """Declare `body(ctx, config, run_dir, ...)` as a Step (see the module docstring)."""

    def decorate(body: Callable) -> Step:
        return Step(name, body, sections, inputs, done, load, retries, journaled, outputs)

    return decorate


def execute(step: Step, ctx: Context, params: Params) -> Any:
    """Run `step` once: `load` when its outputs are complete, else the body, journaled."""
    run_dir, iteration = params["run_dir"], params.get("iteration")
    if step.complete(params):
        if step.journaled:
            journal(run_dir, step.name, iteration, "reused")
        return step.load(params) if step.load is not None else None
    if not step.journaled:
        return step.body(ctx, **params)
    journal(run_dir, step.name, iteration, "started")
    try:
        result = step.body(ctx, **params)
    except BaseException as exc:
        journal(run_dir, step.name, iteration, "failed", error=repr(exc)[:500])
        raise
    journal(run_dir, step.name, iteration, "finished")
    return result
