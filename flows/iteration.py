"""One SPIN iteration (Algorithm 1 of Chen et al., 2024): θt → θ(t+1)."""

from __future__ import annotations

from prefect import flow

from flows.dispatch import run_step
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.baseline import train_sft_baseline
from tasks.build import build_training_set
from tasks.evaluate import evaluate
from tasks.generate import generate_responses
from tasks.sample import sample_prompts
from tasks.train import train_policy


@flow(name="spin-iteration", flow_run_name="iteration-{iteration}", log_prints=True)
def spin_iteration(
    config: SpinConfig,
    run_dir: str,
    iteration: int,
    opponent: str,
    opponent_eval: str,
    lr_scale: float = 1.0,
) -> dict:
    """Train θ(t+1) against the opponent θt; returns the iteration's metrics.

    opponent_eval: the directory holding θt's held-out evaluation.
    lr_scale: multiplies the learning rate (0.5 when retrying a collapsed iteration).
    """
    run = RunDir(run_dir)
    # 1. Sample the SFT prompts (the same fixed sample every iteration by default).
    sample_prompts(config, run_dir, iteration)
    # 2. The opponent θt writes y' for every prompt.
    run_step(generate_responses, config, run_dir, iteration, opponent)
    # 3. D_t = {(x, y, y')} with `history` earlier iterations.
    build_training_set(config, run_dir, iteration)
    # 4. Train θ(t+1) from θt on the SPIN loss; θt's log-probs of D_t are scored once,
    #    by the training ranks before their first step (θ(t+1) starts as θt).
    model = run_step(train_policy, config, run_dir, iteration, opponent, opponent_eval, lr_scale)
    # 5. θ(t+1) is checkpointed as an HF model directory; evaluate it against θt.
    metrics = evaluate(
        config, run_dir, model, str(run.iteration(iteration)), opponent_eval, iteration
    )
    if config.run.baseline == "sft":
        # The question users have: does SPIN beat continued SFT with the same steps?
        previous = (
            run.base_model(config) if iteration == 0 else str(run.baseline(iteration - 1) / "model")
        )
        baseline = train_sft_baseline(config, run_dir, iteration, previous)
        evaluate(config, run_dir, baseline, str(run.baseline(iteration)))
    return metrics
