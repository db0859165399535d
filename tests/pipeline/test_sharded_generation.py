"""generation.num_workers: one mapped Prefect task per worker, merged in id order, sampled
the same whatever the split; an interrupted run stops its worker threads."""

from __future__ import annotations

import signal
import threading
import time

import pandas as pd
import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from spin_core import interrupt
from spin_core.checkpoint import load_tokenizer
from spin_core.prompts import encode_pairs
from spin_core.rundir import RunDir

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


def test_two_workers_write_the_same_generations_as_one(toy_config, toy_build, tmp_path, harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    heldout = pd.read_parquet(toy_build.eval_path).head(40)
    prompts = pd.DataFrame(
        {
            "id": [f"q{i:03d}" for i in range(len(heldout))],
            "prompt": heldout["messages"].map(lambda m: m[0]["content"]),
            "real": heldout["messages"].map(lambda m: m[1]["content"]),
        }
    )
    tokenizer = load_tokenizer(str(toy_build.model_dir))
    prompts["prompt_ids"], prompts["real_ids"] = encode_pairs(tokenizer, prompts, 64)
    outputs = {}
    for workers in (1, 2):
        run = RunDir(tmp_path / f"w{workers}")
        run.iteration(0).mkdir(parents=True)
        prompts.to_parquet(run.prompts(0))
        config = toy_config.model_copy(deep=True)
        config.generation.num_workers = workers
        config.generation.shard_size = 8
        # Sampled: each shard draws from its own generator, so the split cannot matter.
        config.generation.do_sample = True
        outputs[workers] = pd.read_parquet(
            _generate(config, str(run.root), str(toy_build.model_dir))
        )
    with get_client(sync_client=True) as client:
        shard_tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="generate-shards"))
        )
    # 2 mapped tasks for the two-worker run; a single worker runs in the step's own task.
    assert len(shard_tasks) == 2
    assert sorted(p.name for p in (tmp_path / "w2" / "iter_0" / "generated").iterdir()) == [
        f"part-{k:05d}.parquet" for k in range(5)
    ]
    pd.testing.assert_frame_equal(outputs[2], outputs[1])
    assert outputs[2]["id"].tolist() == prompts["id"].tolist()


def test_ctrl_c_stops_the_generation_worker_threads(harness):
    """Two workers run as threads; SIGINT reaches the main thread only. The workers stop at
    their next batch instead of running their shards to the end while the task runner
    waits for them (it did: an interrupted run ended only when generation was done)."""
    from tasks.context import PrefectContext

    finished = []

    def share(worker: int) -> int:
        for _ in range(600):  # 60 s of batches
            interrupt.check()
            time.sleep(0.1)
        finished.append(worker)
        return worker

    @flow
    def two_workers() -> list:
        return PrefectContext().map(share, [0, 1], name="generate-shards")

    timer = threading.Timer(3.0, signal.raise_signal, (signal.SIGINT,))
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        two_workers()
    assert time.monotonic() - started < 20
    assert finished == []
