"""tasks/caching.py and spin_core/execution.py: fingerprints, cache keys, and a step whose outputs
exist is loaded, not run, under Prefect and under the plain driver alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from spin_core.config import load_config
from spin_core.driver import PlainRunner
from spin_core.execution import step
from spin_core.storage.journal import read_journal
from spin_core.storage.rundir import RunDir
from tasks import caching


def test_fingerprint_follows_content_and_skips_files_being_written(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"a" * 100)
    first = caching.fingerprint(folder)
    (folder / ".weights.bin.partial").write_bytes(b"half")  # written aside: not an input yet
    assert caching.fingerprint(folder) == first
    (folder / "weights.bin").write_bytes(b"b" * 100)
    assert caching.fingerprint(folder) != first
    assert caching.fingerprint(tmp_path / "nowhere") == "missing"
    # Above the limit (7B weights) only size and mtime count: same bytes, new mtime, new key.
    monkeypatch.setattr(caching, "HASHED_FILE_LIMIT", 10)
    big = caching.fingerprint(folder)
    (folder / "weights.bin").write_bytes(b"b" * 100)
    assert caching.fingerprint(folder) != big


def test_cache_key_ignores_result_neutral_fields_but_not_the_rest(tmp_path):
    inputs = tmp_path / "prompts.parquet"
    inputs.write_bytes(b"x")
    policy = caching.StepInputs(step="s", sections=("training",), files=lambda p: [inputs])
    config = load_config("configs/demo.yaml")

    def key(cfg):
        return policy.compute_key(None, {"config": cfg, "run_dir": "r", "iteration": 0}, {})

    same = config.model_copy(deep=True)
    same.training.save_steps = 7  # may change on resume: not part of the key
    changed = config.model_copy(deep=True)
    changed.training.beta = 0.5
    assert key(same) == key(config) != key(changed)
    before = key(config)
    inputs.write_bytes(b"y")  # an input file changed: a new key
    assert key(config) != before
    assert key(config) != policy.compute_key(
        None, {"config": config, "run_dir": "r", "iteration": 1}, {}
    )


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness():
        yield


@pytest.mark.slow  # real flows on a Prefect server
def test_a_step_with_complete_outputs_is_loaded_not_run(harness, tmp_path):
    calls = []
    out = tmp_path / "out.txt"

    @step(
        "demo-step",
        sections=("training",),
        done=lambda params: out.exists(),
        load=lambda params: "loaded " + out.read_text(),
    )
    def demo_step(ctx, config, run_dir: str, iteration: int) -> str:
        calls.append(iteration)
        out.write_text("computed")
        return "computed"

    @flow
    def run_it(config, run_dir: str) -> str:
        return caching.run_local(demo_step, config, run_dir, 0)

    config = load_config("configs/demo.yaml")
    assert run_it(config, str(tmp_path)) == "computed"
    # The cache record is lost (a crash right after the step): outputs decide, no recompute.
    import shutil

    shutil.rmtree(tmp_path / ".prefect")
    assert run_it(config, str(tmp_path)) == "loaded computed"
    assert calls == [0]
    events = [e["event"] for e in read_journal(tmp_path)]
    assert events == ["started", "finished", "reused"]
    # The plain driver runs the same definition the same way: loaded, not run.
    assert PlainRunner().step(demo_step, config, str(tmp_path), 0) == "loaded computed"
    out.unlink()
    assert PlainRunner().step(demo_step, config, str(tmp_path), 1) == "computed"
    assert calls == [0, 1]
    assert [e["event"] for e in read_journal(tmp_path)][3:] == ["reused", "started", "finished"]


@pytest.mark.slow  # real flows on a Prefect server
def test_a_cached_result_lives_in_the_run_directory_and_needs_no_storage_block(harness, tmp_path):
    """The result is written under the run directory's .prefect/results and found there
    again by its absolute path, by any process that mounts it: no block is saved on the
    server for it (a save cost the first cached step 2 s) and none is loaded per task."""
    calls = []
    out = tmp_path / "out.txt"

    @step("stored-step", sections=("training",), done=lambda params: out.exists())
    def stored_step(ctx, config, run_dir: str, iteration: int) -> str:
        calls.append(iteration)
        out.write_text("computed")
        return "computed"

    @flow
    def run_it(config, run_dir: str) -> str:
        return caching.run_local(stored_step, config, run_dir, 0)

    config = load_config("configs/demo.yaml")
    assert run_it(config, str(tmp_path)) == run_it(config, str(tmp_path)) == "computed"
    assert calls == [0]  # the second run read the cached result
    (record,) = RunDir(tmp_path).prefect_cache_keys.iterdir()
    metadata = json.loads(record.read_text())
    assert metadata["storage_block_id"] is None
    assert Path(metadata["storage_key"]).parent == RunDir(tmp_path).prefect_results.resolve()
    with get_client(sync_client=True) as client:
        assert client.read_block_documents() == []
