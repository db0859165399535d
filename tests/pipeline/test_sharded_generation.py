"""generation.num_workers as worker processes: the same generated.parquet as one worker,
sampled; a worker killed mid-shard is started again and its shard taken over."""

from __future__ import annotations

import os
import signal
import threading
import time

import pandas as pd
import psutil
import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from spin_core.prompts import encode_pairs
from spin_core.storage.models import load_tokenizer
from spin_core.storage.rundir import RunDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness():
        yield


@flow
def _generate(config, run_dir: str, opponent: str) -> str:
    from spin_core.steps import generate_responses
    from tasks.caching import run_local

    return run_local(generate_responses, config, run_dir, 0, opponent)


@pytest.fixture(scope="module")
def prompts(toy_build):
    heldout = pd.read_parquet(toy_build.eval_path).head(40)
    frame = pd.DataFrame(
        {
            "id": [f"q{i:03d}" for i in range(len(heldout))],
            "prompt": heldout["messages"].map(lambda m: m[0]["content"]),
            "real": heldout["messages"].map(lambda m: m[1]["content"]),
        }
    )
    tokenizer = load_tokenizer(str(toy_build.model_dir))
    frame["prompt_ids"], frame["real_ids"] = encode_pairs(tokenizer, frame, 64)
    return frame


def _run(tmp_path, name: str, prompts, toy_config, toy_build, workers: int, **generation):
    run = RunDir(tmp_path / name)
    run.iteration(0).mkdir(parents=True)
    prompts.to_parquet(run.prompts(0))
    config = toy_config.model_copy(deep=True)
    config.generation.num_workers = workers
    config.generation.shard_size = 8
    # Sampled: each shard draws from its own generator, so the split cannot matter.
    config.generation.do_sample = True
    for key, value in generation.items():
        setattr(config.generation, key, value)
    return run, config


def test_two_worker_processes_write_the_same_generations_as_one(
    toy_config, toy_build, prompts, tmp_path, harness, caplog
):
    outputs, said = {}, {}
    for workers in (1, 2):
        run, config = _run(tmp_path, f"w{workers}", prompts, toy_config, toy_build, workers)
        caplog.clear()
        outputs[workers] = pd.read_parquet(
            _generate(config, str(run.root), str(toy_build.model_dir))
        )
        said[workers] = {
            m.split(":")[0] for m in caplog.messages if m.startswith("generation worker")
        }
    # One worker ran here; two ran as two processes, each saying so in the run's log.
    assert said == {1: set(), 2: {"generation worker 0", "generation worker 1"}}
    shards = tmp_path / "w2" / "iter_0" / "generated"
    assert sorted(p.name for p in shards.iterdir()) == [f"part-{k:05d}.parquet" for k in range(5)]
    pd.testing.assert_frame_equal(outputs[2], outputs[1])
    assert outputs[2]["id"].tolist() == prompts["id"].tolist()
    assert not _workers_alive()  # no worker left behind


@flow
def _evaluate(config, run_dir: str, model: str, out_dir: str) -> dict:
    from spin_core.steps import evaluate
    from tasks.caching import run_local

    return run_local(evaluate, config, run_dir, model, out_dir)


def test_held_out_evaluation_generates_on_the_same_workers(
    toy_config, toy_build, prompts, tmp_path, harness, caplog
):
    """With worker processes configured, held-out evaluation generates on them too (the
    flow process only scores): the same evaluation as one worker in the flow process."""
    frames, metrics, said = {}, {}, {}
    for workers in (1, 2):
        run, config = _run(tmp_path, f"e{workers}", prompts, toy_config, toy_build, workers)
        prompts[["id", "prompt", "real"]].to_parquet(run.heldout)
        out = run.theta0()
        caplog.clear()
        metrics[workers] = _evaluate(config, str(run.root), str(toy_build.model_dir), str(out))
        said[workers] = {m.split(":")[0] for m in caplog.messages if m.startswith("generation")}
        frames[workers] = pd.read_parquet(out / "eval.parquet")
        assert not (out / "eval_generated").exists()  # its shards are gone once merged
    assert said == {1: set(), 2: {"generation worker 0", "generation worker 1"}}
    pd.testing.assert_frame_equal(frames[2], frames[1])
    assert metrics[2]["exact_match"] == metrics[1]["exact_match"]
    assert metrics[2]["real_loglik_per_token"] == metrics[1]["real_loglik_per_token"]


def _workers_alive() -> list:
    return [
        child
        for child in psutil.Process().children(recursive=True)
        if "spin_core.generation.worker" in " ".join(child.cmdline())
    ]


class _Watcher(threading.Thread):
    """Records the pid in every shard claim it sees; kills the first claimant when asked."""

    def __init__(self, shards_dir, kill_first: bool = False):
        super().__init__(daemon=True)
        self.shards_dir, self.kill_first = shards_dir, kill_first
        self.owners: set[int] = set()
        self.killed: list[tuple[int, str]] = []
        self.done = threading.Event()

    def run(self):
        import json

        while not self.done.is_set():
            for path in (
                list(self.shards_dir.glob(".part-*.claim")) if self.shards_dir.exists() else []
            ):
                try:
                    pid = json.loads(path.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                self.owners.add(pid)
                if self.kill_first and not self.killed and pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((pid, path.name))
            time.sleep(0.005)

    def stop(self):
        self.done.set()
        self.join()


def test_a_worker_killed_mid_shard_is_started_again_and_its_shard_taken_over(
    toy_config, toy_build, prompts, tmp_path, harness, caplog
):
    reference_run, config = _run(tmp_path, "ref", prompts, toy_config, toy_build, 1)
    reference = pd.read_parquet(
        _generate(config, str(reference_run.root), str(toy_build.model_dir))
    )

    run, config = _run(tmp_path, "killed", prompts, toy_config, toy_build, 2)
    watcher = _Watcher(run.generated_shards(0), kill_first=True)
    watcher.start()
    out = _generate(config, str(run.root), str(toy_build.model_dir))
    watcher.stop()
    ((killed, claim),) = watcher.killed
    assert claim.startswith(".part-")
    pd.testing.assert_frame_equal(pd.read_parquet(out), reference)
    # The killed worker's shard was taken over and written (the output is whole), and the
    # worker was started again.
    assert any("exited with -9; starting it again" in m for m in caplog.messages)
    assert not list(run.generated_shards(0).glob(".part-*"))
    assert not _workers_alive()
