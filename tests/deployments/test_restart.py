"""The Prefect server restarts under a running pipeline (an upgrade, a crashed host service).

`spin run` against a team's server (PostgreSQL), whose server is stopped once generation has
started and started again 15 s later on the same port and database: the run carries on,
finishes, and the server ends up knowing it completed. What is lost is the events sent while it
was down (a warning in the log), which README "Scaling out" says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from flows.server import _healthy
from spin_core.launch import free_port
from spin_core.step import read_journal
from tests.deployments.conftest import ROOT
from tests.overrides import MID_GENERATION, overrides, set_args

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(900)]


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


def test_a_run_carries_on_through_a_server_restart(postgres, toy_build, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres,
        "DO_NOT_TRACK": "1",
    }
    run_dir = tmp_path / "run"
    changes = MID_GENERATION
    command = [sys.executable, "-m", "flows.cli", "run", "configs/demo.yaml", "--run-dir"]
    command += [str(run_dir), *set_args(overrides(toy_build, changes))]
    with (
        (tmp_path / "server.log").open("a") as server_log,
        (tmp_path / "spin.log").open("w") as log,
    ):
        server = _server(port, env, server_log)
        spin = subprocess.Popen(
            command, cwd=ROOT, env=env | {"PREFECT_API_URL": api}, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 400
            while not any(
                r["step"] == "generate-responses" and r["event"] == "started"
                for r in read_journal(run_dir)
            ):
                assert spin.poll() is None, (tmp_path / "spin.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "generation never started"
                time.sleep(0.1)
            _stop(server)
            time.sleep(15)
            server = _server(port, env, server_log)
            assert spin.wait(timeout=600) == 0, (tmp_path / "spin.log").read_text()[-3000:]
            runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()
            assert len(runs) == 2  # the pipeline and its iteration, both known as completed
            assert {r["state_type"] for r in runs} == {"COMPLETED"}, runs
            assert (run_dir / "report.md").exists()
        finally:
            if spin.poll() is None:
                spin.kill()
            _stop(server)
