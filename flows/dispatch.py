"""The heavy steps as deployments, so they run on GPU workers (README "Scaling out").

With `run.execution: deployments` the iteration hands generation and training to
the `spin-generate` and `spin-train` deployments (work pool `gpu`) through
`run_deployment` and waits for them; everything else runs where the pipeline
runs. Steps pass paths, not objects: each writes its output into the shared run
directory, so a step whose output exists is not dispatched again and a retried
pipeline resumes where it failed.

With `generation.num_workers: N` generation is N `spin-generate` runs at once, one
per generation worker (shard k goes to worker k % N), on as many GPU machines as the
pool has; a worker whose run fails is dispatched once more, alone, and the others'
shards are kept. The pipeline then merges the shards into generated.parquet.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from spin_core import steps
from spin_core.config import SpinConfig
from spin_core.step import Step, journal
from tasks.caching import run_local

POLL_SECONDS = 2  # how often a dispatched step's state is read while waiting for it
WORKER_ATTEMPTS = 2  # a generation worker's run that failed is dispatched once more, alone


class StepFailed(RuntimeError):
    """A step's deployment run ended in a state other than Completed."""


def _generate_run_name() -> str:
    parameters = runtime.flow_run.parameters
    worker = parameters.get("worker")
    return f"generate-iter-{parameters['iteration']}" + ("" if worker is None else f"-w{worker}")


@flow(name="spin-generate", flow_run_name=_generate_run_name, log_prints=True)
def spin_generate(
    config: SpinConfig, run_dir: str, iteration: int, opponent: str, worker: int | None = None
) -> str:
    """Step 2 on a GPU worker: θt writes y' for every prompt → iter_t/generated.parquet;
    with `worker`, only that generation worker's shards → iter_t/generated/."""
    if worker is None:
        return run_local(steps.generate_responses, config, run_dir, iteration, opponent)
    return run_local(steps.generate_share, config, run_dir, iteration, opponent, worker)


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


# The steps that run on GPU workers with run.execution=deployments: their deployment
# ("flow name/deployment name", as in deployments/prefect.yaml). What a worker's run leaves
# behind is the step's own declared output (`Step.output`).
REMOTE_STEPS = {
    steps.generate_responses: "spin-generate/spin-generate",
    steps.train_policy: "spin-train/spin-train",
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
        if step is steps.generate_responses and config.generation.num_workers > 1:
            return self._generate_on_workers(step.params(config, run_dir, *args, **kwargs))
        parameters = step.params(config, run_dir, *args, **kwargs)
        iteration = parameters["iteration"]
        output = str(step.output(parameters))
        if step.complete(parameters):
            self.log.info("iteration %d: %s exists, skipped (not dispatched)", iteration, output)
            return output
        parameters["config"] = config.model_dump(mode="json")
        self.log.info("iteration %d: dispatching %s", iteration, deployment)
        flow_run = run_deployment(
            deployment, parameters=parameters, timeout=None, poll_interval=POLL_SECONDS
        )
        if not flow_run.state.is_completed():
            raise StepFailed(
                f"iteration {iteration}: {deployment} run {flow_run.name} ended "
                f"{flow_run.state.type.value}: {flow_run.state.message}"
            )
        return output

    def _generate_on_workers(self, parameters: dict) -> str:
        """Step 2 as one `spin-generate` run per generation worker, all at once; the
        failed ones dispatched again alone; then the shards merged here."""
        config, run_dir, iteration = (parameters[k] for k in ("config", "run_dir", "iteration"))
        output = str(steps.generate_responses.output(parameters))
        if steps.generate_responses.complete(parameters):
            self.log.info("iteration %d: %s exists, skipped (not dispatched)", iteration, output)
            return output
        workers = range(config.generation.num_workers)
        pending = [
            k for k in workers if not steps.generate_share.complete(parameters | {"worker": k})
        ]
        if len(pending) < len(workers):
            self.log.info(
                "iteration %d: generation workers %s finished before",
                iteration,
                sorted(set(workers) - set(pending)),
            )
        journal(run_dir, steps.generate_responses.name, iteration, "started")
        try:
            self._run_workers(parameters | {"config": config.model_dump(mode="json")}, pending)
            out = steps.merge_generated(self.log, config, run_dir, iteration)
        except BaseException as error:
            journal(run_dir, steps.generate_responses.name, iteration, "failed", error=repr(error))
            raise
        journal(run_dir, steps.generate_responses.name, iteration, "finished")
        return out

    def _run_workers(self, parameters: dict, pending: list[int]) -> None:
        """Dispatch the generation workers `pending` at once and wait for them; those that
        did not complete are dispatched again, alone, up to WORKER_ATTEMPTS in all."""
        iteration = parameters["iteration"]
        failed: dict[int, Any] = {}
        for attempt in range(WORKER_ATTEMPTS):
            if attempt:
                self.log.warning(
                    "iteration %d: generation workers %s failed; dispatching them again",
                    iteration,
                    pending,
                )
            runs = {k: self._dispatch_worker(parameters, k) for k in pending}
            failed = {k: run for k, run in self._wait(runs).items() if not run.state.is_completed()}
            pending = sorted(failed)
            if not failed:
                return
        raise StepFailed(
            f"iteration {iteration}: spin-generate "
            + "; ".join(
                f"worker {k} run {run.name} ended {run.state.type.value}: {run.state.message}"
                for k, run in failed.items()
            )
        )

    def _dispatch_worker(self, parameters: dict, worker: int):
        deployment = REMOTE_STEPS[steps.generate_responses]
        self.log.info(
            "iteration %d: dispatching %s, generation worker %d of %d",
            parameters["iteration"],
            deployment,
            worker,
            parameters["config"]["generation"]["num_workers"],
        )
        # timeout=0: created (a subflow of this run), not waited for: the workers run at once.
        return run_deployment(
            deployment,
            parameters=parameters | {"worker": worker},
            flow_run_name=f"generate-iter-{parameters['iteration']}-w{worker}",  # if never started
            timeout=0,
        )

    def _wait(self, runs: dict) -> dict:
        """The flow runs `runs` (by worker), read again until every one is final."""
        with get_client(sync_client=True) as client:
            while True:
                runs = {k: client.read_flow_run(run.id) for k, run in runs.items()}
                if all(run.state is not None and run.state.is_final() for run in runs.values()):
                    return runs
                time.sleep(POLL_SECONDS)
