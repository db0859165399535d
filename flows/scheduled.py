"""The scheduled entry point: one more SPIN iteration on an existing run.

`deployments/prefect.yaml` registers `spin_next_iteration` as `spin-next-iteration` with
an (inactive) nightly cron: each run resumes the run directory with one iteration more.
"""

from __future__ import annotations

import yaml
from prefect import flow, get_run_logger

from flows.pipeline import spin_pipeline
from spin_core.config import SpinConfig, validate_config
from spin_core.errors import InputError
from spin_core.storage.rundir import RunDir


def next_iteration_config(run: RunDir, max_iterations: int) -> SpinConfig | None:
    """The run's own config, asking for one iteration more than it finished (None at the cap)."""
    if not run.config.is_file():
        raise InputError(f"{run.config}: not a run directory (start it with `spin run` first)")
    config = validate_config(yaml.safe_load(run.config.read_text()) or {}, str(run.config))
    finished = len(run.finished_iterations())
    if finished >= max_iterations:
        return None
    return config.model_copy(
        update={"run": config.run.model_copy(update={"iterations": finished + 1})}
    )


@flow(name="spin-next-iteration", log_prints=True)
def spin_next_iteration(run_dir: str, max_iterations: int = 10) -> str | None:
    """One more SPIN iteration on an existing run (what the example cron schedule starts).

    Finished iterations are skipped as in any resumed run; a run that stopped (collapse,
    early stop) stops again at the same place. Returns the report path.
    """
    config = next_iteration_config(RunDir(run_dir), max_iterations)
    if config is None:
        get_run_logger().info("%s: %d iterations finished, nothing to do", run_dir, max_iterations)
        return None
    return spin_pipeline(config, run_dir)
