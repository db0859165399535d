"""Step 4: train θ(t+1) from θt with DeepSpeed; resumes from train_state/."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from spin_core import train
from spin_core.checkpoint import is_model_dir
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.progress import Progress, logger


@task(name="train-policy", cache_policy=NO_CACHE)
def train_policy(config: SpinConfig, run_dir: str, iteration: int, opponent: str) -> str:
    """train.parquet + θt → train_state/ (checkpoints, metrics.jsonl) → model/ (θ(t+1))."""
    run = RunDir(run_dir)
    out = run.model(iteration)
    if is_model_dir(out):
        logger().info("iteration %d: model/ exists, skipped", iteration)
        return str(out)
    log = logger()
    progress = Progress(f"train-iter-{iteration}", f"iteration {iteration}: optimizer steps")

    def on_step(record: dict) -> None:
        progress.update(record["step"], record["total_steps"])
        log.info(
            "iter %d step %d/%d loss %.4f margin %.3f acc %.2f lr %.2e %.0f tok/s",
            iteration,
            record["step"],
            record["total_steps"],
            record["loss"],
            record["margin"],
            record["reward_accuracy"],
            record["learning_rate"],
            record["tokens_per_s"],
        )

    result = train.train_iteration(
        init_model=opponent,
        train_path=run.train(iteration),
        state_dir=run.train_state(iteration),
        model_out=out,
        cfg=config,
        iteration=iteration,
        on_step=on_step,
    )
    if result.resumed_from:
        log.info("iteration %d: resumed training from step %d", iteration, result.resumed_from)
    return str(out)
