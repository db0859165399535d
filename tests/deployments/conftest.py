"""A real Prefect server, the two work pools and their workers (README "Scaling out").

The server keeps its database in its own PREFECT_HOME under the test's tmp directory and
listens on a free port of 127.0.0.1. The pools, the deployments and the workers are made
with the commands of the README's "Scaling out" block, run as they are written, so the
docs cannot drift. Every process started here is stopped by its pid at the end.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from flows.server import prefect_server as start_prefect_server
from spin_core.training.launch import free_port
from tests.overrides import overrides
from tests.postgres import postgres_database
from tests.postgres import unavailable as postgres_unavailable

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def scaling_out_commands() -> list[str]:
    """The commands of README "Scaling out"'s first bash block that deploys the flows, comments
    dropped."""
    section = (ROOT / "README.md").read_text().split("\n## Scaling out\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    block = next(b for b in blocks if "prefect deploy --all" in b)
    lines = (line.split("#")[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


@dataclass
class Process:
    """A process started by a test, with its output in a log file; stopped by pid."""

    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, command: list[str], env: dict, log: Path) -> Process:
        handle = log.open("w")
        popen = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
        handle.close()
        return cls(popen, log)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


class Api(httpx.Client):
    """A client of the server's REST API; a 503 (SQLite busy under load) is retried."""

    def send(self, request, **kwargs):
        for attempt in range(10):
            response = super().send(request, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(0.5 * (attempt + 1))
        return response


@dataclass
class Server:
    url: str  # .../api
    env: dict  # for the CLI, workers and anything else talking to this server
    home: Path
    api: Api
    processes: list[Process] = field(default_factory=list)

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")

    def prefect(self, command: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run a `prefect ...` command line as a user would, against this server."""
        argv = shlex.split(command)
        assert argv[0] == "prefect", command
        result = subprocess.run(
            [str(BIN / "prefect"), *argv[1:]],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, (
            f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        return result

    def deployment(self, name: str) -> dict:
        response = self.api.get(f"/deployments/name/{name}")
        response.raise_for_status()
        return response.json()

    def flow_run(self, flow_run_id: str) -> dict:
        response = self.api.get(f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        return response.json()

    def flow_runs_of(self, deployment: str) -> list[dict]:
        """The deployment's flow runs, oldest first."""
        body = {
            "deployments": {"id": {"any_": [self.deployment(deployment)["id"]]}},
            "sort": "EXPECTED_START_TIME_ASC",
        }
        response = self.api.post("/flow_runs/filter", json=body)
        response.raise_for_status()
        return response.json()

    def wait_for(self, flow_run_id: str, states: set[str], timeout: float = 420) -> dict:
        """Poll a flow run until its state type is one of `states` (e.g. COMPLETED)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            if run["state_type"] in states:
                return run
            if run["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                raise AssertionError(f"{run['name']} ended {run['state_type']}: {self.why(run)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{run['name']} still {run['state_type']} after {timeout}s")
            time.sleep(1)

    def why(self, run: dict) -> str:
        logs = self.api.post(
            "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}
        ).json()
        workers = "\n".join(p.tail(1500) for p in self.processes)
        return (
            (run["state"] or {}).get("message", "")
            + "\n"
            + "\n".join(entry["message"][-400:] for entry in logs[-30:])
            + "\n"
            + workers
        )


@pytest.fixture(scope="session")
def toy_overrides(toy_build):
    """`--set` overrides for one iteration on the session's toy model (well under a CPU minute)."""

    def run_overrides(name: str) -> list[str]:
        return overrides(
            toy_build,
            {
                "run.name": name,
                "run.iterations": 1,
                "run.baseline": "none",
                "data.eval_size": 24,
                "training.global_batch_size": 16,
                "training.micro_batch_size": 16,
                "training.num_epochs": 1,
                "generation.max_new_tokens": 16,
                "generation.shard_size": 16,
            },
        )

    return run_overrides


@pytest.fixture(scope="package")
def postgres():
    """The database of the tests' Prefect server: PostgreSQL, as a team runs Prefect."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(f"the deployment tests run Prefect on PostgreSQL: {reason}")
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="package")
def prefect_server(tmp_path_factory, postgres):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME, on PostgreSQL."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_")  # nothing of the caller's profile or settings
    } | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick runs up quickly
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres,
        "TOKENIZERS_PARALLELISM": "false",
    }
    with start_prefect_server(port, env=env, log=home / "server.log", start_timeout=180) as url:
        with Api(base_url=url, timeout=30) as api:
            yield Server(url=url, env=env, home=home, api=api)


@pytest.fixture(scope="package")
def deployed(prefect_server):
    """The README's work-pool and deploy commands, run as written."""
    for command in scaling_out_commands():
        if not command.startswith("prefect worker"):
            prefect_server.prefect(command)
    return prefect_server


@pytest.fixture(scope="package")
def workers(deployed):
    """The README's `prefect worker start` commands: one worker per pool, until the end."""
    server = deployed
    commands = [c for c in scaling_out_commands() if c.startswith("prefect worker start")]
    assert {re.search(r"--pool (\S+)", c).group(1) for c in commands} == {"cpu", "gpu"}
    for i, command in enumerate(commands):
        argv = [str(BIN / "prefect"), *shlex.split(command)[1:]]
        server.processes.append(Process.start(argv, server.env, server.home / f"worker-{i}.log"))
    try:
        deadline = time.monotonic() + 120
        for pool in ("cpu", "gpu"):
            while not server.api.post(f"/work_pools/{pool}/workers/filter", json={}).json():
                assert time.monotonic() < deadline, "\n".join(p.tail() for p in server.processes)
                time.sleep(1)
        yield server
    finally:
        kill_unfinished_flow_runs(server)
        for process in server.processes:
            process.stop()
        server.processes.clear()


def kill_unfinished_flow_runs(server: Server) -> None:
    """Flow-run processes the workers started and a failed test left running, by pid."""
    body = {"flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}}}}
    for run in server.api.post("/flow_runs/filter", json=body).json():
        if run.get("infrastructure_pid"):
            pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
