"""The health guard: a collapsing iteration is detected and its model is not promoted."""

import json

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from spin_core.rundir import RunDir


@pytest.fixture(scope="module")
def collapsed_run(toy_build, tmp_path_factory):
    from flows.pipeline import spin_pipeline
    from spin_core.config import load_config

    cfg = load_config(
        "configs/demo.yaml",
        [
            f"data.dataset={toy_build.train_path}",
            f"data.eval_dataset={toy_build.eval_path}",
            f"model.name_or_path={toy_build.model_dir}",
            "data.num_prompts=48",
            "data.eval_size=24",
            "run.iterations=2",
            "run.baseline=none",
            "training.global_batch_size=16",
            "training.micro_batch_size=16",
            "training.learning_rate=1e-3",  # 100× the toy default
            "training.warmup_ratio=0",
            "generation.max_new_tokens=16",
        ],
    )
    run_dir = tmp_path_factory.mktemp("collapse") / "run"
    with prefect_test_harness():
        spin_pipeline(cfg, str(run_dir))
    return RunDir(run_dir), cfg


def test_excessive_learning_rate_is_caught_and_not_promoted(collapsed_run):
    run, cfg = collapsed_run
    metrics = json.loads(run.iteration_metrics(0).read_text())
    assert metrics["collapsed"] is True
    assert (
        metrics["opponent_real_loglik_per_token"] - metrics["real_loglik_per_token"]
        > cfg.run.collapse_tolerance
    )
    # The run stopped: no iteration was trained against the collapsed model.
    assert not run.iteration(1).exists()
    table = pd.read_parquet(run.metrics)
    assert table["collapsed"].tolist()[1] is True or table["collapsed"].tolist()[1] == 1.0
    report = run.report.read_text()
    assert "θ1 collapsed" in report and "it was not promoted" in report
