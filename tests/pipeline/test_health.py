"""The health guard: a collapsing iteration is detected and its model is not promoted."""

import json

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from spin_core.storage.rundir import RunDir
from tests.overrides import overrides

pytestmark = pytest.mark.slow  # runs the real pipeline


def _collapsing_run(toy_build, run_dir, extra: list[str]):
    from flows.pipeline import spin_pipeline
    from spin_core.config import load_config

    cfg = load_config(
        "configs/demo.yaml",
        [
            *overrides(
                toy_build,
                {
                    "data.num_prompts": 48,
                    "data.eval_size": 24,
                    "run.iterations": 2,
                    "run.baseline": "none",
                    "training.global_batch_size": 16,
                    "training.micro_batch_size": 16,
                    "training.learning_rate": "1e-3",  # 100× the toy default
                    "training.optimizer": "rmsprop",  # the paper's optimizer
                    "training.warmup_ratio": 0,
                    "generation.max_new_tokens": 16,
                },
            ),
            *extra,
        ],
    )
    with prefect_test_harness():
        spin_pipeline(cfg, str(run_dir))
    return RunDir(run_dir), cfg


@pytest.fixture(scope="module")
def collapsed_run(toy_build, tmp_path_factory):
    return _collapsing_run(toy_build, tmp_path_factory.mktemp("collapse") / "run", [])


@pytest.fixture(scope="module")
def retried_run(toy_build, tmp_path_factory):
    return _collapsing_run(
        toy_build,
        tmp_path_factory.mktemp("retry") / "run",
        ["run.on_collapse=retry_half_lr", "training.eval_steps=1", "eval.health_size=16"],
    )


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


def test_health_is_checked_during_training(retried_run):
    run, _ = retried_run
    steps = pd.read_json(run.train_state(0) / "metrics.jsonl", lines=True)
    # eval_steps=1: every step carries the held-out real log-likelihood.
    assert steps["heldout_real_loglik"].notna().all()
    # The collapse shows before the iteration ends, not only in the final evaluation.
    assert not steps["healthy"].iloc[:-1].astype(bool).all()


def test_collapse_retries_once_at_half_the_learning_rate(retried_run):
    run, cfg = retried_run
    retry = json.loads(run.retry(0).read_text())
    assert retry["lr_scale"] == 0.5
    # The first attempt is kept, not overwritten.
    first = json.loads((run.collapsed_attempt(0) / "metrics.json").read_text())
    assert first["collapsed"] is True and first["lr_scale"] == 1.0
    assert (run.collapsed_attempt(0) / "model" / "config.json").exists()
    first_steps = pd.read_json(
        run.collapsed_attempt(0) / "train_state" / "metrics.jsonl", lines=True
    )
    retry_steps = pd.read_json(run.train_state(0) / "metrics.jsonl", lines=True)
    assert retry_steps["learning_rate"].max() == pytest.approx(
        first_steps["learning_rate"].max() / 2
    )
    metrics = json.loads(run.iteration_metrics(0).read_text())
    assert metrics["lr_scale"] == 0.5
    # 50× the toy default still collapses: retried once only, then the run stops.
    assert metrics["collapsed"] is True
    assert not run.iteration(1).exists()
    assert "retry at 0.5× the learning rate" in run.report.read_text()
