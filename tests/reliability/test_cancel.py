"""Stopping a run stops its children: no DeepSpeed rank outlives a cancelled `spin run`.

A Prefect worker cancels a deployment run by sending SIGTERM to the flow's process;
a scheduler or an operator does the same. The test sends that signal while two
training ranks run, and checks that every process the run started is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.overrides import overrides, set_args

pytestmark = pytest.mark.slow


def test_sigterm_stops_every_training_rank(toy_build, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "flows.cli", "run", "configs/demo.yaml"]
    command += ["--run-dir", str(run_dir)]
    changes = {
        "data.num_prompts": 64,
        "run.iterations": 1,
        "run.baseline": "none",
        "generation.max_new_tokens": 16,
        "training.num_processes": 2,
        "training.zero_stage": 2,
        "training.num_epochs": 50,  # long enough to be cancelled mid-training
    }
    command += set_args(overrides(toy_build, changes))
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    log = (tmp_path / "spin.log").open("w")
    spin = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        parent = psutil.Process(spin.pid)
        deadline = time.monotonic() + 300
        ranks: list[psutil.Process] = []
        while len(ranks) < 2 or not (run_dir / "iter_0" / "train_state" / "metrics.jsonl").exists():
            assert spin.poll() is None, (tmp_path / "spin.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training ranks never started"
            descendants = parent.children(recursive=True)
            ranks = [p for p in descendants if "spin_core.training.rank" in " ".join(_cmd(p))]
            time.sleep(0.2)
        started = parent.children(recursive=True)

        spin.send_signal(signal.SIGTERM)
        assert spin.wait(timeout=60) == 143
        time.sleep(1)
        survivors = [p for p in started if _alive(p)]
        assert not survivors, [(p.pid, _cmd(p)) for p in survivors]
        assert "run the same command again to resume" in (tmp_path / "spin.log").read_text()
        assert not (run_dir / ".lock").exists()  # released on the way out
    finally:
        try:
            os.killpg(spin.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmd(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
