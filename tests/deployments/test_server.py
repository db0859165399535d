"""The deployments on a real server: a run whose training step dies once, retried from the API.

The pipeline runs on the `cpu` worker with `run.execution: deployments`, so generation and
training run as their own flow runs on the `gpu` worker. The training step's process is
killed once (a GPU node lost mid-run); the pipeline run fails, `prefect flow-run retry`
reschedules it, and the retry finishes without redoing or re-dispatching the finished steps.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pandas as pd
import pytest
import yaml

from spin_core.config import load_config
from spin_core.storage.models import is_model_dir
from spin_core.storage.rundir import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(900)]

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def kill_first_training_process(server, timeout: float = 300) -> dict:
    """SIGKILL the spin-train flow run's process as soon as the gpu worker has started it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in server.flow_runs_of("spin-train/spin-train"):
            if run["infrastructure_pid"] and run["state_type"] not in FINAL:
                os.kill(int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1]), signal.SIGKILL)
                return run
        time.sleep(0.2)
    raise AssertionError("no spin-train flow run was started")


def output_stamps(run: RunDir) -> dict:
    """mtimes of the outputs of every step that finished before training.

    train.parquet is the training step's own first output (θt's log-probs, scored by the
    training ranks before their first step): kept across the kill when it was written.
    """
    paths = [run.heldout, run.theta0() / "eval.parquet", run.prompts(0), run.generated(0)]
    paths += [run.pairs(0), *sorted(run.generated_shards(0).glob("part-*.parquet"))]
    paths += [run.train(0)] if run.train(0).exists() else []
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def retried_run(workers, toy_overrides, tmp_path_factory):
    server = workers
    config = load_config(
        "configs/demo.yaml", [*toy_overrides("served"), "run.execution=deployments"]
    )
    run = RunDir(tmp_path_factory.mktemp("served") / "run")
    pipeline = server.deployment("spin-pipeline/spin-pipeline")
    parameters = {"config": config.model_dump(mode="json"), "run_dir": str(run.root)}
    response = server.api.post(
        f"/deployments/{pipeline['id']}/create_flow_run", json={"parameters": parameters}
    )
    response.raise_for_status()
    parent = response.json()

    killed = kill_first_training_process(server)
    first = server.wait_for(parent["id"], {"FAILED", "CRASHED"})
    stamps = output_stamps(run)

    server.prefect(f"prefect flow-run retry {parent['id']}")
    final = server.wait_for(parent["id"], {"COMPLETED"})
    return {"run": run, "first": first, "final": final, "killed": killed, "stamps": stamps}


def test_deployments_sit_on_their_work_pools(deployed):
    pools = {
        name: deployed.deployment(f"{name}/{name}")["work_pool_name"]
        for name in ("spin-pipeline", "spin-next-iteration", "spin-generate", "spin-train")
    }
    assert pools == {
        "spin-pipeline": "cpu",
        "spin-next-iteration": "cpu",
        "spin-generate": "gpu",
        "spin-train": "gpu",
    }
    pipeline = deployed.deployment("spin-pipeline/spin-pipeline")
    assert pipeline["parameters"]["config"]["run"]["execution"] == "deployments"
    # The form is generated from SpinConfig: β and the iterations are fields of it.
    schema = pipeline["parameter_openapi_schema"]["definitions"]
    assert {"beta", "learning_rate"} <= set(schema["TrainingConfig"]["properties"])
    assert "iterations" in schema["RunConfig"]["properties"]
    (schedule,) = deployed.deployment("spin-next-iteration/spin-next-iteration")["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"] is False


def test_the_server_keeps_its_flow_runs_in_postgresql(retried_run, postgres, workers):
    """What the API lists is what PostgreSQL holds; no SQLite database was made."""
    import asyncio

    import asyncpg

    async def flow_run_ids() -> set[str]:
        connection = await asyncpg.connect(postgres.replace("postgresql+asyncpg", "postgresql"))
        try:
            return {str(r["id"]) for r in await connection.fetch("SELECT id FROM flow_run")}
        finally:
            await connection.close()

    listed = {r["id"] for r in workers.api.post("/flow_runs/filter", json={}).json()}
    assert retried_run["final"]["id"] in listed and listed <= asyncio.run(flow_run_ids())
    assert not list(workers.home.rglob("*.db"))


def test_retried_run_completes_with_the_run_directory_of_the_spec(retried_run):
    run = retried_run["run"]
    assert retried_run["final"]["state_type"] == "COMPLETED"
    assert yaml.safe_load(run.config.read_text())["run"]["execution"] == "deployments"
    assert not run.lock.exists()
    assert list(pd.read_parquet(run.prompts(0)).columns) == [
        "id",
        "prompt",
        "real",
        "prompt_ids",
        "real_ids",
    ]
    assert [p.name for p in sorted(run.generated_shards(0).glob("part-*"))] == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    generated = pd.read_parquet(run.generated(0))
    assert len(generated) == 32 and {"generated", "opponent", "decoding"} <= set(generated.columns)
    assert {"opponent_real_logps", "opponent_generated_logps"} <= set(
        pd.read_parquet(run.train(0)).columns
    )
    assert (run.train_state(0) / "metrics.jsonl").exists()
    assert is_model_dir(run.model(0))
    assert json.loads(run.iteration_metrics(0).read_text())["train_steps"] == 2  # 32 / 16
    assert pd.read_parquet(run.metrics)["iteration"].tolist() == [0, 1]
    assert "| θ1 |" in run.report.read_text()
    assert not list(run.root.rglob("*.tmp"))


def test_heavy_steps_ran_as_flow_runs_on_the_gpu_pool(retried_run, workers):
    parent = retried_run["final"]
    root = str(retried_run["run"].root)  # other tests' runs share this server

    def runs_of(deployment: str) -> list[dict]:
        return [r for r in workers.flow_runs_of(deployment) if r["parameters"]["run_dir"] == root]

    (generate,) = runs_of("spin-generate/spin-generate")  # dispatched once
    trains = runs_of("spin-train/spin-train")
    assert generate["state_type"] == "COMPLETED"
    assert [t["state_type"] for t in trains] == ["CRASHED", "COMPLETED"]
    assert trains[0]["id"] == retried_run["killed"]["id"]
    for run in (generate, *trains):
        assert run["work_pool_name"] == "gpu" and run["parameters"]["iteration"] == 0
        assert run["parameters"]["run_dir"] == str(retried_run["run"].root)
        # Linked to the pipeline run as subflows (through its spin-iteration subflow).
        task_run = workers.api.get(f"/task_runs/{run['parent_task_run_id']}").json()
        iteration = workers.flow_run(task_run["flow_run_id"])
        assert iteration["parent_task_run_id"]
        owner = workers.api.get(f"/task_runs/{iteration['parent_task_run_id']}").json()
        assert owner["flow_run_id"] == parent["id"]


def test_retry_did_not_redo_finished_steps(retried_run, workers):
    parent, run = retried_run["final"], retried_run["run"]
    assert retried_run["first"]["state_type"] == "FAILED"
    assert parent["run_count"] == 2  # one flow run, attempted twice: the UI's Retry
    states = workers.api.get("/flow_run_states/", params={"flow_run_id": parent["id"]}).json()
    types = [s["type"] for s in sorted(states, key=lambda s: s["timestamp"])]
    assert "FAILED" in types and types[-1] == "COMPLETED"
    assert types.index("FAILED") < len(types) - 1
    # Every output written before the failure is untouched; training was redone, on the gpu pool.
    after = output_stamps(run)
    assert {path: after[path] for path in retried_run["stamps"]} == retried_run["stamps"]
    # The step journal: what each attempt really executed (it must exist: a missing journal
    # would let a redone step pass unnoticed).
    events = [json.loads(line) for line in (run.root / "steps.jsonl").read_text().splitlines()]
    started = [e["step"] for e in events if e["event"] == "started"]
    for step in ("sample-prompts", "generate-responses", "build-training-set"):
        assert started.count(step) == 1, started


def test_a_run_from_a_deployment_may_not_run_model_code_unless_the_worker_allows_it(
    workers, toy_overrides, tmp_path
):
    """The UI's form lets anyone who can start a deployment type trust_remote_code: true and
    a model path: code execution on the workers. Refused, in one line, before any step."""
    server = workers
    config = load_config(
        "configs/demo.yaml", [*toy_overrides("remote-code"), "model.trust_remote_code=true"]
    )
    run = RunDir(tmp_path / "run")
    pipeline = server.deployment("spin-pipeline/spin-pipeline")
    parameters = {"config": config.model_dump(mode="json"), "run_dir": str(run.root)}
    response = server.api.post(
        f"/deployments/{pipeline['id']}/create_flow_run", json={"parameters": parameters}
    )
    response.raise_for_status()
    failed = server.wait_for(response.json()["id"], {"FAILED"}, timeout=180)
    message = failed["state"]["message"]
    assert message.startswith("spin: error: model.trust_remote_code:"), message
    assert "SPIN_ALLOW_REMOTE_CODE=1" in message
    assert not run.heldout.exists()  # nothing ran


def test_the_remote_code_rule_holds_for_worker_runs_only(monkeypatch):
    """A local `spin run` keeps model.trust_remote_code; a worker's run needs its operator's
    SPIN_ALLOW_REMOTE_CODE=1 (a test of the rule itself: the run above covers the refusal)."""
    from spin_core.errors import InputError
    from tasks.caching import refuse_remote_code

    trusting = load_config("configs/demo.yaml", ["model.trust_remote_code=true"])
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    monkeypatch.delenv("SPIN_ALLOW_REMOTE_CODE", raising=False)
    refuse_remote_code(trusting)  # local
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b7c0d1e-0000-4000-8000-000000000000")
    refuse_remote_code(load_config("configs/demo.yaml"))  # no remote code asked for
    with pytest.raises(InputError, match="SPIN_ALLOW_REMOTE_CODE"):
        refuse_remote_code(trusting)
    monkeypatch.setenv("SPIN_ALLOW_REMOTE_CODE", "1")
    refuse_remote_code(trusting)
