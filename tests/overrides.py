"""Config overrides for the tests' runs: one place for the small sizes every run test uses."""

from __future__ import annotations

from collections.abc import Iterable

# One iteration whose generation takes 16 shards: long enough to be interrupted in the middle.
MID_GENERATION = {
    "data.num_prompts": 256,
    "run.iterations": 1,
    "run.baseline": "none",
    "generation.shard_size": 16,
    "generation.max_new_tokens": 48,
    "training.num_epochs": 1,
}

# Enough rows and a batch small enough for a few optimizer steps in seconds on a CPU.
SMALL = {
    "data.num_prompts": 32,
    "data.eval_size": 16,
    "training.global_batch_size": 8,
    "training.micro_batch_size": 4,
}


def _value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def overrides(build, changes: dict | None = None) -> list[str]:
    """`key=value` overrides for a run on `build` (a toy or real-tokenizer build, anything
    with `config_overrides()`): its paths, then SMALL, then `changes`."""
    merged = SMALL | (changes or {})
    return [*build.config_overrides(), *(f"{key}={_value(v)}" for key, v in merged.items())]


def set_args(items: Iterable[str]) -> list[str]:
    """The overrides as `spin` command-line arguments: --set ITEM for each."""
    return [arg for item in items for arg in ("--set", item)]
