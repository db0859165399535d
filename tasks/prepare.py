"""Before iteration 0: the embedded default (when selected) and the held-out split."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from spin_core import generate, toy
from spin_core.checkpoint import check_causal_lm, load_tokenizer
from spin_core.config import TOY, SpinConfig
from spin_core.data import (
    OPTIONAL_COLUMNS,
    PAIR_COLUMNS,
    load_sft_data,
    read_parquet_checked,
    sample_prompts,
    write_parquet_atomic,
)
from spin_core.errors import InputError
from spin_core.prompts import encode_pairs
from spin_core.rundir import RunDir
from tasks.caching import transient_only
from tasks.progress import logger


@task(name="build-embedded-default", cache_policy=NO_CACHE)
def build_embedded_default(config: SpinConfig, run_dir: str) -> str:
    """Generate the toy data and train the weak SFT model θ0 (docs/DESIGN.md §6); skipped once built."""
    run = RunDir(run_dir)
    artifacts = toy.build_from_config(run.toy, config.toy)
    logger().info("embedded default ready: θ0 at %s", artifacts.model_dir)
    return str(artifacts.model_dir)


def check_tracking_available(config: SpinConfig) -> None:
    """InputError naming run.tracking when its package is not installed."""
    import importlib.util

    package = {"mlflow": "mlflow", "wandb": "wandb"}.get(config.run.tracking)
    if package and importlib.util.find_spec(package) is None:
        raise InputError(
            f"run.tracking: {config.run.tracking!r} needs the {package} package, which is not "
            "installed (pip install 'spin[tracking]'), or set run.tracking: none"
        )


def check_own_inputs(config: SpinConfig) -> None:
    """Check the inputs that are the user's own, before the embedded default is built.

    With one input the embedded default and the other the user's (a missing
    dataset with the toy model, a missing model with the toy data), the user's
    mistake is reported in seconds, before minutes of SFT warm-up and before
    anything is written into the run directory.
    """
    check_tracking_available(config)
    tokenizer = None
    if config.model.name_or_path != TOY:
        check_causal_lm(config.model.name_or_path, trust_remote_code=config.model.trust_remote_code)
        tokenizer = load_tokenizer(
            config.model.name_or_path, trust_remote_code=config.model.trust_remote_code
        )
    if config.run.execution == "local":
        generate.check_backend_available(config)
    if config.data.dataset != TOY:
        train_pairs, _, _ = load_sft_data(config.data)
        sample_prompts(train_pairs, config.data.num_prompts, seed=config.data.seed)
        if tokenizer is not None:
            encode_pairs(tokenizer, train_pairs.head(8), config.training.max_prompt_length)


@task(
    name="check-inputs",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient_only,
)
def check_inputs(config: SpinConfig, run_dir: str) -> str:
    """Refuse bad data or model paths before heavy work; write heldout.parquet (id, prompt, real)."""
    run = RunDir(run_dir)
    check_tracking_available(config)
    check_causal_lm(run.base_model(config), trust_remote_code=config.model.trust_remote_code)
    if config.run.execution == "local":  # with deployments, the GPU workers have the backend
        generate.check_backend_available(config)
    train_pairs, heldout, stats = load_sft_data(run.data_config(config))
    # Raises, naming data.num_prompts, when the data holds fewer usable rows.
    sample_prompts(train_pairs, config.data.num_prompts, seed=config.data.seed)
    # Raises, naming the tokenizer, when its template cannot split prompt from response.
    tokenizer = load_tokenizer(
        run.base_model(config), trust_remote_code=config.model.trust_remote_code
    )
    encode_pairs(tokenizer, train_pairs.head(8), config.training.max_prompt_length)
    logger().info(
        "data: %d training pairs, %d held out (%s)", len(train_pairs), len(heldout), stats
    )
    if read_parquet_checked(run.heldout) is None:
        columns = [c for c in [*PAIR_COLUMNS, *OPTIONAL_COLUMNS] if c in heldout]
        write_parquet_atomic(heldout[columns], run.heldout)
    return str(run.heldout)
