"""kill -9 during generation, during training and between iterations; rerun; compare.

Real `spin run` processes and real SIGKILLs. The crashed-and-resumed run must end
with the same generations and per-step losses as an uninterrupted run of the same
config, and no finished step may run again (the step journal records every
execution; a cached step writes nothing there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from spin_core.storage.journal import read_journal
from tests import overrides as small

pytestmark = pytest.mark.slow


def overrides(toy_build) -> list[str]:
    return small.overrides(
        toy_build,
        {
            "data.num_prompts": 64,
            "data.eval_size": 24,
            "run.iterations": 2,
            "run.baseline": "none",
            "generation.shard_size": 8,
            "generation.max_new_tokens": 16,
            "generation.do_sample": False,  # greedy: the resumed output must be identical
            "training.save_steps": 2,
        },
    )


def spin_run(run_dir: Path, toy_build, home: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "run", "configs/demo.yaml"]
    command += ["--run-dir", str(run_dir)]
    for item in overrides(toy_build):
        command += ["--set", item]
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = (run_dir.parent / f"{run_dir.name}.log").open("a")
    # Its own session, so the test can also reap Prefect's temporary server after the kill.
    return subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL the spin process as soon as `ready()` holds (it must not finish first)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "spin run ended before the crash point"
        assert time.monotonic() < deadline, "crash point not reached"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what the crash left behind (Prefect's server)
    except ProcessLookupError:
        pass


def finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    assert proc.wait(timeout=timeout) == 0


@pytest.fixture(scope="module")
def runs(toy_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    home = root / "prefect-home"
    reference, crashed = root / "reference", root / "crashed"
    finish(spin_run(reference, toy_build, home))

    # 1. During generation: the first shard is written, the merged file is not.
    shards = crashed / "iter_0" / "generated"
    kill_when(spin_run(crashed, toy_build, home), lambda: any(shards.glob("part-*.parquet")))
    assert not (crashed / "iter_0" / "generated.parquet").exists()
    first_shard = sorted(shards.glob("part-*.parquet"))[0]
    shard_mtime = first_shard.stat().st_mtime_ns

    # 2. During training, after a checkpoint: θ1 has not been exported yet.
    state = crashed / "iter_0" / "train_state"
    kill_when(spin_run(crashed, toy_build, home), lambda: any(state.glob("step_*/complete.json")))
    assert not (crashed / "iter_0" / "model").exists()

    # 3. Between iterations: iteration 0 is evaluated, iteration 1 not trained.
    kill_when(
        spin_run(crashed, toy_build, home), lambda: (crashed / "iter_0" / "metrics.json").exists()
    )
    assert not (crashed / "iter_1" / "model").exists()

    finish(spin_run(crashed, toy_build, home))
    return reference, crashed, first_shard, shard_mtime


def test_resumed_run_matches_an_uninterrupted_one(runs):
    reference, crashed, _, _ = runs
    for t in (0, 1):
        expected = pd.read_parquet(reference / f"iter_{t}" / "generated.parquet")
        got = pd.read_parquet(crashed / f"iter_{t}" / "generated.parquet")
        pd.testing.assert_frame_equal(
            got.drop(columns=["opponent"]), expected.drop(columns=["opponent"])
        )
        steps = [
            pd.read_json(run / f"iter_{t}" / "train_state" / "metrics.jsonl", lines=True)
            for run in (reference, crashed)
        ]
        assert steps[1]["step"].tolist() == steps[0]["step"].tolist()  # each step once
        assert steps[1]["loss"].to_numpy() == pytest.approx(steps[0]["loss"].to_numpy(), abs=1e-6)
    assert (
        json.loads((crashed / "iter_1" / "metrics.json").read_text())["exact_match"]
        == (json.loads((reference / "iter_1" / "metrics.json").read_text())["exact_match"])
    )


def test_finished_steps_are_not_executed_again(runs):
    _, crashed, first_shard, shard_mtime = runs
    journal = read_journal(crashed)
    finished = Counter((e["step"], e["iteration"]) for e in journal if e["event"] == "finished")
    assert finished and max(finished.values()) == 1, finished
    # A step that had finished before a crash was never computed again: served from the
    # cache, or (killed before its cache record was written) its outputs reused as they were.
    for index, entry in enumerate(journal):
        if entry["event"] == "finished":
            key = (entry["step"], entry["iteration"])
            later = [e["event"] for e in journal[index + 1 :] if (e["step"], e["iteration"]) == key]
            assert set(later) <= {"reused"}, (key, later)
    # Generation was interrupted, then resumed: its first shard was kept, not rewritten.
    assert first_shard.stat().st_mtime_ns == shard_mtime
    started = Counter((e["step"], e["iteration"]) for e in journal if e["event"] == "started")
    assert started[("generate-responses", 0)] == 2
    assert started[("train-policy", 0)] == 2


def test_training_resumed_from_its_checkpoint(runs):
    _, crashed, _, _ = runs
    log = (crashed / "spin.log").read_text()  # the console is quiet; spin.log has every line
    assert "resumed training from step" in log
