"""Experiment tracking: a run's step metrics and evaluations, copied to MLflow or W&B.

With `run.tracking: mlflow` the pipeline calls `track(run)` after θ0's evaluation,
after every iteration and at the end. It reads what the run directory holds (the
per-step training records in `iter_t/train_state/metrics.jsonl`, each model's
`metrics.json`) and logs what has not been logged yet: one MLflow run per SPIN
run, with a nested run per iteration holding that iteration's per-step training
metrics and its held-out evaluation. The parent run also gets every model's
held-out metrics with the iteration as the step (θ0 = step 0), so MLflow plots
them across iterations. Because it follows the files, a resumed run logs
nothing twice and MLflow shows the same numbers as `report.md`.

The tracking URI comes from the environment (`MLFLOW_TRACKING_URI`, tokens too);
without it, a local SQLite store in the run directory (`mlflow.db`) is used:
`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`.

With `run.tracking: wandb`, `track_wandb(run)` does the same for Weights & Biases:
a W&B run per iteration (job type "iteration", grouped by the SPIN run) with its
per-step training metrics and held-out evaluation in the summary, and at the end
one "models" run with every model's held-out metrics by iteration. It runs
offline (files under `RUN/wandb/`, `wandb sync` uploads them) unless WANDB_MODE
or WANDB_API_KEY in the environment say otherwise; the project is WANDB_PROJECT
(default "spin").
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from spin_core import lm_eval
from spin_core.config import SpinConfig
from spin_core.errors import InputError
from spin_core.storage.files import write_json_atomic
from spin_core.storage.rundir import RunDir


def tracking_uri(run: RunDir) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run.root.resolve() / 'mlflow.db'}"


def _numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of a metrics record (booleans as 0/1), nested dicts flattened."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}".replace(":", "_")
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float) and value == value:  # not NaN
            out[name] = float(value)
        elif isinstance(value, dict):
            out |= _numbers(value, f"{name}/")
    return out


@dataclass(frozen=True)
class FinishedModel:
    """One evaluated model of a run, as both trackers log it: θ0 (`iteration` None, step 0)
    or θ(t+1) of iteration t (step t+1)."""

    run: RunDir
    iteration: int | None

    @property
    def key(self) -> str:
        return "theta0" if self.iteration is None else f"iter_{self.iteration}"

    @property
    def step(self) -> int:
        return 0 if self.iteration is None else self.iteration + 1

    def heldout(self) -> dict[str, float]:
        """Its held-out metrics ("heldout/...") and lm-eval scores ("lm_eval/...")."""
        if self.iteration is None:
            evaluation = self.run.base_evaluation()
        else:
            evaluation = self.run.evaluation(self.iteration)
        values = _numbers(json.loads(evaluation.metrics.read_text()), "heldout/")
        return values | lm_eval.scores(evaluation.root)

    def train_steps(self) -> Iterator[tuple[int, dict[str, float]]]:
        """(step, "train/..." values) of every optimizer step that trained it."""
        path = None if self.iteration is None else self.run.step_log(self.iteration)
        for line in path.read_text().splitlines() if path and path.exists() else []:
            record = json.loads(line)
            yield int(record["step"]), _numbers(record, "train/")

    def sft_baseline(self) -> dict[str, float]:
        """The SFT baseline's held-out metrics ("sft/...") of its iteration, if it has one."""
        if self.iteration is None:
            return {}
        path = self.run.baseline_evaluation(self.iteration).metrics
        return _numbers(json.loads(path.read_text()), "sft/") if path.exists() else {}


def finished_models(run: RunDir) -> list[FinishedModel]:
    """What a tracker may log of `run` so far: θ0 once evaluated, then every finished
    iteration's model, in order."""
    theta0 = [FinishedModel(run, None)] if run.base_evaluation().metrics.exists() else []
    return theta0 + [FinishedModel(run, t) for t in run.finished_iterations()]


def track(run: RunDir, config_params: dict[str, str] | None = None) -> dict:
    """Log to MLflow whatever of `run` is finished and not logged yet; returns the state.

    config_params: flat `section.field -> value` strings, logged once on the parent run.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    state_path = run.mlflow_state
    state = json.loads(state_path.read_text()) if state_path.exists() else {"logged": []}
    client = MlflowClient(tracking_uri=tracking_uri(run))
    if "parent" not in state:
        experiment = client.get_experiment_by_name("spin")
        # The local store keeps its artifacts beside it, not in ./mlruns of the working directory.
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else run.mlflow_artifacts
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(
                "spin", artifact_location=local.resolve().as_uri() if local else None
            )
        )
        parent = client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: run.root.name})
        state |= {
            "experiment_id": experiment_id,
            "parent": parent.info.run_id,
            "uri": tracking_uri(run),
        }
        params = [Param(k, str(v)[:500]) for k, v in (config_params or {}).items()]
        for start in range(0, len(params), 100):
            client.log_batch(state["parent"], params=params[start : start + 100])
        write_json_atomic(state, state_path)

    def log(run_id: str, values: dict[str, float], step: int, timestamp: int = 0) -> None:
        metrics = [Metric(k, v, timestamp, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])

    for model in finished_models(run):
        if model.key in state["logged"]:
            continue
        values = model.heldout()
        if model.iteration is not None:
            child = client.create_run(
                state["experiment_id"],
                tags={
                    MLFLOW_PARENT_RUN_ID: state["parent"],
                    MLFLOW_RUN_NAME: f"iteration {model.iteration}",
                },
            )
            for step, record in model.train_steps():
                log(child.info.run_id, record, step=step)
            log(child.info.run_id, values, step=model.step)
        log(state["parent"], values, step=model.step)
        sft = model.sft_baseline()
        if sft:
            log(state["parent"], sft, step=model.step)
        if model.iteration is not None:
            client.set_terminated(child.info.run_id)
            client.log_batch(
                state["parent"], tags=[RunTag("spin.iterations_logged", str(model.step))]
            )
        state["logged"].append(model.key)
        write_json_atomic(state, state_path)
    if run.report.exists() and "report" not in state["logged"]:
        client.log_artifact(state["parent"], str(run.report))
        client.set_terminated(state["parent"])
        state["logged"].append("report")
        write_json_atomic(state, state_path)
    return state


def track_wandb(run: RunDir, config_params: dict[str, str] | None = None) -> dict:
    """Log to W&B whatever of `run` is finished and not logged yet; returns the state."""
    import wandb

    state_path = run.wandb_state
    state = json.loads(state_path.read_text()) if state_path.exists() else {"logged": []}
    mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )
    settings = {
        "project": os.environ.get("WANDB_PROJECT", "spin"),
        "group": run.root.name,
        "dir": str(run.root),
        "mode": mode,
        "config": config_params or {},
    }
    state["mode"] = mode

    def logged(key: str, wandb_run) -> None:
        state["logged"].append(key)
        state.setdefault("runs", {})[key] = wandb_run.id
        write_json_atomic(state, state_path)

    models = finished_models(run)
    for model in models:
        if model.iteration is None or model.key in state["logged"]:
            continue
        wandb_run = wandb.init(
            name=f"{run.root.name} iteration {model.iteration}", job_type="iteration", **settings
        )
        for step, record in model.train_steps():
            wandb_run.log(record, step=step)
        wandb_run.summary.update(model.heldout())
        wandb_run.finish()
        logged(model.key, wandb_run)
    if run.report.exists() and "models" not in state["logged"]:
        wandb_run = wandb.init(name=f"{run.root.name} models", job_type="evaluation", **settings)
        for model in models:
            wandb_run.log(model.heldout(), step=model.step)
        wandb_run.finish()
        logged("models", wandb_run)
    return state


def config_params(config_dump: dict) -> dict[str, str]:
    """`section.field -> value` of a config dump, for the parent run's parameters."""
    return {
        f"{section}.{name}": json.dumps(value) if not isinstance(value, str) else value
        for section, fields in config_dump.items()
        for name, value in fields.items()
    }


def tracked_runs(run_dir: str | Path) -> dict:
    """The state file of a run directory (for tests and `spin report`)."""
    path = RunDir(run_dir).mlflow_state
    return json.loads(path.read_text()) if path.exists() else {}


def check_available(config: SpinConfig) -> None:
    """InputError naming run.tracking when its package is not installed."""
    package = {"mlflow": "mlflow", "wandb": "wandb"}.get(config.run.tracking)
    if package and importlib.util.find_spec(package) is None:
        raise InputError(
            f"run.tracking: {config.run.tracking!r} needs the {package} package, which is not "
            "installed (pip install 'spin[tracking]'), or set run.tracking: none"
        )
