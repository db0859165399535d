"""Resume by caching: a rerun (a new flow run) does not redo a finished step.

Prefect's default cache policy includes the flow run id, so a new run would redo
everything. Each step here is keyed on what it really depends on: the step, its
parameters (run directory, iteration, model paths), the config sections that
change its result, and fingerprints of its input files. The key and the result
live in the run directory (`.prefect/`), so a retry on another worker that
mounts the run directory finds them too.

A cached result is only trusted while the step's outputs are complete on disk:
before each call `done(params)` checks them (Parquet footer and row count,
complete model directory); if they are missing or truncated the step runs again
(`refresh_cache`) and overwrites the stale cache entry.

Every executed step appends to `steps.jsonl` in the run directory (started,
finished or failed, with pid and time; "reused" when its outputs were complete but
the cache record was lost, e.g. to a crash right after the step); a cached step
writes nothing there, so the journal shows exactly what each run executed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from spin_core.config import RESULT_NEUTRAL_FIELDS, SpinConfig
from spin_core.errors import InputError
from spin_core.rundir import RunDir

JOURNAL = "steps.jsonl"
HASHED_FILE_LIMIT = 64 * 2**20  # larger files (model weights) are fingerprinted by size and mtime

_saved_storage: dict[str, str] = {}


def fingerprint(path: str | Path) -> str:
    """A digest of a file or directory: content for files up to 64 MiB, else size and mtime."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        relative = file.relative_to(path) if file != path else Path(file.name)
        if any(part.startswith(".") for part in relative.parts):
            continue  # files being written aside (.partial, .tmp)
        stat = file.stat()
        digest.update(str(relative).encode())
        if stat.st_size <= HASHED_FILE_LIMIT:
            with file.open("rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def as_config(value: Any) -> SpinConfig:
    return value if isinstance(value, SpinConfig) else SpinConfig.model_validate(value)


def relevant_config(config: SpinConfig, sections: Iterable[str]) -> dict:
    """The named config sections without the fields that do not change results."""
    dump = config.model_dump(mode="json")
    return {
        section: {
            name: value
            for name, value in dump[section].items()
            if (section, name) not in RESULT_NEUTRAL_FIELDS
        }
        for section in sections
    }


@dataclass
class StepInputs(CachePolicy):
    """Cache key = step + parameters + relevant config + fingerprints of input files."""

    step: str = ""
    sections: tuple[str, ...] = ()
    files: Callable[[dict], list[Path]] = field(default=lambda params: [])

    def compute_key(self, task_ctx, inputs: dict, flow_parameters: dict, **kwargs) -> str:
        config = as_config(inputs["config"])
        params = {k: str(v) for k, v in sorted(inputs.items()) if k != "config"}
        digest = hashlib.blake2b(digest_size=20)
        digest.update(
            json.dumps(
                [self.step, params, relevant_config(config, self.sections)], sort_keys=True
            ).encode()
        )
        for path in self.files(inputs):
            digest.update(f"{path}={fingerprint(path)}".encode())
        return f"{self.step}-{digest.hexdigest()}"


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
    path = Path(run_dir) / JOURNAL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def transient_only(task, task_run, state) -> bool:
    """Retry condition: retry a failure unless it is bad input (retrying cannot fix that)."""
    try:
        state.result()
    except InputError:
        return False
    except Exception:  # noqa: BLE001 - any other failure may be transient (I/O, the hub)
        return True
    return True


def _result_storage(run: RunDir) -> str:
    """A saved LocalFileSystem block rooted in the run directory (once per process and run)."""
    from prefect.filesystems import LocalFileSystem

    root = str((run.root / ".prefect" / "results").resolve())
    if root not in _saved_storage:
        slug = "spin-" + hashlib.blake2b(root.encode(), digest_size=6).hexdigest()
        LocalFileSystem(basepath=root).save(slug, overwrite=True)
        _saved_storage[root] = f"local-file-system/{slug}"
    return _saved_storage[root]


def step(
    name: str,
    *,
    sections: tuple[str, ...],
    inputs: Callable[[dict], list[Path]],
    done: Callable[[dict], bool],
    load: Callable[[dict], Any] | None = None,
    **task_options,
):
    """Make `fn(config, run_dir, ...)` a cached, journaled Prefect task.

    sections: config sections its result depends on; inputs(params): the files it
    reads; done(params): whether its outputs are complete on disk; load(params):
    the step's result read back from those outputs. The body only computes: when
    the outputs are complete it is not called, `load` answers.
    Calling the decorated function runs the task (or returns its cached result).
    """

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def body(*args, **kwargs):
            params = signature.bind(*args, **kwargs).arguments
            iteration = params.get("iteration")
            if done(params):
                # Complete outputs without a cache record (a crash between the two): they
                # are returned without recomputing.
                journal(params["run_dir"], name, iteration, "reused")
                return load(params) if load is not None else fn(*args, **kwargs)
            journal(params["run_dir"], name, iteration, "started")
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                journal(params["run_dir"], name, iteration, "failed", error=repr(exc)[:500])
                raise
            journal(params["run_dir"], name, iteration, "finished")
            return result

        prefect_task = task(
            name=name, persist_result=True, result_serializer="json", **task_options
        )(body)
        policy = StepInputs(step=name, sections=sections, files=inputs)

        @functools.wraps(fn)
        def run_step(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            params = dict(bound.arguments)
            params["config"] = as_config(params["config"])
            run = RunDir(params["run_dir"])
            configured = prefect_task.with_options(
                cache_policy=policy.configure(
                    key_storage=str(run.root / ".prefect" / "cache-keys")
                ),
                result_storage=_result_storage(run),
                refresh_cache=not done(params),
            )
            return configured(**params)

        run_step.task = prefect_task
        run_step.done = done  # outputs complete on disk, from the call's parameters
        run_step.load = load
        return run_step

    return decorate
