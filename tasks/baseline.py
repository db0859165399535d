"""The continued-SFT baseline: the same steps and learning rate as SPIN, on the real responses."""

from __future__ import annotations

import json

from spin_core.checkpoint import is_model_dir
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.caching import step
from tasks.progress import Progress, logger
from tasks.train import run_training


def _inputs(params: dict) -> list:
    run, t = RunDir(params["run_dir"]), params["iteration"]
    return [run.prompts(t), run.iteration_metrics(t), params["previous"]]


def _done(params: dict) -> bool:
    return is_model_dir(RunDir(params["run_dir"]).baseline(params["iteration"]) / "model")


def _load(params: dict) -> str:
    return str(RunDir(params["run_dir"]).baseline(params["iteration"]) / "model")


@step("train-sft-baseline", sections=("model", "training"), inputs=_inputs, done=_done, load=_load)
def train_sft_baseline(config: SpinConfig, run_dir: str, iteration: int, previous: str) -> str:
    """prompts.parquet (real responses) + the previous baseline → iter_t/baseline/model."""
    run = RunDir(run_dir)
    out = run.baseline(iteration) / "model"
    spin_steps = json.loads((run.iteration_metrics(iteration)).read_text())["train_steps"]
    run_training(
        config,
        Progress(f"baseline-iter-{iteration}", f"iteration {iteration}: SFT baseline steps"),
        init_model=previous,
        train_path=run.prompts(iteration),
        state_dir=run.baseline(iteration) / "train_state",
        model_out=out,
        iteration=iteration,
        objective="sft",
        num_steps=spin_steps,
    )
    logger().info("iteration %d: SFT baseline trained for %d steps", iteration, spin_steps)
    return str(out)
