"""One SPIN iteration (Algorithm 1 of Chen et al., 2024), θt → θ(t+1), as a Prefect flow.

The iteration is `spin_core.pipeline.run_iteration`, five steps each defined once in
spin_core/steps.py:

1. `sample_prompts`      the SFT (prompt, real) pairs, tokenized once;
2. `generate_responses`  the opponent θt writes y' for every prompt;
3. `build_training_set`  D_t = {(x, y, y')}, with `data.history` earlier iterations;
4. `train_policy`        θ(t+1) from θt on the SPIN loss (θt scored before step 1);
5. `evaluate`            θ(t+1) against θt on held-out pairs; collapsed or not;

and `train_sft_baseline` with `run.baseline: sft`. Here each step is a cached
Prefect task, or a run on a GPU worker (`flows/dispatch.py`).
"""

from __future__ import annotations

from prefect import flow

from flows.dispatch import PrefectRunner
from spin_core import pipeline
from spin_core.config import SpinConfig


class IterationRunner(PrefectRunner):
    """PrefectRunner whose iterations are `spin-iteration` subflows."""

    def iteration(self, *args, **kwargs) -> dict:
        return spin_iteration(*args, **kwargs)


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
    return pipeline.run_iteration(
        IterationRunner(), config, run_dir, iteration, opponent, opponent_eval, lr_scale
    )
