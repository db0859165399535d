"""lm-evaluation-harness benchmarks of a model directory (`eval.lm_eval`) → lm_eval.json.

The paper (Chen et al., 2024, §5) reports the Open LLM Leaderboard tasks, run with
lm-evaluation-harness v0.4.0. Scores shift across harness versions (prompt formats,
normalisation, few-shot sampling), so every result file records the version that
produced it; compare numbers across runs only at the same version and task settings.

lm-eval is an optional extra (`pip install 'spin[lm-eval]'`): it is imported only
when a benchmark runs. Its tasks download their data sets from the Hugging Face hub
unless they are custom tasks over local files (`include_path`).

    result = run("runs/x/theta0/model", config.eval.lm_eval, "runs/x/theta0")  # → lm_eval.json
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from spin_core.config import LmEvalConfig
from spin_core.errors import InputError
from spin_core.storage.files import write_json_atomic

RESULT_FILE = "lm_eval.json"
PAPER_VERSION = "0.4.0"  # the harness version behind the paper's Open LLM Leaderboard numbers
INSTALL_HINT = "pip install 'spin[lm-eval]'"

# metrics.parquet columns (see `columns`)
SCORE_PREFIX = "lm_eval/"  # lm_eval/<task>/<metric>
STDERR_PREFIX = "lm_eval_stderr/"  # lm_eval_stderr/<task>/<metric>
FEWSHOT_PREFIX = "lm_eval_fewshot/"  # lm_eval_fewshot/<task>
VERSION_COLUMN = "lm_eval_version"
LIMIT_COLUMN = "lm_eval_limit"


def enabled(settings: LmEvalConfig | None) -> bool:
    return settings is not None and bool(settings.tasks)


def spec(settings: LmEvalConfig) -> dict:
    """What decides the scores: a result file answers for this spec only."""
    return {
        "tasks": [[name, shots] for name, shots in settings.task_shots()],
        "limit": settings.limit,
        "include_path": settings.include_path,
    }


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def table(result: dict) -> list[dict]:
    """One row per (task, metric) of a result: task, num_fewshot, metric, value, stderr."""
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


def scores(out_dir: str | Path) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` → score of out_dir/lm_eval.json, whatever settings wrote it
    ({} without one): what experiment trackers log beside the held-out metrics."""
    try:
        result = json.loads((Path(out_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {
        name: float(value)
        for name, value in columns(result).items()
        if name.startswith(SCORE_PREFIX) and isinstance(value, int | float)
    }


def read_result(out_dir: str | Path, settings: LmEvalConfig) -> dict | None:
    """out_dir/lm_eval.json when it holds the scores of `settings`' tasks, else None."""
    path = Path(out_dir) / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("spec") != spec(settings):
        return None
    return result


def write_result(result: dict, out_dir: str | Path) -> Path:
    return write_json_atomic(result, Path(out_dir) / RESULT_FILE)


def _task_manager(names: list[str], include_path: str | None):
    """lm-eval's task index; only the custom directory's when it defines every task asked for
    (indexing lm-eval's thousands of built-in YAMLs takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not Path(include_path).is_dir():
            raise InputError(f"eval.lm_eval.include_path: {include_path} is not a directory")
        custom = TaskManager(include_path=include_path, include_defaults=False)
        if set(names) <= set(custom.all_subtasks):
            return custom
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        where = f"lm-eval {installed_version()}'s tasks" + (
            f" or in {include_path}" if include_path else ""
        )
        raise InputError(f"eval.lm_eval.tasks: {', '.join(unknown)} not found in {where}")
    return manager


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # "N/A" stderrs, aliases
    value = float(value)
    return value if math.isfinite(value) else None


def parse_metrics(task_result: dict) -> dict[str, dict]:
    """lm-eval's {"acc,none": .5, "acc_stderr,none": .1, "alias": ...} → {"acc": {value, stderr}}.

    A metric under a filter other than "none" is "<metric>/<filter>" ("exact_match/strict-match"
    for lm-eval's "exact_match,strict-match"): names MLflow and TensorBoard accept.
    """
    metrics: dict[str, dict] = {}
    for key, value in task_result.items():
        if "," not in key:
            continue
        metric, _, filter_name = key.partition(",")
        is_stderr = metric.endswith("_stderr")
        metric = metric.removesuffix("_stderr")
        name = metric if filter_name == "none" else f"{metric}/{filter_name}"
        entry = metrics.setdefault(name, {"value": None, "stderr": None})
        entry["stderr" if is_stderr else "value"] = _number(value)
    return {name: entry for name, entry in metrics.items() if entry["value"] is not None}


def _plain(value: Any) -> Any:
    """lm-eval's output as plain JSON types (callables and the like as strings)."""
    return json.loads(json.dumps(value, default=str, skipkeys=True))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def harness_scores(
    model_dir: str | Path,
    settings: LmEvalConfig,
    *,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Run `settings.tasks` on an HF model directory (or hub name) with lm-eval's Python API.

    Tasks with different few-shot counts run as separate `simple_evaluate` calls on one
    loaded model. Returns the content of lm_eval.json: `scores` {task: {num_fewshot,
    metrics: {metric: {value, stderr}}}} for the tasks asked for (a group's aggregate for
    a group such as mmlu), `lm_eval_version`, `spec`, and lm-eval's own output per call
    in `runs` (sub-task scores, task configs, n-samples; without per-sample logs).
    """
    try:
        import lm_eval
        from lm_eval.api.registry import get_model
    except ImportError as exc:
        raise InputError(
            f"eval.lm_eval is set but lm-eval is not installed: {INSTALL_HINT}"
        ) from exc
    import torch

    started = time.time()
    pairs = settings.task_shots()
    task_manager = _task_manager([name for name, _ in pairs], settings.include_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_args = {
        "pretrained": str(model_dir),
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
    }
    # What simple_evaluate(model="hf", model_args=...) does, once for all few-shot groups.
    lm = get_model("hf").create_from_arg_obj(
        model_args, {"batch_size": settings.batch_size, "device": device}
    )
    by_shots: dict[int | None, list[str]] = {}
    for name, shots in pairs:
        by_shots.setdefault(shots, []).append(name)
    scores: dict[str, dict] = {}
    runs = []
    from spin_core.training.state import rng_state, set_rng_state

    world_size = lm.world_size  # lm-eval's data-parallel ranks (1 unless run() started several)
    rng = rng_state()  # simple_evaluate seeds Python's, NumPy's and torch's global generators
    try:
        for shots, names in by_shots.items():
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=shots,
                limit=settings.limit,
                batch_size=settings.batch_size,
                device=device,
                task_manager=task_manager,
                log_samples=False,
            )
            if output is None:  # only on non-zero ranks of a distributed run
                continue
            results = output.get("results", {}) | output.get("groups", {})
            for name in names:
                n_shot = output.get("n-shot", {}).get(name, shots)
                scores[name] = {
                    "num_fewshot": n_shot if isinstance(n_shot, int) else shots,
                    "metrics": parse_metrics(results.get(name, {})),
                }
            output.pop("samples", None)
            output.pop("pretty_env_info", None)  # a page of hardware description
            output["config"] = {**output.get("config", {}), "model_args": model_args}
            runs.append(_nan_to_none(_plain(output)))
    finally:
        set_rng_state(rng)  # the pipeline's own seeding is left as it was
        del lm
        from spin_core.runtime.devices import release_memory

        release_memory()
    return {
        "model": str(model_dir),
        "lm_eval_version": installed_version() or getattr(lm_eval, "__version__", "unknown"),
        "paper_lm_eval_version": PAPER_VERSION,
        "spec": spec(settings),
        "dtype": dtype,
        "device": device,
        "processes": world_size,
        "batch_size": settings.batch_size,
        "seconds": round(time.time() - started, 1),
        "scores": scores,
        "runs": runs,
    }


def processes(settings: LmEvalConfig) -> int:
    """How many data-parallel processes lm-eval runs in: one per GPU of this machine
    (`settings.processes` of them at most), one on a machine without GPUs."""
    from spin_core.runtime.devices import visible_gpus

    gpus = len(visible_gpus())
    return max(1, min(settings.processes or gpus, gpus))


def run(
    model_dir: str | Path,
    settings: LmEvalConfig,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    ranks: int | None = None,
    on_line=print,
) -> dict:
    """Score `model_dir` on `settings.tasks` → out_dir/lm_eval.json; returns its content.

    On one device it runs here (`harness_scores`). Over several GPUs (`ranks`, by default
    `processes(settings)`) it runs as a child job of one process per GPU (`torchrun`),
    where lm-eval shares each task's requests among the ranks (its accelerate data
    parallelism) and rank 0 writes the result; their output lines go to `on_line`.
    """
    ranks = ranks or processes(settings)
    if ranks == 1:
        result = harness_scores(
            model_dir, settings, dtype=dtype, trust_remote_code=trust_remote_code
        )
        write_result(result, out_dir)
        return result
    import sys

    import torch

    from spin_core.runtime.processes import child_env, run_group

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job = out_dir / "lm_eval.job.json"
    write_json_atomic(
        {
            "model_dir": str(model_dir),
            "settings": settings.model_dump(mode="json"),
            "out_dir": str(out_dir),
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
        },
        job,
    )
    env = child_env()
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo ranks (accelerate otherwise starts none)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(ranks), "-m", "spin_core.lm_eval", str(job)]
    run_group(command, on_line=on_line, env=env, what="lm-eval ranks")
    result = read_result(out_dir, settings)
    if result is None:
        raise RuntimeError(f"lm-eval ranks exited 0 but left no {out_dir / RESULT_FILE}")
    job.unlink(missing_ok=True)
    return result


def _rank_main(job_file: str) -> None:
    """One rank of `run`'s child job: lm-eval over its share; rank 0 writes the result."""
    import os

    job = json.loads(Path(job_file).read_text())
    result = harness_scores(
        job["model_dir"],
        LmEvalConfig.model_validate(job["settings"]),
        dtype=job["dtype"],
        trust_remote_code=job["trust_remote_code"],
    )
    if int(os.environ.get("RANK", "0")) == 0:
        write_result(result, job["out_dir"])


def columns(result: dict) -> dict[str, Any]:
    """One metrics.parquet row's lm-eval columns: lm_eval/<task>/<metric> (the score),
    lm_eval_stderr/<task>/<metric>, lm_eval_fewshot/<task>, lm_eval_version, lm_eval_limit."""
    row: dict[str, Any] = {
        VERSION_COLUMN: result.get("lm_eval_version"),
        LIMIT_COLUMN: (result.get("spec") or {}).get("limit"),
    }
    for task, entry in (result.get("scores") or {}).items():
        row[f"{FEWSHOT_PREFIX}{task}"] = entry.get("num_fewshot")
        for metric, score in (entry.get("metrics") or {}).items():
            row[f"{SCORE_PREFIX}{task}/{metric}"] = score.get("value")
            row[f"{STDERR_PREFIX}{task}/{metric}"] = score.get("stderr")
    return row


if __name__ == "__main__":
    import sys

    _rank_main(sys.argv[1])
