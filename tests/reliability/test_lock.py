"""One live run per run directory; a dead run's lock is taken over."""

import json
import subprocess
import sys

import pytest

from spin_core.config import SpinConfig
from spin_core.errors import InputError
from spin_core.storage.rundir import RunDir, RunLock, check_or_save_config


def test_a_live_holder_is_refused_with_its_pid(tmp_path):
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.root.mkdir()
        run.lock.write_text(
            json.dumps(
                {"pid": holder.pid, "host": __import__("socket").gethostname(), "started": "then"}
            )
        )
        with pytest.raises(
            InputError, match=f"held by a live run \\(pid {holder.pid}.*started then"
        ):
            RunLock(run).acquire()
        assert json.loads(run.lock.read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.root.mkdir()
    run.lock.write_text(
        json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname(), "started": "x"})
    )
    with RunLock(run):
        assert json.loads(run.lock.read_text())["pid"] == __import__("os").getpid()
    assert "stale lock" in caplog.text
    assert not run.lock.exists()


def test_a_rerun_with_a_different_config_is_refused_and_nothing_is_overwritten(tmp_path):
    run = RunDir(tmp_path / "run")
    check_or_save_config(run, SpinConfig())
    saved = run.config.read_text()
    changed = SpinConfig()
    changed.training.beta = 0.3
    with pytest.raises(InputError, match="training.beta differ"):
        check_or_save_config(run, changed)
    assert run.config.read_text() == saved
    neutral = SpinConfig()
    neutral.training.save_steps = 3  # does not change results
    check_or_save_config(run, neutral)
