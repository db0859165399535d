"""Every path of a run directory comes from `RunDir`; `finished_iterations` is the one walk
over evaluated iterations that the report, the trackers, the schedule and `spin compare`
read."""

from __future__ import annotations

from spin_core.storage.files import write_json_atomic
from spin_core.storage.rundir import EvalDir, RunDir


def test_finished_iterations_stop_at_the_first_gap(tmp_path):
    run = RunDir(tmp_path)
    assert run.finished_iterations() == []
    for t in (0, 1, 3):  # iteration 2 has no metrics yet: 3 is not counted
        write_json_atomic({"margin": 0.1}, run.iteration_metrics(t))
    assert run.finished_iterations() == [0, 1]


def test_evaluation_directories_hold_eval_parquet_and_metrics_json(tmp_path):
    run = RunDir(tmp_path)
    assert run.evaluation(1) == EvalDir(run.iteration(1))
    assert run.eval_file(1) == run.iteration(1) / "eval.parquet"
    assert run.iteration_metrics(1) == run.iteration(1) / "metrics.json"
    assert run.baseline_evaluation(1).metrics == run.baseline(1) / "metrics.json"
    assert run.baseline_model(1) == run.baseline(1) / "model"
    assert run.base_evaluation().eval == tmp_path.resolve() / "theta0" / "eval.parquet"
    assert not run.evaluation(1).done()
