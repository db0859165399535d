"""The SPIN pipeline as a Prefect flow: θ0 → θ1 → ... → θT, each iteration a subflow.

What runs, in which order, and the collapse / retry / early-stop policy are
`spin_core.pipeline.run_pipeline`; this flow runs it with every step a cached Prefect
task and every iteration a `spin-iteration` subflow.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from flows.iteration import IterationRunner
from spin_core import pipeline, steps
from spin_core.config import SpinConfig
from spin_core.errors import InputError
from tasks.caching import refuse_remote_code


def default_run_dir(config: SpinConfig) -> str:
    return str(Path("runs") / config.run.name)


@flow(name="spin-pipeline", log_prints=True)
def spin_pipeline(config: SpinConfig, run_dir: str | None = None) -> str:
    """Run `config.run.iterations` SPIN iterations; returns the path of report.md.

    Rerunning on the same run directory resumes: finished steps are skipped. Bad input
    (`steps.check_before_start`) fails the run before any step, with the error as the
    state message.
    """
    run_dir = run_dir or default_run_dir(config)
    try:
        refuse_remote_code(config)
        steps.check_before_start(config, run_dir)  # cheap when `spin run` checked already
    except InputError as exc:
        # A bad input is the run's state message, not a task's traceback in the logs.
        get_run_logger().error("spin: error: %s", exc)
        return Failed(message=f"spin: error: {exc}")
    return pipeline.run_pipeline(IterationRunner(), config, run_dir)
