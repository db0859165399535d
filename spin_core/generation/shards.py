"""The opponent writes responses: batched generation into resumable Parquet shards.

Prompts are the token ids `spin_core.prompts` made at sampling time (the ones
training scores), sorted by length, and batched by a token budget with left
padding. Each response keeps the exact ids the opponent produced
(`generated_ids`, ending with EOS only when it stopped there), so training never
scores a re-encoding of the decoded text; the text is for display and the
report. Output goes to `part-00000.parquet`, ... of `shard_size` rows each; a
finished shard is kept across crashes and a truncated one is redone. A backend
only maps prompt token ids to responses, so vLLM can stand in for Hugging Face
`generate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from spin_core.config import SpinConfig
from spin_core.data import SAMPLE_COLUMNS
from spin_core.generation.claims import claimed_shards
from spin_core.generation.decoding import Decoding, GenerationBackend
from spin_core.generation.hf import HFBackend
from spin_core.runtime.devices import release_memory
from spin_core.storage.files import read_parquet_checked, write_parquet_atomic

logger = logging.getLogger(__name__)


def make_backend(
    model_path: str,
    cfg: SpinConfig,
    tokenizer,
    *,
    max_new_tokens: int | None = None,
    model=None,
):
    """The configured backend for the opponent at `model_path`, on this process's device."""
    decoding = Decoding.from_config(cfg.generation, tokenizer, max_new_tokens)
    if cfg.generation.backend == "vllm":
        from spin_core.generation.vllm import VLLMBackend

        return VLLMBackend(model_path, tokenizer, decoding, cfg)
    if model is None:
        from spin_core.runtime.devices import device
        from spin_core.storage.models import load_policy

        model, _ = load_policy(model_path, cfg.model, on_device=device())
    return HFBackend(
        model,
        tokenizer,
        decoding,
        batch_tokens=cfg.generation.batch_tokens,
        max_batch_size=cfg.generation.max_batch_size,
    )


def shard_count(num_rows: int, shard_size: int) -> int:
    return (num_rows + shard_size - 1) // shard_size


def shard_path(shards_dir: Path, index: int) -> Path:
    return shards_dir / f"part-{index:05d}.parquet"


def shard_complete(shards_dir: Path, index: int, num_rows: int, shard_size: int) -> bool:
    expected = min(shard_size, num_rows - index * shard_size)
    return read_parquet_checked(shard_path(shards_dir, index), expected_rows=expected) is not None


def generate_shards(
    backend: GenerationBackend,
    prompts: pd.DataFrame,
    shards_dir: str | Path,
    *,
    shard_size: int,
    opponent: str,
    decoding: Decoding,
    on_rows: Callable[[int], None] | None = None,
) -> list[Path]:
    """Generate every missing or truncated shard of `prompts` that no other worker holds;
    returns the paths of all its shards.

    prompts: prompts.parquet rows (id, prompt, real, prompt_ids, real_ids; in sample order).
    Shard k holds rows [k·shard_size, (k+1)·shard_size). Workers claim shards as they go
    (`spin_core.generation.claims`), so any number of them, in any processes, share the
    work; `on_rows(n)` is told of every n rows generated.
    """
    shards_dir = Path(shards_dir)
    total = shard_count(len(prompts), shard_size)

    def done(k: int) -> bool:
        return shard_complete(shards_dir, k, len(prompts), shard_size)

    for k in claimed_shards(shards_dir, list(range(total)), done):
        rows = prompts.iloc[k * shard_size : (k + 1) * shard_size]
        ids = [[int(t) for t in row] for row in rows["prompt_ids"]]
        # A backend seeds its sampling from (seed, first_row), so a redone shard samples
        # what the lost one did (HF: a generator of the shard; vLLM: a seed per request).
        generated = backend.generate(ids, progress=on_rows, first_row=k * shard_size)
        shard = (
            rows[[c for c in SAMPLE_COLUMNS if c in rows]]
            .reset_index(drop=True)
            .assign(
                generated=[g.text for g in generated],
                generated_ids=[np.asarray(g.token_ids, dtype=np.int32) for g in generated],
                finish_reason=[g.finish_reason for g in generated],
                generated_tokens=[g.num_tokens for g in generated],
                opponent=opponent,
                decoding=decoding.to_json(),
            )
        )
        write_parquet_atomic(shard, shard_path(shards_dir, k))
    return [shard_path(shards_dir, k) for k in range(total)]


def generate_from_model(
    opponent: str,
    cfg: SpinConfig,
    prompts: pd.DataFrame,
    shards_dir: str | Path,
    *,
    on_rows: Callable[[int], None] | None = None,
) -> None:
    """One generation worker, in this process: load the opponent at `opponent` on this
    process's device, answer the prompts' stored token ids shard by shard (those no other
    worker holds), then free the model and its GPU memory."""
    from spin_core.storage.models import load_tokenizer

    tokenizer = load_tokenizer(opponent, trust_remote_code=cfg.model.trust_remote_code)
    backend = make_backend(opponent, cfg, tokenizer)
    try:
        generate_shards(
            backend,
            prompts,
            shards_dir,
            shard_size=cfg.generation.shard_size,
            opponent=opponent,
            decoding=Decoding.from_config(cfg.generation, tokenizer),
            on_rows=on_rows,
        )
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()  # vLLM: stops the engine
        del backend, close
        release_memory()


def missing_shards(shards_dir: str | Path, num_rows: int, shard_size: int) -> list[int]:
    """The shards not yet complete on disk."""
    return [
        k
        for k in range(shard_count(num_rows, shard_size))
        if not shard_complete(Path(shards_dir), k, num_rows, shard_size)
    ]


def merge_shards(
    shards_dir: str | Path, num_rows: int, shard_size: int, out_path: str | Path
) -> Path:
    """Concatenate the shards in order into `generated.parquet` (atomically)."""
    shards_dir = Path(shards_dir)
    total = shard_count(num_rows, shard_size)
    frames = []
    for k in range(total):
        expected = min(shard_size, num_rows - k * shard_size)
        frame = read_parquet_checked(shard_path(shards_dir, k), expected_rows=expected)
        if frame is None:
            raise RuntimeError(f"{shard_path(shards_dir, k)}: shard missing or incomplete")
        frames.append(frame)
    return write_parquet_atomic(pd.concat(frames, ignore_index=True), out_path)
