"""Step 3: the training set D_t = current generations + `history` earlier ones."""

from __future__ import annotations

import json

import pandas as pd

from spin_core import data
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir, write_json_atomic
from tasks.caching import step
from tasks.progress import logger


def _sources(params: dict) -> list:
    run, t = RunDir(params["run_dir"]), params["iteration"]
    history = params["config"].data.history
    return [run.generated(s) for s in range(max(0, t - history), t + 1)]


def _pairs_done(params: dict) -> bool:
    run, t = RunDir(params["run_dir"]), params["iteration"]
    return data.parquet_complete(run.pairs(t)) and (run.iteration(t) / "pairs.json").exists()


def _pairs_counts(params: dict) -> dict:
    run, t = RunDir(params["run_dir"]), params["iteration"]
    return json.loads((run.iteration(t) / "pairs.json").read_text())


@step(
    "build-training-set",
    sections=("data",),
    inputs=_sources,
    done=_pairs_done,
    load=_pairs_counts,
)
def build_training_set(config: SpinConfig, run_dir: str, iteration: int) -> dict:
    """generated.parquet of t, t-1, ... → iter_t/pairs.parquet; returns the counts."""
    run = RunDir(run_dir)
    stats_path = run.iteration(iteration) / "pairs.json"
    sources = range(max(0, iteration - config.data.history), iteration + 1)
    generated = {t: pd.read_parquet(run.generated(t)) for t in sources}
    pairs, stats = data.build_training_set(generated, drop_identical=config.data.drop_identical)
    data.write_parquet_atomic(pairs, run.pairs(iteration))
    counts = {
        "train_pairs": stats.rows,
        "identical_dropped": stats.identical_dropped,
        "identical_fraction": stats.identical_fraction,
    }
    write_json_atomic(counts, stats_path)
    logger().info(
        "iteration %d: %d training pairs from iterations %s; %d identical pairs dropped (%.1f%%)",
        iteration,
        stats.rows,
        list(sources),
        stats.identical_dropped,
        100 * stats.identical_fraction,
    )
    return counts
