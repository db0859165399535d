"""The continued-SFT baseline: the same steps and learning rate as SPIN, on the real responses."""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NO_CACHE

from spin_core import train
from spin_core.checkpoint import is_model_dir
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.progress import logger


@task(name="train-sft-baseline", cache_policy=NO_CACHE)
def train_sft_baseline(config: SpinConfig, run_dir: str, iteration: int, previous: str) -> str:
    """prompts.parquet (real responses) + the previous baseline → iter_t/baseline/model."""
    run = RunDir(run_dir)
    out = run.baseline(iteration) / "model"
    if is_model_dir(out):
        logger().info("iteration %d: baseline model exists, skipped", iteration)
        return str(out)
    spin_steps = json.loads((run.iteration_metrics(iteration)).read_text())["train_steps"]
    train.train_iteration(
        init_model=previous,
        train_path=run.prompts(iteration),
        state_dir=run.baseline(iteration) / "train_state",
        model_out=out,
        cfg=config,
        iteration=iteration,
        objective="sft",
        num_steps=spin_steps,
    )
    logger().info("iteration %d: SFT baseline trained for %d steps", iteration, spin_steps)
    return str(out)
