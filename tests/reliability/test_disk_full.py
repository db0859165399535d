"""A disk that fills up mid-run: one line saying so, and a rerun after freeing space finishes.

The run directory is a small tmpfs (root only; skipped elsewhere): θ0's first DeepSpeed
checkpoint (13 MB for the toy) fits, the second does not. torch reports that short write as a
C++ assertion ("[enforce fail at inline_container.cc:...] unexpected pos"); the user must
read that the disk is full, where, how much is free, and that a rerun resumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.overrides import overrides, set_args

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def spin_run(run_dir: Path, sets: list[str], home: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.cli", "run", "configs/demo.yaml"]
    command += ["--run-dir", str(run_dir), *sets]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_full_disk_is_one_line_and_a_rerun_after_freeing_space_finishes(
    toy_build, small_disk, tmp_path
):
    run_dir = small_disk / "run"
    changes = {
        "run.iterations": 1,
        "run.baseline": "none",
        "training.save_steps": 1,
        "training.num_epochs": 2,
        "generation.max_new_tokens": 16,
    }
    sets = set_args(overrides(toy_build, changes))
    full = spin_run(run_dir, sets, tmp_path / "home")
    assert full.returncode == 1, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("spin: failed: disk full during iteration 0: train-policy"), last
    assert str(run_dir) in last and " free)" in last
    assert "run the same command again to resume" in last
    assert "Traceback" not in full.stderr and "enforce fail" not in full.stderr
    assert "Traceback" in (run_dir / "spin.log").read_text()  # the details are kept

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    rerun = spin_run(run_dir, sets, tmp_path / "home")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (run_dir / "iter_0" / "model" / "model.safetensors").exists()
    state = run_dir / "iter_0" / "train_state"
    # θ1 is exported and promoted: its checkpoints are gone, its step log stays.
    assert not list(state.glob("step_*")) and not (state / "latest").exists()
    assert (state / "metrics.jsonl").exists()
