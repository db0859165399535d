"""A step's outputs are declared once (`spin_core.execution.Output`): completeness, loading and
the paths every reader uses come from that declaration."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from spin_core import steps
from spin_core.config import load_config
from spin_core.execution import Output, PlainContext, at_iteration, execute, step
from spin_core.storage.files import write_parquet_atomic
from spin_core.storage.rundir import RunDir


def test_outputs_make_done_and_load(tmp_path):
    calls = []

    @step(
        "two-files",
        outputs=(
            Output(at_iteration(RunDir.pairs_counts), "json"),
            Output(at_iteration(RunDir.pairs), "parquet"),
        ),
    )
    def two_files(ctx, config, run_dir: str, iteration: int) -> dict:
        calls.append(iteration)
        run = RunDir(run_dir)
        write_parquet_atomic(pd.DataFrame({"a": [1, 2]}), run.pairs(iteration))
        run.pairs_counts(iteration).write_text(json.dumps({"pairs": 2}))
        return {"pairs": 2}

    params = two_files.params(None, str(tmp_path), 0)
    assert not two_files.complete(params)
    assert execute(two_files, PlainContext(), params) == {"pairs": 2}
    assert execute(two_files, PlainContext(), params) == {"pairs": 2}  # loaded, not rerun
    assert calls == [0]
    pairs = RunDir(tmp_path).pairs(0)
    pairs.write_bytes(pairs.read_bytes()[:-20])  # cut short: no footer
    assert not two_files.complete(params)  # every output must be complete
    assert two_files.output(params) == RunDir(tmp_path).pairs_counts(0)


def test_a_parquet_output_with_rows_is_complete_only_with_that_many(tmp_path):
    out = Output(lambda p: tmp_path / "x.parquet", "parquet", rows=lambda p: p["rows"])
    write_parquet_atomic(pd.DataFrame({"a": [1, 2, 3]}), tmp_path / "x.parquet")
    assert out.complete({"rows": 3}) and not out.complete({"rows": 4})
    assert out.load({}) == str(tmp_path / "x.parquet")


def test_outputs_and_a_hand_written_done_are_refused_together():
    with pytest.raises(ValueError, match="not both"):

        @step("both", outputs=(Output(lambda p: p, "json"),), done=lambda p: True)
        def both(ctx, config, run_dir):
            pass

    with pytest.raises(ValueError, match="kind"):
        Output(lambda p: p, "csv")


def test_the_pipelines_steps_declare_the_run_directorys_paths(tmp_path):
    config = load_config("configs/demo.yaml")
    run = RunDir(tmp_path)
    at = {"config": config, "run_dir": str(tmp_path), "iteration": 2}
    assert steps.sample_prompts.output(at) == run.prompts(2)
    assert steps.generate_responses.output(at) == run.generated(2)
    assert steps.build_training_set.output(at) == run.pairs_counts(2)
    assert steps.train_policy.output(at) == run.model(2)
    assert steps.train_sft_baseline.output(at) == run.baseline_model(2)
    assert steps.evaluate.output({"out_dir": str(run.iteration(2))}) == run.iteration_metrics(2)
