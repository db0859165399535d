"""Generation across machines: `generation.num_workers: 2` as two `spin-generate` runs at once.

Two process workers on the `gpu` pool of a real server stand for two GPU machines. The
dispatching flow (what the pipeline's iteration runs with `run.execution: deployments`)
runs in its own process against the server. Worker 1's first run is killed (a machine
lost); it alone is dispatched again, worker 0's shards are kept, and the merged
generated.parquet equals a single local worker's under greedy decoding.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
from prefect import flow

from flows.dispatch import PrefectRunner
from spin_core import steps
from spin_core.config import SpinConfig, load_config
from spin_core.generation import shard_path
from spin_core.rundir import RunDir
from spin_core.step import PlainContext, execute, read_journal
from tests.deployments.conftest import BIN, ROOT, Process

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(900)]

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@flow(name="dispatch-generation")
def dispatch_generation(config: dict, run_dir: str, opponent: str) -> str:
    """Step 2 of iteration 0 as the iteration flow runs it with run.execution=deployments."""
    return PrefectRunner().step(
        steps.generate_responses, SpinConfig.model_validate(config), run_dir, 0, opponent
    )


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _runs_by_worker(server) -> dict[int, list[dict]]:
    runs: dict[int, list[dict]] = {}
    for run in server.flow_runs_of("spin-generate/spin-generate"):
        runs.setdefault(run["parameters"].get("worker"), []).append(run)
    return runs


def _kill_first_run_of(server, worker: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in _runs_by_worker(server).get(worker, []):
            if run["infrastructure_pid"] and run["state_type"] not in FINAL:
                os.kill(int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1]), signal.SIGKILL)
                return run
        time.sleep(0.2)
    raise AssertionError(f"no spin-generate run of worker {worker} was started")


def _wait_completed(server, worker: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in _runs_by_worker(server).get(worker, []):
            if run["state_type"] == "COMPLETED":
                return run
        time.sleep(0.5)
    raise AssertionError(f"worker {worker}'s spin-generate run did not complete")


@pytest.fixture(scope="module")
def second_gpu_worker(workers):
    """One more `prefect worker start --pool gpu --limit 1`: a second GPU machine."""
    server = workers
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--limit", "1"]
    process = Process.start(command, server.env, server.home / "worker-gpu-2.log")
    server.processes.append(process)
    try:
        deadline = time.monotonic() + 120
        while len(server.api.post("/work_pools/gpu/workers/filter", json={}).json()) < 2:
            assert time.monotonic() < deadline, process.tail()
            time.sleep(1)
        yield server
    finally:
        process.stop()
        server.processes.remove(process)


@pytest.fixture(scope="module")
def generated(second_gpu_worker, toy_overrides, tmp_path_factory):
    server = second_gpu_worker
    root = tmp_path_factory.mktemp("generate-workers")
    base = [*toy_overrides("generate-workers"), "generation.shard_size=8"]  # 32 prompts: 4 shards
    local = load_config("configs/demo.yaml", base)
    deployed = load_config(
        "configs/demo.yaml", [*base, "generation.num_workers=2", "run.execution=deployments"]
    )
    single, spread = RunDir(root / "single"), RunDir(root / "spread")
    opponent = local.model.name_or_path
    ctx = PlainContext()
    execute(steps.sample_prompts, ctx, steps.sample_prompts.params(local, str(single.root), 0))
    spread.prompts(0).parent.mkdir(parents=True)
    shutil.copyfile(single.prompts(0), spread.prompts(0))
    params = steps.generate_responses.params(local, str(single.root), 0, opponent)
    execute(steps.generate_responses, ctx, params)  # the reference: one local worker

    script = (
        "import json, sys\n"
        "from tests.deployments.test_generate_workers import dispatch_generation\n"
        "print(dispatch_generation(**json.loads(sys.argv[1])))\n"
    )
    arguments = {
        "config": deployed.model_dump(mode="json"),
        "run_dir": str(spread.root),
        "opponent": opponent,
    }
    log = root / "dispatch.log"
    with log.open("w") as handle:
        dispatcher = subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(arguments)],
            cwd=ROOT,
            env=server.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    started = time.monotonic()
    try:
        killed = _kill_first_run_of(server, worker=1)
        first = _wait_completed(server, worker=0)
        kept = [shard_path(spread.generated_shards(0), k) for k in (0, 2)]  # worker 0's
        stamps = {str(p): p.stat().st_mtime_ns for p in kept}
        code = dispatcher.wait(timeout=360)
    finally:
        if dispatcher.poll() is None:
            dispatcher.kill()
            dispatcher.wait()
    assert code == 0, log.read_text()[-4000:] + server.why(killed)
    print(f"dispatched generation took {time.monotonic() - started:.0f} s")
    return {
        "single": single,
        "spread": spread,
        "killed": killed,
        "first": first,
        "stamps": stamps,
        "runs": _runs_by_worker(server),
    }


def _plain(column: pd.Series) -> list:
    return [v.tolist() if isinstance(v, np.ndarray) else v for v in column]


def test_merged_generations_equal_one_local_workers(generated):
    single = pd.read_parquet(generated["single"].generated(0))
    spread = pd.read_parquet(generated["spread"].generated(0))
    assert len(spread) == 32 and list(spread.columns) == list(single.columns)
    assert spread["id"].tolist() == single["id"].tolist()  # prompt order
    for column in single.columns:  # the token-id columns hold arrays
        assert _plain(spread[column]) == _plain(single[column]), column


def test_each_worker_ran_on_the_gpu_pool_with_its_own_shards(generated):
    runs = generated["runs"]
    assert sorted(runs) == [0, 1]
    assert [r["state_type"] for r in runs[0]] == ["COMPLETED"]  # dispatched once
    assert [r["state_type"] for r in runs[1]] == ["CRASHED", "COMPLETED"]  # retried alone
    assert runs[1][0]["id"] == generated["killed"]["id"]
    # Both were sent at once: worker 1's run existed before worker 0's had finished.
    assert _time(runs[1][0]["created"]) < _time(runs[0][0]["end_time"])
    for run in (*runs[0], *runs[1]):
        assert run["work_pool_name"] == "gpu" and run["parameters"]["iteration"] == 0
        assert run["name"] == f"generate-iter-0-w{run['parameters']['worker']}"


def test_the_retry_redid_only_the_failed_workers_shards(generated):
    spread = generated["spread"]
    after = {path: os.stat(path).st_mtime_ns for path in generated["stamps"]}
    assert after == generated["stamps"]  # worker 0's shards untouched by worker 1's retry
    assert sorted(p.name for p in spread.generated_shards(0).glob("part-*")) == [
        f"part-{k:05d}.parquet" for k in range(4)
    ]
    events = read_journal(spread.root)
    started = [(e["step"], e["event"]) for e in events if e["event"] in ("started", "finished")]
    # One finished share per worker (worker 0's never redone); the killed run of worker 1
    # adds a "started" only when it was killed after its step began.
    assert started.count(("generate-share", "finished")) == 2
    assert started.count(("generate-share", "started")) in (2, 3)
    assert started[0] == ("generate-responses", "started")
    assert started[-1] == ("generate-responses", "finished")
