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
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from spin_core.config import SpinConfig, validate_config
from spin_core.errors import InputError
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


def next_iteration_config(run: RunDir, max_iterations: int) -> SpinConfig | None:
    """The run's own config, asking for one iteration more than it finished (None at the cap)."""
    if not run.config.is_file():
        raise InputError(f"{run.config}: not a run directory (start it with `spin run` first)")
    config = validate_config(yaml.safe_load(run.config.read_text()) or {}, str(run.config))
    finished = 0
    while run.iteration_metrics(finished).is_file():
        finished += 1
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
    from flows.pipeline import spin_pipeline  # flows.pipeline imports this module

    config = next_iteration_config(RunDir(run_dir), max_iterations)
    if config is None:
        get_run_logger().info("%s: %d iterations finished, nothing to do", run_dir, max_iterations)
        return None
    return spin_pipeline(config, run_dir)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def prefect_api(start_timeout: float = 120) -> Iterator[str]:
    """The Prefect API to register with: PREFECT_API_URL, else a local server started here.

    The local server listens on 127.0.0.1 at PREFECT_SERVER_API_PORT (4200 by default),
    keeps its database in PREFECT_HOME, and is stopped on exit; one already answering
    on that port is used as it is.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_API_PORT, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = PREFECT_SERVER_API_PORT.value()
    url = f"http://127.0.0.1:{port}/api"
    server = None
    if not _healthy(url):
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        server = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                server.wait()
                raise RuntimeError(f"the Prefect server on port {port} did not start")
            time.sleep(0.5)
    print(f"Prefect UI at {url.removesuffix('/api')}", flush=True)
    os.environ["PREFECT_API_URL"] = url  # for the flow-run processes this one starts
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
