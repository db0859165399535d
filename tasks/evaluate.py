"""Step 5: held-out metrics of the new model against its opponent."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from spin_core import data, toy
from spin_core.checkpoint import load_policy
from spin_core.config import SpinConfig, schedule_at
from spin_core.evaluate import evaluate_model
from spin_core.rundir import RunDir, write_json_atomic
from tasks.caching import step
from tasks.progress import logger


def _inputs(params: dict) -> list:
    run = RunDir(params["run_dir"])
    files = [run.heldout, params["model"]]
    if params.get("opponent_dir"):
        files.append(Path(params["opponent_dir"]) / "eval.parquet")
    if params.get("iteration") is not None:
        t = params["iteration"]
        files += [run.iteration(t) / "pairs.json", run.train_state(t) / "metrics.jsonl"]
    return files


def _done(params: dict) -> bool:
    out = Path(params["out_dir"])
    return (out / "metrics.json").exists() and data.parquet_complete(out / "eval.parquet")


def _load(params: dict) -> dict:
    return json.loads((Path(params["out_dir"]) / "metrics.json").read_text())


@step(
    "evaluate-model",
    sections=("eval", "generation", "model", "training", "run"),
    inputs=_inputs,
    done=_done,
    load=_load,
)
def evaluate(
    config: SpinConfig,
    run_dir: str,
    model: str,
    out_dir: str,
    opponent_dir: str | None = None,
    iteration: int | None = None,
) -> dict:
    """model + heldout.parquet → out_dir/eval.parquet and out_dir/metrics.json.

    opponent_dir: where the opponent's own evaluation lives; its generations are the
    held-out y' for reward accuracy and margin.
    """
    run, out_dir = RunDir(run_dir), Path(out_dir)
    metrics_path = out_dir / "metrics.json"
    heldout = pd.read_parquet(run.heldout)
    opponent_eval = pd.read_parquet(Path(opponent_dir) / "eval.parquet") if opponent_dir else None
    policy, tokenizer = load_policy(model, config.model)
    frame, metrics = evaluate_model(
        policy,
        tokenizer,
        heldout,
        config,
        opponent_eval=opponent_eval,
        beta=schedule_at(config.training.beta, iteration or 0),
        group_of=_toy_task_of(heldout),
    )
    data.write_parquet_atomic(frame, out_dir / "eval.parquet")
    metrics["model"] = model
    if iteration is not None:
        metrics |= _training_summary(run, iteration)
        drop = metrics["opponent_real_loglik_per_token"] - metrics["real_loglik_per_token"]
        # The health signal (docs/DESIGN.md §5): real responses must not become less likely.
        metrics["collapsed"] = bool(drop > config.run.collapse_tolerance)
    write_json_atomic(metrics, metrics_path)
    logger().info(
        "%s: exact match %.3f, real log-lik %.4f nats/token%s",
        model,
        metrics["exact_match"],
        metrics["real_loglik_per_token"],
        f", margin {metrics['margin']:.3f}" if "margin" in metrics else "",
    )
    return metrics


def _training_summary(run: RunDir, iteration: int) -> dict:
    """Counts of the training set and the last epoch's mean training metrics."""
    summary = json.loads((run.iteration(iteration) / "pairs.json").read_text())
    steps = pd.read_json(run.train_state(iteration) / "metrics.jsonl", lines=True)
    last_epoch = steps[steps["epoch"] >= steps["epoch"].max() // 1]
    summary["train_steps"] = int(steps["step"].max())
    for key in ("loss", "margin", "reward_accuracy"):
        summary[f"train_{key}"] = float(last_epoch[key].mean())
    if "healthy" in steps:
        checked = steps.dropna(subset=["healthy"])
        summary["unhealthy_checks"] = int((~checked["healthy"].astype(bool)).sum())
    summary["lr_scale"] = run.lr_scale(iteration)
    return summary


def _toy_task_of(heldout: pd.DataFrame):
    """toy.task_of when the held-out prompts are the embedded default's (per-task breakdown)."""
    try:
        heldout["prompt"].map(toy.task_of)
    except ValueError:
        return None
    return toy.task_of
