"""Step 2: the opponent θt writes a response to every sampled prompt."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from spin_core import generate
from spin_core.checkpoint import load_tokenizer
from spin_core.config import SpinConfig
from spin_core.data import read_parquet_checked
from spin_core.rundir import RunDir
from tasks.progress import Progress, logger


@task(name="generate-responses", cache_policy=NO_CACHE)
def generate_responses(config: SpinConfig, run_dir: str, iteration: int, opponent: str) -> str:
    """prompts.parquet + θt → generated/part-*.parquet → generated.parquet.

    Finished shards are kept, so a crash costs at most one shard.
    """
    run = RunDir(run_dir)
    out = run.generated(iteration)
    prompts = pd.read_parquet(run.prompts(iteration))
    if read_parquet_checked(out, expected_rows=len(prompts)) is not None:
        logger().info("iteration %d: %s exists, skipped", iteration, out.name)
        return str(out)
    tokenizer = load_tokenizer(opponent, trust_remote_code=config.model.trust_remote_code)
    backend = generate.make_backend(opponent, config, tokenizer)
    prompt_ids = generate.encode_prompts(
        tokenizer, prompts["prompt"].tolist(), config.training.max_prompt_length
    )
    progress = Progress(f"generate-iter-{iteration}", f"iteration {iteration}: shards generated")
    generate.generate_shards(
        backend,
        prompts,
        prompt_ids,
        run.generated_shards(iteration),
        shard_size=config.generation.shard_size,
        opponent=opponent,
        decoding=generate.Decoding.from_config(config.generation, tokenizer),
        on_shard=progress.update,
    )
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
