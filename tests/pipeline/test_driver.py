"""spin_core/driver.py and the policy in spin_core/steps.py: the plain driver runs the
pipeline's own step definitions, so its run directory is one Prefect resumes as its own."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from spin_core import driver
from spin_core.config import load_config
from spin_core.pipeline import Decision, after_iteration
from spin_core.storage.journal import read_journal
from spin_core.storage.rundir import RunDir
from tests.overrides import overrides


def _metrics(collapsed: bool = False, margin: float = 1.0) -> dict:
    return {
        "collapsed": collapsed,
        "margin": margin,
        "real_loglik_per_token": -1.5,
        "opponent_real_loglik_per_token": -1.0,
    }


@pytest.mark.parametrize(
    ("changes", "metrics", "retried", "expected"),
    [
        ({}, _metrics(), False, ("promote", False)),
        ({}, _metrics(collapsed=True), False, ("stop", False)),
        ({"run.on_collapse": "retry_half_lr"}, _metrics(collapsed=True), False, ("retry", False)),
        # a retry happens once: a second collapse stops the run
        ({"run.on_collapse": "retry_half_lr"}, _metrics(collapsed=True), True, ("stop", False)),
        ({"run.promote_collapsed": True}, _metrics(collapsed=True), False, ("promote", False)),
        # early stop promotes θ(t+1), then stops
        ({"run.early_stop_margin": "0.5"}, _metrics(margin=0.2), False, ("stop", True)),
        ({"run.early_stop_margin": "0.5"}, _metrics(margin=0.7), False, ("promote", False)),
    ],
)
def test_after_iteration_policy(tmp_path, changes, metrics, retried, expected):
    config = load_config("configs/demo.yaml", [f"{k}={v}" for k, v in changes.items()])
    run = RunDir(tmp_path)
    if retried:
        run.iteration(0).mkdir(parents=True)
        run.retry(0).write_text(json.dumps({"lr_scale": 0.5}))
    decision = after_iteration(config, run, 0, metrics)
    assert isinstance(decision, Decision)
    assert (decision.action, decision.promote) == expected
    if decision.action != "promote":
        assert "iteration 0" in decision.reason or "early_stop_margin" in decision.reason


def test_plain_runner_retries_a_transient_failure_but_not_bad_input(tmp_path):
    from spin_core.driver import PlainRunner
    from spin_core.errors import InputError
    from spin_core.execution import step

    config = load_config("configs/demo.yaml")
    failures = {"io": [OSError("disk busy")], "input": [InputError("data.dataset: missing")]}

    @step("flaky", retries=2)
    def flaky(ctx, config, run_dir: str, kind: str) -> str:
        if failures[kind]:
            raise failures[kind].pop()
        return "done"

    assert PlainRunner().step(flaky, config, str(tmp_path), "io") == "done"
    with pytest.raises(InputError):
        PlainRunner().step(flaky, config, str(tmp_path), "input")
    events = [(e["step"], e["event"]) for e in read_journal(tmp_path)]
    assert events == [("flaky", "started"), ("flaky", "failed"), ("flaky", "started")] + [
        ("flaky", "finished"),
        ("flaky", "started"),
        ("flaky", "failed"),
    ]


@pytest.mark.slow
def test_plain_driver_run_is_resumed_by_prefect_without_redoing_a_step(toy_build, tmp_path):
    from flows.pipeline import spin_pipeline

    config = load_config(
        "configs/demo.yaml",
        overrides(
            toy_build,
            {"run.iterations": 1, "run.baseline": "none", "generation.max_new_tokens": 16},
        ),
    )
    run = RunDir(tmp_path / "run")
    report = driver.run(config, str(run.root))
    assert report == str(run.report) and run.report.exists()
    metrics = pd.read_parquet(run.metrics)
    assert metrics["iteration"].tolist() == [0, 1]
    executed = [(e["step"], e["event"]) for e in read_journal(run.root)]
    steps = ["evaluate-model", "sample-prompts", "generate-responses", "build-training-set"]
    steps += ["train-policy", "evaluate-model"]
    assert executed == [(step, event) for step in steps for event in ("started", "finished")]

    with prefect_test_harness():
        assert spin_pipeline(config, str(run.root)) == str(run.report)
    # Prefect has no cache records of the plain run: every step's outputs are complete,
    # so each is loaded by its declared `load`, none is run again.
    resumed = [(e["step"], e["event"]) for e in read_journal(run.root)][len(executed) :]
    assert resumed == [(step, "reused") for step in steps]
    pd.testing.assert_frame_equal(pd.read_parquet(run.metrics), metrics)
