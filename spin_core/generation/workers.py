"""Generation on every device: one worker process per device, started from this process.

`generate` runs one iteration's generation. One HF worker with no other interpreter runs
here, in this process (where Ctrl-C stops it at once and no process start is paid);
anything else runs as worker processes (`spin_core/generation/worker.py`):
`generation.num_workers` of them, each with its own device (`spin_core.runtime.devices`)
and its own engine, claiming shards as they go. A worker that dies is started again
(WORKER_ATTEMPTS in all per device) and takes over the claim it left. This process never
imports vLLM and never touches a process group for generation, so a training engine
beside it (one GPU) keeps its own.

Workers share this process's group: Ctrl-C or SIGTERM to the group reaches them, and
they get SIGTERM from the kernel when this process dies (`spin_core.runtime.processes`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from spin_core.config import ConfigError, SpinConfig
from spin_core.generation.shards import generate_from_model, missing_shards
from spin_core.runtime.devices import plan_workers
from spin_core.runtime.processes import Children, child_env
from spin_core.storage.files import parquet_rows

ROWS_PREFIX = "SPIN_ROWS "  # a worker prints this and a row count after every batch
WORKER_ATTEMPTS = 2  # a worker that died is started once more; it takes over its claim


class GenerationFailed(RuntimeError):
    """Generation workers failed and shards are missing."""


def interpreter(cfg: SpinConfig) -> str:
    """The Python that runs generation workers: `generation.python`, else this one."""
    return cfg.generation.python or sys.executable


def in_process(cfg: SpinConfig) -> bool:
    """Whether generation runs here: one HF worker under this interpreter."""
    generation = cfg.generation
    return generation.num_workers == 1 and generation.backend == "hf" and not generation.python


def check_backend_available(cfg: SpinConfig) -> None:
    """ConfigError, naming the field, when the workers' interpreter is missing or cannot
    import the selected backend (a second or so: one `python -c`)."""
    python = cfg.generation.python
    if python is not None and not os.access(python, os.X_OK):
        raise ConfigError(f"generation.python: {python} is not an executable Python interpreter")
    if cfg.generation.backend != "vllm":
        return
    probe = subprocess.run(
        [
            interpreter(cfg),
            "-c",
            "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        raise ConfigError(
            f"generation.backend: 'vllm' needs the vllm package, which {interpreter(cfg)} cannot "
            "import; set generation.python to a virtualenv's Python that has it (make setup "
            "builds .venv-vllm/bin/python), or use backend 'hf'"
        )


def generate(
    opponent: str,
    cfg: SpinConfig,
    prompts_path: str | Path,
    shards_dir: str | Path,
    *,
    on_rows: Callable[[int], None] | None = None,
    on_log: Callable[[str], None] = print,
) -> None:
    """Every missing shard of `prompts_path` into `shards_dir`, here or on worker processes."""
    if in_process(cfg):
        prompts = pd.read_parquet(prompts_path)
        generate_from_model(opponent, cfg, prompts, shards_dir, on_rows=on_rows)
    else:
        run_workers(opponent, cfg, prompts_path, shards_dir, on_rows=on_rows, on_log=on_log)


def run_workers(
    opponent: str,
    cfg: SpinConfig,
    prompts_path: str | Path,
    shards_dir: str | Path,
    *,
    on_rows: Callable[[int], None] | None = None,
    on_log: Callable[[str], None] = print,
) -> None:
    """`generation.num_workers` worker processes, one per device, until every shard is
    written; raises GenerationFailed when shards are still missing after the retries."""
    generation = cfg.generation
    per_worker = generation.tensor_parallel_size if generation.backend == "vllm" else 1
    plan, fits = plan_workers(generation.num_workers, per_worker)
    if not fits:
        on_log(
            f"generation.num_workers ({generation.num_workers}) × {per_worker} device(s) is more "
            "than this machine has: workers share devices"
        )
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    args_file = shards_dir / f".workers-{os.getpid()}.json"
    args = {"config": cfg.model_dump(mode="json"), "opponent": opponent}
    args |= {"prompts": str(Path(prompts_path).resolve()), "shards_dir": str(shards_dir.resolve())}
    args_file.write_text(json.dumps(args))
    rows = parquet_rows(prompts_path)
    env = child_env()

    def command(slot: int) -> list[str]:
        return [interpreter(cfg), "-m", "spin_core.generation.worker", str(args_file), str(slot)]

    failures: dict[int, str] = {}
    attempts = dict.fromkeys(range(len(plan)), 1)
    try:
        with Children() as children:
            for slot, devices in enumerate(plan):
                children.start(slot, command(slot), env | devices.env())
            for child, line in children.events():
                if line is None:
                    slot, code = child.slot, child.proc.returncode
                    if code == 0:
                        continue
                    failures[slot] = child.failure()
                    if attempts[slot] < WORKER_ATTEMPTS and missing_shards(
                        shards_dir, rows, generation.shard_size
                    ):
                        on_log(f"generation worker {slot} exited with {code}; starting it again")
                        attempts[slot] += 1
                        children.start(slot, command(slot), env | plan[slot].env())
                elif line.startswith(ROWS_PREFIX):
                    if on_rows is not None:
                        on_rows(int(line[len(ROWS_PREFIX) :]))
                elif line.strip():
                    on_log(f"generation worker {child.slot}: {line}")
    finally:
        args_file.unlink(missing_ok=True)
    missing = missing_shards(shards_dir, rows, generation.shard_size)
    if missing:
        raise GenerationFailed(
            f"generation: {len(missing)} shard(s) not written (first: part-{missing[0]:05d}); "
            + "\n".join(failures.values())
        )
