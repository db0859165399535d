"""The heavy steps as deployments, so they run on GPU workers (README "Scaling out").

With `run.execution: deployments` the iteration hands generation and training to
the `spin-generate` and `spin-train` deployments (work pool `gpu`) through
`run_deployment` and waits for them; everything else runs where the pipeline
runs. Steps pass paths, not objects: each writes its output into the shared run
directory, so a step whose output exists is not dispatched again and a retried
pipeline resumes where it failed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.generate import generate_responses
from tasks.train import train_policy

POLL_SECONDS = 2  # how often a dispatched step's state is read while waiting for it


class StepFailed(RuntimeError):
    """A step's deployment run ended in a state other than Completed."""


@flow(name="spin-generate", flow_run_name="generate-iter-{iteration}", log_prints=True)
def spin_generate(config: SpinConfig, run_dir: str, iteration: int, opponent: str) -> str:
    """Step 2 on a GPU worker: θt writes y' for every prompt → iter_t/generated.parquet."""
    return generate_responses(config, run_dir, iteration, opponent)


@flow(name="spin-train", flow_run_name="train-iter-{iteration}", log_prints=True)
def spin_train(
    config: SpinConfig,
    run_dir: str,
    iteration: int,
    opponent: str,
    opponent_eval: str | None = None,
    lr_scale: float = 1.0,
) -> str:
    """Step 4 on a GPU worker: train θ(t+1) from θt → iter_t/model/."""
    return train_policy(config, run_dir, iteration, opponent, opponent_eval, lr_scale)


@dataclass(frozen=True)
class _Remote:
    deployment: str  # "flow name/deployment name", as in deployments/prefect.yaml
    output: Callable[[RunDir, int], Path]  # the path the step returns


# The steps that run on GPU workers with run.execution=deployments.
REMOTE_STEPS = {
    generate_responses: _Remote("spin-generate/spin-generate", RunDir.generated),
    train_policy: _Remote("spin-train/spin-train", RunDir.model),
}


def run_step(step, config: SpinConfig, run_dir: str, iteration: int, *args):
    """Run a pipeline step here, or on a worker of its deployment (`run.execution`).

    Deployed, the step gets plain JSON parameters; this flow waits for its run and
    fails if it did not complete. Either way the step's output path is returned.
    """
    remote = REMOTE_STEPS.get(step)
    if config.run.execution == "local" or remote is None:
        return step(config, run_dir, iteration, *args)
    run, log = RunDir(run_dir), get_run_logger()
    output = str(remote.output(run, iteration))
    signature = inspect.signature(getattr(step, "fn", step))  # a Prefect task or a function
    parameters = signature.bind(config, run_dir, iteration, *args).arguments
    if step.done(parameters):  # the step's own completeness check (tasks.caching.step)
        log.info("iteration %d: %s exists, skipped (not dispatched)", iteration, output)
        return output
    parameters["config"] = config.model_dump(mode="json")
    log.info("iteration %d: dispatching %s", iteration, remote.deployment)
    flow_run = run_deployment(
        remote.deployment, parameters=parameters, timeout=None, poll_interval=POLL_SECONDS
    )
    if not flow_run.state.is_completed():
        raise StepFailed(
            f"iteration {iteration}: {remote.deployment} run {flow_run.name} ended "
            f"{flow_run.state.type.value}: {flow_run.state.message}"
        )
    return output
