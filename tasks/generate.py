"""Step 2: the opponent θt writes a response to every sampled prompt."""

from __future__ import annotations

import pandas as pd
from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE

from spin_core import data, generate
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.caching import step
from tasks.progress import Progress, logger


def _inputs(params: dict) -> list:
    return [RunDir(params["run_dir"]).prompts(params["iteration"]), params["opponent"]]


def _load(params: dict) -> str:
    return str(RunDir(params["run_dir"]).generated(params["iteration"]))


def _done(params: dict) -> bool:
    run, t = RunDir(params["run_dir"]), params["iteration"]
    return data.parquet_complete(run.generated(t), data.parquet_rows(run.prompts(t)))


@step(
    "generate-responses",
    sections=("generation", "model", "training"),
    inputs=_inputs,
    done=_done,
    load=_load,
)
def generate_responses(config: SpinConfig, run_dir: str, iteration: int, opponent: str) -> str:
    """prompts.parquet + θt → generated/part-*.parquet → generated.parquet.

    Finished shards are kept, so a crash costs at most one shard.
    """
    run = RunDir(run_dir)
    out = run.generated(iteration)
    prompts = pd.read_parquet(run.prompts(iteration), columns=["id"])
    workers = config.generation.num_workers
    if workers == 1:
        generate_worker_shards(config, run_dir, iteration, opponent, 0)
    else:
        # One task per worker (one GPU each); each writes its own shards.
        futures = generate_worker_shards.map(
            unmapped(config),
            unmapped(run_dir),
            unmapped(iteration),
            unmapped(opponent),
            range(workers),
        )
        futures.result()  # raises the first worker failure
    generate.merge_shards(
        run.generated_shards(iteration), len(prompts), config.generation.shard_size, out
    )
    finished = pd.read_parquet(out, columns=["finish_reason"])["finish_reason"]
    logger().info(
        "iteration %d: %d responses, %.1f%% stopped at EOS",
        iteration,
        len(finished),
        100 * (finished == "stop").mean(),
    )
    return str(out)


@task(name="generate-shards", cache_policy=NO_CACHE)
def generate_worker_shards(
    config: SpinConfig, run_dir: str, iteration: int, opponent: str, worker: int
) -> int:
    """Worker `worker`'s share of the shards (every `num_workers`-th), on its own device.

    Shards already complete on disk are kept; returns the number of shards it owns.
    """
    run = RunDir(run_dir)
    prompts = pd.read_parquet(run.prompts(iteration))
    shard_size = config.generation.shard_size
    mine = generate.worker_shards(len(prompts), shard_size, config.generation.num_workers, worker)
    progress = Progress(
        f"generate-iter-{iteration}-worker-{worker}",
        f"iteration {iteration}, generation worker {worker}: shards",
    )
    generate.generate_from_model(
        opponent,
        config,
        prompts,
        run.generated_shards(iteration),
        worker=worker,
        shard_indices=mine,
        show_progress=config.generation.num_workers == 1,
        on_shard=progress.update,
    )
    return len(mine)
