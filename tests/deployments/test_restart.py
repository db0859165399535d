"""The Prefect server restarts under a running pipeline (an upgrade, a crashed host service).

A team's set-up, as README "Scaling out" gives it: a server on PostgreSQL that asks who you
are (`PREFECT_SERVER_API_AUTH_STRING`), the README's pools and deployments, and a `gpu`-pool
process worker that has the credentials. `spin run` with `run.execution: deployments`
dispatches the heavy steps to that worker. Once generation has started there, the server is
stopped and started again 5 s later on the same port and database. The pipeline and the
dispatched step carry on, and the server ends up knowing every flow run completed; the events
sent while it was down are lost (a warning in the log), as the README says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows.server import _healthy
from spin_core.runtime.processes import free_port
from spin_core.storage.journal import read_journal
from tests.deployments.conftest import BIN, ROOT, Api, Process, Server, scaling_out_commands
from tests.overrides import MID_GENERATION, overrides, set_args
from tests.postgres import postgres_database
from tests.postgres import unavailable as postgres_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(900)]

USER, PASSWORD = "spin", "restart-test"


def _server(port: int, env: dict, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port)], env=env, stdout=log, stderr=log, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while not _healthy(f"http://127.0.0.1:{port}/api"):
        assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.5)
    return server


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def _generation_started(run_dir) -> bool:
    return any(
        r["step"] == "generate-responses" and r["event"] == "started" for r in read_journal(run_dir)
    )


def test_a_deployments_run_carries_on_through_a_server_restart(toy_build, tmp_path):
    reason = postgres_unavailable()
    if reason:
        pytest.skip(f"the deployment tests run Prefect on PostgreSQL: {reason}")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    clients = base | {
        "PREFECT_API_URL": api_url,
        "PREFECT_API_AUTH_STRING": f"{USER}:{PASSWORD}",  # workers, CLI and spin run alike
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "flows.cli", "run", "configs/demo.yaml", "--run-dir"]
    command += [str(run_dir), *set_args(overrides(toy_build, MID_GENERATION))]
    command += ["--set", "run.execution=deployments"]
    with (
        postgres_database("restart") as database,
        (tmp_path / "server.log").open("a") as server_log,
        (tmp_path / "spin.log").open("w") as log,
        Api(base_url=api_url, auth=(USER, PASSWORD), timeout=30) as api,
    ):
        serving = base | {
            "PREFECT_API_DATABASE_CONNECTION_URL": database,
            "PREFECT_SERVER_API_AUTH_STRING": f"{USER}:{PASSWORD}",
        }
        server = _server(port, serving, server_log)
        team = Server(url=api_url, env=clients, home=tmp_path / "home", api=api)
        spin = None
        try:
            for line in scaling_out_commands():  # the pools and deployments, as written
                if not line.startswith("prefect worker"):
                    team.prefect(line)
            worker = [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--limit", "1"]
            team.processes.append(Process.start(worker, clients, tmp_path / "worker.log"))
            spin = subprocess.Popen(command, cwd=ROOT, env=clients, stdout=log, stderr=log)
            deadline = time.monotonic() + 400
            while not _generation_started(run_dir):
                assert spin.poll() is None, (tmp_path / "spin.log").read_text()[-3000:]
                assert time.monotonic() < deadline, team.processes[0].tail()
                time.sleep(0.1)
            _stop(server)
            time.sleep(5)
            server = _server(port, serving, server_log)
            assert spin.wait(timeout=600) == 0, (tmp_path / "spin.log").read_text()[-3000:]
            runs = api.post("/flow_runs/filter", json={}).json()
            flows = {f["id"]: f["name"] for f in api.post("/flows/filter", json={}).json()}
            states = {(flows[r["flow_id"]], r["state_type"]) for r in runs}
            # the pipeline and its iteration here, the heavy steps on the worker, all completed
            assert {name for name, _ in states} >= {
                "spin-pipeline",
                "spin-iteration",
                "spin-generate",
                "spin-train",
                "spin-evaluate",
            }
            assert {state for _, state in states} == {"COMPLETED"}, states
            assert (run_dir / "report.md").exists()
        finally:
            if spin is not None and spin.poll() is None:
                spin.kill()
            for process in team.processes:
                process.stop()
            _stop(server)
