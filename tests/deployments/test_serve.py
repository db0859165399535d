"""`spin serve` alone: starts a local Prefect server, serves the flows, stops both on SIGTERM
to its process group (exit 143)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from spin_core.config import load_config
from spin_core.training.launch import free_port
from tests.deployments.conftest import BIN, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(600)]

SERVED = {
    "spin-pipeline",
    "spin-iteration",
    "spin-generate",
    "spin-train",
    "spin-evaluate",
    "spin-lm-eval",
    "spin-next-iteration",
    "spin-compare",
}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


AUTH = ("spin", "s3cret")  # PREFECT_SERVER_API_AUTH_STRING "spin:s3cret", as Basic auth


def test_spin_serve_without_credentials_refuses_an_address_others_can_reach(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", "--host", "0.0.0.0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("spin: error: --host 0.0.0.0:")
    assert "PREFECT_SERVER_API_AUTH_STRING" in line and "--insecure" in line
    assert not (tmp_path / "home").exists() or not list((tmp_path / "home").rglob("*.db"))


def test_spin_serve_starts_a_server_and_serves_the_flows(tmp_path, toy_overrides):
    """On all addresses with credentials: the API refuses a client without them (a worker too),
    `spin serve` registers with them, and a run it serves completes (its flow-run process
    sends them). A service manager's SIGTERM to the group then stops both."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_AUTH_STRING": ":".join(AUTH),
        "DO_NOT_TRACK": "1",
    }
    log = tmp_path / "serve.log"
    command = ["serve", "--config", "configs/demo.yaml", "--host", "0.0.0.0", "--port", str(port)]
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *command],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal or systemd starts it
        )
    started, stopped = [], False
    api = httpx.Client(base_url=api_url, auth=AUTH, timeout=30)
    try:
        deadline = time.monotonic() + 240
        deployments: dict = {}
        while set(deployments) != SERVED:
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            started = sorted(set(started) | set(_children(serve.pid)))
            time.sleep(1)
            try:
                found = api.post("/deployments/filter", json={})
            except httpx.HTTPError:
                continue
            if found.status_code == 200:
                deployments = {d["name"]: d for d in found.json()}
        demo = load_config("configs/demo.yaml").model_dump(mode="json")
        assert deployments["spin-pipeline"]["parameters"]["config"] == demo
        assert f"Prefect UI at http://{socket.getfqdn()}:{port}" in log.read_text()
        assert httpx.post(f"{api_url}/deployments/filter", json={}).status_code == 401

        # A worker without the credentials is refused; the runner's flow run, with them, runs.
        worker_env = {k: v for k, v in env.items() if "AUTH" not in k}
        refused = subprocess.run(
            [str(BIN / "prefect"), "worker", "start", "--pool", "nobody", "--type", "process"],
            env=worker_env | {"PREFECT_API_URL": api_url},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
        config = load_config("configs/demo.yaml", toy_overrides("authenticated"))
        parameters = {"config": config.model_dump(mode="json"), "run_dir": str(tmp_path / "run")}
        pipeline = deployments["spin-pipeline"]["id"]
        run = api.post(f"/deployments/{pipeline}/create_flow_run", json={"parameters": parameters})
        run.raise_for_status()
        deadline = time.monotonic() + 420
        while (state := api.get(f"/flow_runs/{run.json()['id']}").json()["state_type"]) not in (
            "COMPLETED", "FAILED", "CRASHED",
        ):  # fmt: skip
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        assert state == "COMPLETED", log.read_text()[-3000:]
        assert (tmp_path / "run" / "report.md").exists()

        # A service manager stops the whole group: the server it started gets it too.
        os.killpg(serve.pid, signal.SIGTERM)
        assert serve.wait(timeout=20) == 143, log.read_text()[-3000:]
        with pytest.raises(httpx.HTTPError):  # the server it started is stopped with it
            httpx.get(f"{api_url}/health", timeout=5)
        stopped = True
    finally:
        api.close()
        if not stopped:  # a failed test: `spin serve` and the server it started, by pid
            for pid in [serve.pid, *started]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        serve.wait()


def test_a_killed_spin_serve_takes_its_prefect_server_with_it(tmp_path):
    """kill -9 (the OOM killer, a timeout) runs no cleanup, and the server `spin serve` starts
    has a session of its own: without the kernel's parent-death signal it lived on."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    code = (
        "import sys, time\n"
        "from flows.server import prefect_server\n"
        f"with prefect_server({port}) as url:\n"
        "    print(url, flush=True)\n"
        "    time.sleep(600)\n"
    )
    serving = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    url = serving.stdout.readline().strip()  # once the server answers
    server = _children(serving.pid)
    try:
        assert url == f"http://127.0.0.1:{port}/api"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        serving.kill()
        serving.wait()
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2)
            except httpx.HTTPError:
                break  # gone
            assert time.monotonic() < deadline, "the Prefect server outlived `spin serve`"
            time.sleep(0.5)
    finally:
        for pid in server:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
