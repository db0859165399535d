"""Recipes compared over seeds: one resumable spin-pipeline run per (recipe, seed), then
compare.md (README "Comparing recipes over seeds").

Runs are subflows of `spin-compare`. One at a time (max_parallel 1) they run in this
process; with max_parallel K > 1, K at a time, each in its own worker process of a
`ProcessPoolTaskRunner`: the pipeline seeds torch's global generator (sampled
generation, the toy θ0), so two runs sharing one process would draw from each other's
random streams and their results would depend on timing. Each worker process sees its own
share of the GPUs (CUDA_VISIBLE_DEVICES), so parallel runs do not all land on cuda:0.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.pipeline import spin_pipeline
from spin_core import toy
from spin_core.config import SpinConfig
from spin_core.errors import InputError
from spin_core.reports import compare, compare_report
from spin_core.reports.report import embed_images
from spin_core.runtime.devices import check_device_counts


def _pipeline(run: compare.PlannedRun):
    return spin_pipeline.with_options(flow_run_name=f"{run.recipe}-seed-{run.seed}")


@task(name="compare-run", cache_policy=NO_CACHE, persist_result=False)
def run_in_worker(config: dict, run_dir: str, recipe: str, seed: int) -> str:
    """One run of the comparison in a worker process: the spin-pipeline subflow.

    config: the run's config as JSON, validated here (a pickled config object would carry
    this process's class, not the worker's)."""
    validated = SpinConfig.model_validate(config)
    planned = compare.PlannedRun(recipe, seed, Path(run_dir), validated)
    return _pipeline(planned)(validated, run_dir)


def gpu_shares(workers: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each of `workers` worker processes: this process's GPUs
    (CUDA_VISIBLE_DEVICES, else all that torch counts) split into equal contiguous shares;
    with fewer GPUs than workers they are dealt round robin (runs then share a GPU).
    None where no GPU is visible (the variable is left alone)."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        ids = [str(i) for i in range(torch.cuda.device_count())]
    if not ids:
        return [None] * workers
    if len(ids) < workers:
        return [ids[w % len(ids)] for w in range(workers)]
    per = len(ids) // workers
    return [",".join(ids[w * per : (w + 1) * per]) for w in range(workers)]


def _one_rank_worker(shares=None) -> None:
    """Set up a worker process: its GPUs, and the environment in-process training leaves.

    shares: a queue of CUDA_VISIBLE_DEVICES values (`gpu_shares`); each worker process
    takes one before anything touches CUDA. Training on one rank initialises
    torch.distributed once per process and sets RANK, LOCAL_RANK and WORLD_SIZE
    (spin_core.training.train.init_distributed), which DeepSpeed reads again at every later run.
    The runner restores a worker's environment after each task, which would drop them
    while the process group stays initialised: set them for good.
    """
    import queue

    if shares is not None:
        try:
            share = shares.get(timeout=5)
        except queue.Empty:  # a replacement for a crashed worker keeps this process's GPUs
            share = None
        if share is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = share
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


@contextmanager
def _shared_api():
    """Worker processes use this process's Prefect API: PREFECT_API_URL, or the URL of the
    temporary server Prefect started here (else each worker would start its own)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # already running when this flow runs on the temporary server
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _run_all(pending: list[compare.PlannedRun], max_parallel: int) -> dict[str, BaseException]:
    """Run the pending runs, at most max_parallel at a time; the failures by run label."""
    log = get_run_logger()
    failures: dict[str, BaseException] = {}
    if max_parallel == 1 or len(pending) == 1:
        for run in pending:
            log.info("running %s in %s", run.label, run.run_dir)
            try:
                _pipeline(run)(run.config, str(run.run_dir))
            except Exception as exc:  # noqa: BLE001 - the other runs go on; reported at the end
                log.error("%s failed: %s", run.label, exc)
                failures[run.label] = exc
        return failures
    import multiprocessing

    from prefect.task_runners import ProcessPoolTaskRunner

    workers = min(max_parallel, len(pending))
    log.info("running %d runs, %d at a time, in worker processes", len(pending), workers)
    planned = gpu_shares(workers)
    for share in filter(None, set(planned)):  # each run must fit in any share it may get
        for run in pending:
            if run.config.run.execution == "local":
                where = f"a share of {workers} parallel runs (CUDA_VISIBLE_DEVICES={share})"
                for warning in check_device_counts(run.config, len(share.split(",")), where):
                    log.warning("%s: %s", run.label, warning)
    shares = multiprocessing.get_context("spawn").Queue()  # the runner's workers are spawned
    for share in planned:
        shares.put(share)
    if any(planned):
        log.info("CUDA_VISIBLE_DEVICES of the worker processes: %s", "; ".join(map(str, planned)))
    runner = ProcessPoolTaskRunner(
        max_workers=workers, initializer=_one_rank_worker, initargs=(shares,)
    )
    with _shared_api(), runner:
        futures = {
            run.label: runner.submit(
                run_in_worker,
                parameters={
                    "config": run.config.model_dump(mode="json"),
                    "run_dir": str(run.run_dir),
                    "recipe": run.recipe,
                    "seed": run.seed,
                },
            )
            for run in pending
        }
        for label, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - as above
                log.error("%s failed: %s", label, exc)
                failures[label] = exc
    return failures


@task(name="build-shared-embedded-default", cache_policy=NO_CACHE)
def build_shared_toy(config: SpinConfig, toy_dir: str) -> str:
    """The embedded default's data and θ0 for every run of a comparison (built once)."""
    return str(toy.build_from_config(toy_dir, config.toy).model_dir)


@flow(name="spin-compare", log_prints=True)
def spin_compare(
    configs: list[SpinConfig | str],
    seeds: int = 3,
    out_dir: str = "runs/compare",
    max_parallel: int = 1,
    overrides: list[str] | None = None,
) -> str:
    """Run every config (a recipe) with seeds 0 … seeds−1 and compare them; returns compare.md.

    configs: YAML config paths (recipe = file stem) or configs (recipe = run.name);
    overrides: `key=value` applied to every config. Each (recipe, seed k) is a
    spin-pipeline run in OUT/<recipe>/seed-<k> with data.seed, generation.seed and
    training.seed = k. A run that is finished with the same config is reused, a partial
    one resumes; max_parallel runs at a time. Writes OUT/compare.md, OUT/compare.parquet,
    OUT/plots/compare_metrics.png, and the same tables as artifacts.
    """
    log = get_run_logger()
    if max_parallel < 1:
        raise InputError(f"compare: max_parallel must be at least 1 (got {max_parallel})")
    recipes = compare.load_recipes(configs, overrides or [])
    # The embedded default is built once, in OUT/toy/, and shared by every run using it.
    shared = {r.name: compare.shared_toy_dir(r.config, out_dir) for r in recipes}
    recipes = [compare.with_shared_toy(r, shared[r.name]) for r in recipes]
    planned = compare.plan_runs(recipes, seeds, out_dir)
    compare.refuse_changed_configs(planned)  # before any run starts
    pending = [p for p in planned if not compare.is_finished(p.run_dir, p.config)]
    for recipe in recipes:
        if shared[recipe.name] is not None and any(p.recipe == recipe.name for p in pending):
            build_shared_toy(recipe.config, str(shared[recipe.name]))
    reused = {p.label for p in planned} - {p.label for p in pending}
    for p in planned:
        if p.label in reused:
            log.info("%s is finished with this config: reused (%s)", p.label, p.run_dir)
    failures = _run_all(pending, max_parallel)

    finished = [p for p in planned if p.label not in failures]
    results = [compare.RunResult(p.recipe, p.seed, p.run_dir) for p in finished]
    missing = [
        f"{label}: failed ({(str(exc) or type(exc).__name__).splitlines()[0][:200]})"
        for label, exc in failures.items()
    ]
    path, comparison = compare_report.write_compare(out_dir, results, missing=missing)
    _publish(path, comparison, reused=reused)
    log.info(
        "%d runs: %d ran, %d reused, %d failed; comparison written to %s",
        len(planned),
        len(pending) - len(failures),
        len(reused),
        len(failures),
        path,
    )
    if failures:
        label, first = next(iter(failures.items()))
        raise RuntimeError(
            f"{len(failures)} of {len(planned)} runs failed ({', '.join(failures)}); "
            f"{label}: {first}"
        ) from first
    return str(path)


def _publish(path: Path, comparison: compare.RecipeComparison, reused: set[str]) -> None:
    summary = comparison.summary
    if len(summary):
        columns = ["recipe", "model", "iteration", "n_seeds", "seeds"]
        for metric in compare.METRICS:
            columns += [metric, f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_per_seed"]
        create_table_artifact(
            table=compare_report.artifact_rows(summary[columns]),
            key="spin-compare",
            description="held-out metrics per recipe and model: mean over seeds, 95% t-interval, "
            "and every seed's value",
        )
    if comparison.tests:
        create_table_artifact(
            table=compare_report.artifact_rows(comparison.significance_rows()),
            key="spin-compare-significance",
            description="SPIN θt vs SFT baseline t per recipe, paired over prompts, pooled over seeds",
        )
    runs = [
        {
            "recipe": r.recipe,
            "seed": r.seed,
            "run_dir": str(r.run_dir),
            "this_run": "reused" if f"{r.recipe}/seed-{r.seed}" in reused else "ran",
        }
        for r in comparison.results
    ]
    if runs:
        create_table_artifact(
            table=runs, key="spin-compare-runs", description="the runs of the comparison"
        )
    create_markdown_artifact(
        markdown=embed_images(path.read_text(), path.parent),
        key="spin-compare-report",
        description=str(path),
    )
