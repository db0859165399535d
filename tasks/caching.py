"""Every step of spin_core/steps.py as a Prefect task, wrapped the same way (`run_local`).

Resume by caching: a rerun (a new flow run) does not redo a finished step.

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

Inside the task the step runs as everywhere (`spin_core.execution.execute`): loaded
from its outputs when they are complete but the cache record was lost (a crash
right after the step; "reused" in `steps.jsonl`), else its body, journaled
"started" and "finished" or "failed". A cached step writes nothing to the
journal, so it shows exactly what each run executed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE, CachePolicy

from spin_core.config import RESULT_NEUTRAL_FIELDS, SpinConfig
from spin_core.console import announce
from spin_core.errors import InputError, retryable
from spin_core.execution import Step, execute
from spin_core.storage.rundir import RunDir
from tasks.context import PrefectContext

HASHED_FILE_LIMIT = 64 * 2**20  # larger files (model weights) are fingerprinted by size and mtime

_tasks: dict[Step, Any] = {}


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


def transient_only(task, task_run, state) -> bool:
    """Retry condition: retry a failure unless retrying cannot help (`errors.retryable`)."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - classified, not swallowed
        return retryable(error)
    return True


def prefect_task(step: Step):
    """`step` as a Prefect task (made once per step): cached on its declared inputs and,
    when they are complete, its declared outputs loaded without calling the body."""
    if step not in _tasks:

        def body(*args, **kwargs):
            return execute(step, PrefectContext(), step.params(*args, **kwargs))

        body.__signature__ = step.signature  # Prefect binds the step's own parameters
        body.__doc__ = step.body.__doc__
        options = {"retries": step.retries, "retry_delay_seconds": 5} if step.retries else {}
        if step.done is None:  # a check or a report: always runs, nothing to cache
            options["cache_policy"] = NO_CACHE
        else:
            options |= {"persist_result": True, "result_serializer": "json"}
        _tasks[step] = task(name=step.name, retry_condition_fn=transient_only, **options)(body)
    return _tasks[step]


# What a worker's operator sets to let runs started from a deployment execute model code.
ALLOW_REMOTE_CODE = "SPIN_ALLOW_REMOTE_CODE"


def refuse_remote_code(config: SpinConfig) -> None:
    """A run a worker started from a deployment may not run a model's own Python code unless
    that worker's environment says so: anyone who can start a deployment can type
    `model.trust_remote_code: true` and a model path into the UI's form. A local `spin run`,
    typed by the machine's own user, is not affected.

    Prefect's workers (and `spin serve`) start every flow run's process with
    PREFECT__FLOW_RUN_ID set; a local run's process has none.
    """
    if not config.model.trust_remote_code or not os.environ.get("PREFECT__FLOW_RUN_ID"):
        return
    if os.environ.get(ALLOW_REMOTE_CODE) != "1":
        raise InputError(
            "model.trust_remote_code: a run started from a deployment may not run the model's "
            f"own code on this worker unless the worker's environment sets {ALLOW_REMOTE_CODE}=1"
        )


def run_local(step: Step, *args, **kwargs) -> Any:
    """Run `step` as a Prefect task in this flow run (or return its cached result)."""
    params = step.params(*args, **kwargs)
    params["config"] = as_config(params["config"])
    refuse_remote_code(params["config"])
    prefect_step = prefect_task(step)
    if step.done is None:
        with announce(step.name, params):
            return prefect_step(**params)
    run = RunDir(params["run_dir"])
    policy = StepInputs(step=step.name, sections=step.sections, files=step.inputs)
    complete = step.complete(params)
    configured = prefect_step.with_options(
        cache_policy=policy.configure(key_storage=str(run.prefect_cache_keys)),
        # A path, not a saved block: Prefect writes each result under its absolute path and
        # reads it back from there in any process that mounts the run directory. Saving a
        # block cost the first cached step 2 s on the temporary server.
        result_storage=run.prefect_results.resolve(),
        refresh_cache=not complete,
    )
    with announce(step.name, params, complete=complete):
        return configured(**params)
