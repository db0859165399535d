"""lm-evaluation-harness benchmarks (`eval.lm_eval`) of θ0 and of each promoted θ(t+1).

Writes <eval dir>/lm_eval.json: RUN/theta0/lm_eval.json for θ0, RUN/iter_t/lm_eval.json
for θ(t+1). Cached and resumable like the other steps: a file that holds the scores of
the configured tasks is not recomputed.
"""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_table_artifact

from spin_core import lm_eval
from spin_core.checkpoint import compute_dtype
from spin_core.config import SpinConfig
from tasks.caching import as_config, step
from tasks.progress import logger


def _inputs(params: dict) -> list:
    settings = as_config(params["config"]).eval.lm_eval
    files = [Path(params["model"])]
    if settings is not None and settings.include_path:
        files.append(Path(settings.include_path))  # custom task YAMLs and their data
    return files


def _done(params: dict) -> bool:
    settings = as_config(params["config"]).eval.lm_eval
    return settings is not None and lm_eval.read_result(params["out_dir"], settings) is not None


@step("lm-eval", sections=("model",), inputs=_inputs, done=_done)
def lm_eval_model(
    config: SpinConfig,
    run_dir: str,
    model: str,
    out_dir: str,
    iteration: int | None = None,
) -> dict:
    """model → out_dir/lm_eval.json; returns {model, lm_eval_version, scores}.

    iteration: t for θ(t+1) (the journal's iteration), None for θ0.
    """
    settings = config.eval.lm_eval
    result = lm_eval.read_result(out_dir, settings)
    if result is not None:
        logger().info("%s exists, skipped", Path(out_dir) / lm_eval.RESULT_FILE)
    else:
        dtype = str(compute_dtype(config.model.precision)).removeprefix("torch.")
        result = lm_eval.evaluate_model(
            model, settings, dtype=dtype, trust_remote_code=config.model.trust_remote_code
        )
        lm_eval.write_result(result, out_dir)
        name = "θ0" if iteration is None else f"θ{iteration + 1}"
        create_table_artifact(
            table=_table(result),
            key="lm-eval-theta0" if iteration is None else f"lm-eval-theta{iteration + 1}",
            description=f"lm-evaluation-harness {result['lm_eval_version']} scores of {name}",
        )
        logger().info(
            "%s: lm-eval %s in %.0f s: %s",
            model,
            result["lm_eval_version"],
            result["seconds"],
            ", ".join(
                f"{row['task']} {row['metric']} {row['value']:.4f}" for row in _table(result)
            ),
        )
    return {key: result[key] for key in ("model", "lm_eval_version", "scores")}


def _table(result: dict) -> list[dict]:
    return [
        {
            "task": task,
            "num_fewshot": entry["num_fewshot"],
            "metric": metric,
            "value": score["value"],
            "stderr": score["stderr"],
        }
        for task, entry in result["scores"].items()
        for metric, score in entry["metrics"].items()
    ]


def run_lm_eval(
    config: SpinConfig, run_dir: str, model: str, out_dir: str, iteration: int | None = None
) -> dict | None:
    """The lm-eval step when `eval.lm_eval.tasks` is set; None (nothing runs) otherwise."""
    if not lm_eval.enabled(config.eval.lm_eval):
        return None
    return lm_eval_model(config, run_dir, model, out_dir, iteration)
