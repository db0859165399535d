"""One SPIN iteration (Algorithm 1 of Chen et al., 2024), θt → θ(t+1), as a Prefect flow.

The steps and their order are `spin_core.steps.run_iteration`: sample the prompts,
the opponent's responses, the training set, training, evaluation (and the SFT
baseline with `run.baseline: sft`). Here each runs as a cached Prefect task, or
on a GPU worker (`flows/dispatch.py`).
"""

from __future__ import annotations

from prefect import flow

from flows.dispatch import PrefectRunner
from spin_core import steps
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
    return steps.run_iteration(
        IterationRunner(), config, run_dir, iteration, opponent, opponent_eval, lr_scale
    )
