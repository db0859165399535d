"""The real flows on the toy model under a temporary Prefect server."""

import json

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness
from transformers import AutoModelForCausalLM

from spin_core.storage.rundir import RunDir
from tests.overrides import overrides

pytestmark = pytest.mark.slow  # runs the real pipeline


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def finished_run(harness, toy_build, tmp_path_factory):
    from flows.pipeline import spin_pipeline
    from spin_core.config import load_config

    cfg = load_config(
        "configs/demo.yaml",
        [
            *overrides(
                toy_build,
                {
                    "data.num_prompts": 64,
                    "data.eval_size": 40,
                    "run.iterations": 2,
                    "training.global_batch_size": 16,
                    "training.micro_batch_size": 8,
                    "training.learning_rate": "5e-5",
                    "generation.shard_size": 24,
                    "generation.max_new_tokens": 24,
                },
            ),
            # The paper's data recipe (the demo samples fresh prompts and negatives instead).
            "data.history=1",
            "data.resample_each_iteration=false",
            "generation.do_sample=false",
            "run.tracking=mlflow",
        ],
    )
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    report = spin_pipeline(cfg, str(run_dir))
    return RunDir(run_dir), cfg, report


def test_run_directory_matches_the_spec(finished_run):
    run, cfg, report = finished_run
    assert report == str(run.report) and run.report.exists()
    assert run.config.exists() and not run.lock.exists()
    for t in range(2):
        assert (run.generated_shards(t) / "part-00000.parquet").exists()
        assert len(list(run.generated_shards(t).glob("part-*.parquet"))) == 3  # 64 rows / 24
        for path in (run.prompts(t), run.generated(t), run.train(t), run.iteration_metrics(t)):
            assert path.exists(), path
        assert (run.train_state(t) / "metrics.jsonl").exists()
    prompts = pd.read_parquet(run.prompts(0))
    assert list(prompts.columns) == ["id", "prompt", "real", "prompt_ids", "real_ids"]
    generated = pd.read_parquet(run.generated(0))
    assert {
        "id",
        "prompt",
        "real",
        "prompt_ids",
        "real_ids",
        "generated",
        "generated_ids",
        "finish_reason",
        "generated_tokens",
        "opponent",
        "decoding",
    } <= set(generated.columns)
    train = pd.read_parquet(run.train(1))
    assert {
        "id",
        "prompt",
        "real",
        "generated",
        "source_iteration",
        "opponent_real_logps",
        "opponent_generated_logps",
    } <= set(train.columns)
    assert not list(run.root.rglob("*.tmp")) and not list(run.root.rglob("*.partial"))


def test_ids_are_consistent_and_iteration_one_used_theta1_and_history(finished_run):
    run, cfg, _ = finished_run
    prompts = pd.read_parquet(run.prompts(0))
    # the fixed sample, drawn and tokenized once
    pd.testing.assert_frame_equal(pd.read_parquet(run.prompts(1)), prompts)
    assert pd.read_parquet(run.generated(0))["id"].tolist() == prompts["id"].tolist()
    # Iteration 1's opponent is iteration 0's model, and its data mixes iteration 0's pairs.
    assert set(pd.read_parquet(run.generated(1))["opponent"]) == {str(run.model(0))}
    assert set(pd.read_parquet(run.generated(0))["opponent"]) == {cfg.model.name_or_path}
    sources = pd.read_parquet(run.train(1))["source_iteration"]
    assert set(sources) == {0, 1}
    assert set(pd.read_parquet(run.train(1))["id"]) <= set(prompts["id"])


def test_metrics_has_one_row_per_model_and_models_load(finished_run):
    run, _, _ = finished_run
    metrics = pd.read_parquet(run.metrics)
    assert metrics["iteration"].tolist() == [0, 1, 2]
    assert metrics["exact_match"].between(0, 1).all()
    assert metrics["real_loglik_per_token"].lt(0).all()
    assert metrics.loc[0, ["margin", "reward_accuracy"]].isna().all()  # θ0 has no opponent
    assert metrics.loc[1:, "reward_accuracy"].between(0, 1).all()
    assert {"exact_match/reverse", "exact_match/add"} <= set(metrics.columns)
    for t in range(2):
        AutoModelForCausalLM.from_pretrained(run.model(t))
        assert json.loads(run.iteration_metrics(t).read_text())["train_steps"] > 0
    text = run.report.read_text()
    assert "| θ0 |" in text and "| θ2 |" in text
    assert (run.plots / "metrics_per_iteration.png").exists()
    assert (run.plots / "train_steps.png").exists()


def test_rerun_skips_every_finished_step(finished_run):
    from flows.pipeline import spin_pipeline

    run, cfg, _ = finished_run
    stamps = {
        p: p.stat().st_mtime_ns for p in run.root.rglob("*.parquet") if p.parent.name != "generated"
    }
    stamps |= {p: p.stat().st_mtime_ns for p in run.root.rglob("model.safetensors")}
    spin_pipeline(cfg, str(run.root))
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t and p != run.metrics]
    assert changed == []


def test_sft_baseline_trains_the_same_steps_from_the_same_start(finished_run):
    run, cfg, _ = finished_run
    assert cfg.run.baseline == "sft"
    metrics = pd.read_parquet(run.metrics)
    for t in range(2):
        spin_steps = pd.read_json(run.train_state(t) / "metrics.jsonl", lines=True)
        sft_steps = pd.read_json(run.baseline(t) / "train_state" / "metrics.jsonl", lines=True)
        assert (
            len(sft_steps)
            == len(spin_steps)
            == json.loads(run.iteration_metrics(t).read_text())["train_steps"]
        )
        assert sft_steps["learning_rate"].max() == pytest.approx(spin_steps["learning_rate"].max())
        AutoModelForCausalLM.from_pretrained(run.baseline(t) / "model")
    assert metrics.loc[1:, "sft_exact_match"].between(0, 1).all()
    assert "SFT baseline exact match" in run.report.read_text()


def test_mlflow_holds_one_run_with_a_nested_run_per_iteration(finished_run):
    """run.tracking=mlflow: the step records and evaluations of the files, logged once."""
    from mlflow.tracking import MlflowClient

    from spin_core.reports import tracking

    run, cfg, _ = finished_run
    state = tracking.tracked_runs(run.root)
    assert state["logged"] == ["theta0", "iter_0", "iter_1", "report"]
    client = MlflowClient(tracking_uri=state["uri"])
    runs = client.search_runs([state["experiment_id"]])
    children = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent"]),
        key=lambda r: r.info.run_name,
    )
    assert [r.info.run_name for r in children] == ["iteration 0", "iteration 1"]
    for t, child in enumerate(children):
        steps = (run.train_state(t) / "metrics.jsonl").read_text().splitlines()
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.value for m in history] == pytest.approx([json.loads(s)["loss"] for s in steps])
    exact = client.get_metric_history(state["parent"], "heldout/exact_match")
    metrics = pd.read_parquet(run.metrics)
    assert [m.step for m in exact] == [0, 1, 2]
    assert [m.value for m in exact] == pytest.approx(metrics["exact_match"].tolist())
    assert client.get_run(state["parent"]).data.params["training.beta"] == "0.1"
    tracking.track(run)  # a rerun (resume, `spin report`) logs nothing twice
    assert len(client.get_metric_history(state["parent"], "heldout/exact_match")) == 3


def test_lm_eval_scores_reach_mlflow_and_wandb(finished_run, tmp_path, monkeypatch):
    """lm_eval.json as the pipeline writes it (lm_eval.write_result); the tracker once read
    it one level too shallow and logged nothing of it."""
    import shutil

    from mlflow.tracking import MlflowClient

    from spin_core import lm_eval
    from spin_core.reports import tracking

    run, cfg, _ = finished_run
    copy = RunDir(
        shutil.copytree(
            run.root,
            tmp_path / "copy",
            ignore=shutil.ignore_patterns(
                "mlflow.db", "tracking.json", "wandb", "tracking-wandb.json"
            ),
        )
    )
    for t, value in enumerate([0.25, 0.5, 0.75]):
        result = {
            "scores": {
                "arc_easy": {
                    "num_fewshot": 0,
                    "metrics": {
                        "acc": {"value": value, "stderr": 0.01},  # parse_metrics' names
                    },
                }
            },
            "spec": {"limit": None},
        }
        lm_eval.write_result(result, copy.theta0() if t == 0 else copy.iteration(t - 1))
    state = tracking.track(copy)
    client = MlflowClient(tracking_uri=state["uri"])
    history = client.get_metric_history(state["parent"], "lm_eval/arc_easy/acc")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.5), (2, 0.75)]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    state = tracking.track_wandb(copy)
    (records,) = next((copy.root / "wandb").glob(f"offline-run-*{state['runs']['models']}")).glob(
        "run-*.wandb"
    )
    assert b"lm_eval/arc_easy/acc" in records.read_bytes()


def test_wandb_offline_holds_a_run_per_iteration_and_the_models(finished_run, monkeypatch):
    """run.tracking=wandb, offline: what the files hold, one W&B run per iteration + one overview."""
    from spin_core.reports import tracking

    run, cfg, _ = finished_run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    state = tracking.track_wandb(run, tracking.config_params(cfg.model_dump(mode="json")))
    assert state["mode"] == "offline"
    assert state["logged"] == ["iter_0", "iter_1", "models"]
    offline = {p.name.rsplit("-", 1)[-1]: p for p in (run.root / "wandb").glob("offline-run-*")}
    assert set(offline) == set(state["runs"].values())
    for key in ("iter_0", "iter_1"):
        (records,) = offline[state["runs"][key]].glob("run-*.wandb")
        content = records.read_bytes()  # W&B's own record format: the keys are plain strings
        assert b"train/loss" in content and b"heldout/exact_match" in content
    assert tracking.track_wandb(run)["logged"] == state["logged"]  # nothing twice
    assert len(list((run.root / "wandb").glob("offline-run-*"))) == 3
