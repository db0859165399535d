"""Step 4: train θ(t+1) from θt with DeepSpeed; resumes from train_state/."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from spin_core import train
from spin_core.checkpoint import is_model_dir, load_tokenizer
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.progress import Progress, logger


@task(name="train-policy", cache_policy=NO_CACHE)
def train_policy(
    config: SpinConfig,
    run_dir: str,
    iteration: int,
    opponent: str,
    opponent_eval: str | None = None,
    lr_scale: float = 1.0,
) -> str:
    """train.parquet + θt → train_state/ (checkpoints, metrics.jsonl) → model/ (θ(t+1)).

    opponent_eval: the directory of θt's held-out evaluation; with
    `training.eval_steps` set, the held-out real log-likelihood is checked against
    it during training. lr_scale: multiplies the learning rate (collapse retry).
    """
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
        if "heldout_real_loglik" in record:
            log.info(
                "iter %d step %d: held-out real log-lik %.4f nats/token (%s)",
                iteration,
                record["step"],
                record["heldout_real_loglik"],
                "healthy" if record["healthy"] else "BELOW the opponent's by more than tolerance",
            )

    result = train.train_iteration(
        init_model=opponent,
        train_path=run.train(iteration),
        state_dir=run.train_state(iteration),
        model_out=out,
        cfg=config,
        iteration=iteration,
        on_step=on_step,
        health=_health_probe(config, run, opponent, opponent_eval),
        lr_scale=lr_scale,
    )
    if result.resumed_from:
        log.info("iteration %d: resumed training from step %d", iteration, result.resumed_from)
    return str(out)


def _health_probe(
    config: SpinConfig, run: RunDir, opponent: str, opponent_eval: str | None
) -> train.HealthProbe | None:
    """The first `eval.health_size` held-out pairs, with θt's log-likelihood on them."""
    if not config.training.eval_steps or opponent_eval is None:
        return None
    from spin_core.score import tokenize_responses

    scored = pd.read_parquet(Path(opponent_eval) / "eval.parquet").head(config.eval.health_size)
    tokenizer = load_tokenizer(opponent, trust_remote_code=config.model.trust_remote_code)
    examples = tokenize_responses(
        tokenizer,
        scored["prompt"].tolist(),
        scored["real"].tolist(),
        max_length=config.training.max_length,
        max_prompt_length=config.training.max_prompt_length,
    )
    return train.HealthProbe(
        examples=examples,
        opponent_loglik=float(scored["real_logps"].sum() / max(scored["real_tokens"].sum(), 1)),
        tolerance=config.run.collapse_tolerance,
        every=config.training.eval_steps,
        batch_tokens=config.training.score_batch_tokens,
    )
