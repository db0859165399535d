"""Step 1: sample the iteration's (prompt, real) pairs from the SFT data."""

from __future__ import annotations

from pathlib import Path

from spin_core import data
from spin_core.checkpoint import load_tokenizer
from spin_core.config import SpinConfig
from spin_core.prompts import drop_overlong_prompts, encode_pairs
from spin_core.rundir import RunDir
from tasks.caching import step, transient_only
from tasks.progress import logger


def _inputs(params: dict) -> list:
    run = RunDir(params["run_dir"])
    dataset = run.dataset(params["config"])
    return [dataset] if Path(dataset).exists() else []


def _load(params: dict) -> str:
    return str(RunDir(params["run_dir"]).prompts(params["iteration"]))


def _done(params: dict) -> bool:
    return data.parquet_complete(RunDir(params["run_dir"]).prompts(params["iteration"]))


@step(
    "sample-prompts",
    sections=("data", "model", "toy", "training"),
    inputs=_inputs,
    done=_done,
    load=_load,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient_only,
)
def sample_prompts(config: SpinConfig, run_dir: str, iteration: int) -> str:
    """SFT data → iter_t/prompts.parquet (id, prompt, real, prompt_ids, real_ids); seeded,
    the same every iteration."""
    run = RunDir(run_dir)
    out = run.prompts(iteration)
    train_pairs, _, stats = data.load_sft_data(run.data_config(config))
    tokenizer = load_tokenizer(
        run.base_model(config), trust_remote_code=config.model.trust_remote_code
    )
    if config.data.overlong_prompts == "drop":
        train_pairs, dropped = drop_overlong_prompts(
            train_pairs, tokenizer, config.training.max_prompt_length
        )
        logger().info(
            "dropped %d prompts longer than %d tokens", dropped, config.training.max_prompt_length
        )
    sample = data.sample_prompts(
        train_pairs,
        config.data.num_prompts,
        seed=config.data.seed,
        iteration=iteration,
        resample=config.data.resample_each_iteration,
    )
    logger().info(
        "iteration %d: sampled %d of %d pairs (%s)", iteration, len(sample), len(train_pairs), stats
    )
    # Tokenized once, here, as the SFT trainer tokenized the chat; later steps use these ids.
    prompt_ids, real_ids = encode_pairs(tokenizer, sample, config.training.max_prompt_length)
    sample = sample.assign(prompt_ids=prompt_ids, real_ids=real_ids)
    return str(data.write_parquet_atomic(sample, out))
