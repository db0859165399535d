"""The SPIN pipeline as a Prefect flow: θ0 → θ1 → ... → θT, each iteration a subflow.

What runs, in which order, and the collapse / retry / early-stop policy are
`spin_core.steps.run_pipeline`; this flow runs it with every step a cached Prefect
task and every iteration a `spin-iteration` subflow.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.iteration import IterationRunner
from spin_core import steps
from spin_core.config import SpinConfig


def default_run_dir(config: SpinConfig) -> str:
    return str(Path("runs") / config.run.name)


@flow(name="spin-pipeline", log_prints=True)
def spin_pipeline(config: SpinConfig, run_dir: str | None = None) -> str:
    """Run `config.run.iterations` SPIN iterations; returns the path of report.md.

    Rerunning on the same run directory resumes: finished steps are skipped.
    """
    return steps.run_pipeline(IterationRunner(), config, run_dir or default_run_dir(config))
