"""The heavy steps as deployments, so they run on GPU workers (README "Scaling out").

With `run.execution: deployments` the iteration hands generation, training and
evaluation (held-out and lm-eval) to the `spin-generate`, `spin-train`, `spin-evaluate`
and `spin-lm-eval` deployments (work pool `gpu`) through
`run_deployment` and waits for them; everything else runs where the pipeline
runs. Steps pass paths, not objects: each writes its output into the shared run
directory, so a step whose output exists is not dispatched again and a retried
pipeline resumes where it failed.

One `spin-generate` run takes a whole machine: it starts `generation.num_workers` worker
processes there, one per GPU (spin_core/generation/workers.py), so a work-pool worker
started with `--limit 1` still uses all its GPUs.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from spin_core import steps
from spin_core.config import SpinConfig
from spin_core.execution import Step
from tasks.caching import run_local

POLL_SECONDS = 2  # how often a dispatched step's state is read while waiting for it


class StepFailed(RuntimeError):
    """A step's deployment run ended in a state other than Completed."""


@flow(name="spin-generate", flow_run_name="generate-iter-{iteration}", log_prints=True)
def spin_generate(config: SpinConfig, run_dir: str, iteration: int, opponent: str) -> str:
    """Step 2 on a GPU machine: θt writes y' for every prompt → iter_t/generated.parquet,
    with `generation.num_workers` worker processes over the machine's GPUs."""
    return run_local(steps.generate_responses, config, run_dir, iteration, opponent)


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
    return run_local(
        steps.train_policy, config, run_dir, iteration, opponent, opponent_eval, lr_scale
    )


@flow(name="spin-evaluate", flow_run_name="evaluate-model", log_prints=True)
def spin_evaluate(
    config: SpinConfig,
    run_dir: str,
    model: str,
    out_dir: str,
    opponent_dir: str | None = None,
    iteration: int | None = None,
) -> dict:
    """Step 5 on a GPU machine: held-out generation and scoring of `model` → out_dir/."""
    return run_local(steps.evaluate, config, run_dir, model, out_dir, opponent_dir, iteration)


@flow(name="spin-lm-eval", flow_run_name="lm-eval", log_prints=True)
def spin_lm_eval(
    config: SpinConfig, run_dir: str, model: str, out_dir: str, iteration: int | None = None
) -> dict:
    """lm-evaluation-harness on a GPU machine → out_dir/lm_eval.json."""
    return run_local(steps.lm_eval_model, config, run_dir, model, out_dir, iteration)


# The steps that run on GPU workers with run.execution=deployments: their deployment
# ("flow name/deployment name", as in deployments/prefect.yaml). What a worker's run leaves
# behind is the step's own declared output, read back with `Step.load`.
REMOTE_STEPS = {
    steps.generate_responses: "spin-generate/spin-generate",
    steps.train_policy: "spin-train/spin-train",
    steps.evaluate: "spin-evaluate/spin-evaluate",
    steps.lm_eval_model: "spin-lm-eval/spin-lm-eval",
}


class PrefectRunner:
    """Runs spin_core's steps as cached Prefect tasks, or on GPU workers (`run.execution`)."""

    @property
    def log(self):
        return get_run_logger()

    def step(self, step: Step, config: SpinConfig, run_dir: str, *args, **kwargs) -> Any:
        """Run a step here, or on a worker of its deployment; either way return its result.

        Deployed, the step gets plain JSON parameters; this flow waits for its run and
        fails if it did not complete.
        """
        deployment = REMOTE_STEPS.get(step)
        if config.run.execution == "local" or deployment is None:
            return run_local(step, config, run_dir, *args, **kwargs)
        parameters = step.params(config, run_dir, *args, **kwargs)
        iteration = parameters.get("iteration")
        where = "before iteration 0" if iteration is None else f"iteration {iteration}"
        if step.complete(parameters):
            self.log.info("%s: %s done before, not dispatched", where, step.name)
            return step.load(parameters)
        self.log.info("%s: dispatching %s", where, deployment)
        flow_run = run_deployment(
            deployment,
            parameters=parameters | {"config": config.model_dump(mode="json")},
            timeout=None,
            poll_interval=POLL_SECONDS,
        )
        if not flow_run.state.is_completed():
            raise StepFailed(
                f"{where}: {deployment} run {flow_run.name} ended "
                f"{flow_run.state.type.value}: {flow_run.state.message}"
            )
        return step.load(parameters)
