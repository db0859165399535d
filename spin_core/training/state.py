"""A training run's resumable state in `train_state/`: DeepSpeed checkpoints (weights,
optimizer, schedule, this rank's RNG), each marked complete once its save has finished, and
the step log `metrics.jsonl`, cut back to the checkpoint a rerun resumes from."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from spin_core.runtime.devices import device, rank0_decides
from spin_core.storage.rundir import RunDir

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "complete.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The generators this rank draws from; of the GPUs only its own (`device()`), so a
    resume on a worker that sees fewer GPUs than the one that saved still works."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device()) if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # saved by an older version: one state per visible GPU
        index = device().index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, device())


def complete_checkpoints(state_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints whose save finished, oldest first."""
    found = []
    for marker in state_dir.glob(f"step_*/{COMPLETE_MARKER}"):
        found.append((int(marker.parent.name.removeprefix("step_")), marker.parent))
    return sorted(found)


def save_checkpoint(engine, state_dir: Path, step: int, keep: int, rank: int) -> None:
    """Save, then mark complete; a checkpoint without the marker is ignored on resume."""
    tag = f"step_{step:06d}"
    engine.save_checkpoint(str(state_dir), tag=tag, client_state={"step": step, "rng": rng_state()})
    if dist.get_world_size() > 1:
        dist.barrier()
    if rank == 0:
        (state_dir / tag / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
        for _, old in complete_checkpoints(state_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def resume_point(state_dir: Path) -> tuple[int, str | None]:
    """The step and tag of the checkpoint to resume from, (0, None) for none, as rank 0 sees
    `state_dir`: every rank loads the same one even if its view of the files lags."""

    def newest() -> tuple[int, str | None]:
        checkpoints = complete_checkpoints(state_dir)
        return (checkpoints[-1][0], checkpoints[-1][1].name) if checkpoints else (0, None)

    return tuple(rank0_decides(newest))


# How long a rank waits to see a checkpoint rank 0 sees: NFS caches directory attributes
# for up to 60 s by default (acdirmax).
VISIBLE_WITHIN = 120.0


def _wait_visible(path: Path, within: float = VISIBLE_WITHIN) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        if time.monotonic() > deadline:
            raise FileNotFoundError(
                f"{path}: rank 0 resumes from this checkpoint, but this rank has not seen it "
                f"within {within:.0f} s; is train_state/ on a filesystem every node shares?"
            )
        time.sleep(1.0)


def resume(engine, state_dir: Path, iteration: int) -> int:
    """Load the last complete checkpoint (weights, optimizer, schedule, RNG); its step, or 0."""
    step, tag = resume_point(state_dir)
    if tag is None:
        return 0
    path = state_dir / tag
    _wait_visible(path / COMPLETE_MARKER)
    _, client_state = engine.load_checkpoint(str(state_dir), tag=tag)
    set_rng_state(client_state["rng"])
    logger.info("resuming iteration %d from %s (step %d)", iteration, path, step)
    return step


def truncate_log(log_path: Path, last_step: int) -> None:
    """Drop logged steps after the checkpoint we resume from (they will be redone)."""
    if not log_path.exists():
        return
    kept = [
        line
        for line in log_path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= last_step
    ]
    log_path.write_text("".join(line + "\n" for line in kept))


def training_summary(run: RunDir, iteration: int) -> dict:
    """What iteration `iteration`'s metrics.json says of its training: the training set's
    counts, the last epoch's mean step metrics, the health checks, the learning-rate scale
    and the export's weights-changed fractions, read from the iteration's files."""
    summary = json.loads(run.pairs_counts(iteration).read_text())
    steps = pd.read_json(run.step_log(iteration), lines=True)
    last_epoch = steps[steps["epoch"] >= steps["epoch"].max() // 1]
    summary["train_steps"] = int(steps["step"].max())
    for key in ("loss", "margin", "reward_accuracy"):
        summary[f"train_{key}"] = float(last_epoch[key].mean())
    if "healthy" in steps:
        checked = steps.dropna(subset=["healthy"])
        summary["unhealthy_checks"] = int((~checked["healthy"].astype(bool)).sum())
    summary["lr_scale"] = run.lr_scale(iteration)
    export = run.export_summary(iteration)
    if export.exists():  # the fraction of θ(t+1)'s weights that differ from θt's
        summary |= json.loads(export.read_text())
    return summary
