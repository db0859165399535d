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

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from spin_core import interrupt
from spin_core.config import ConfigError, SpinConfig
from spin_core.data import SAMPLE_COLUMNS, read_parquet_checked, write_parquet_atomic
from spin_core.generation.decoding import Decoding, GenerationBackend
from spin_core.generation.hf import HFBackend
from spin_core.generation.memory import release_memory

logger = logging.getLogger(__name__)


def check_backend_available(cfg: SpinConfig) -> None:
    """ConfigError, naming the field, when the selected backend is not installed."""
    import importlib.util

    if cfg.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generation.backend: 'vllm' needs the vllm package, which is not installed "
            "(pip install 'spin[vllm]', on a GPU machine), or use backend 'hf'"
        )


def make_backend(
    model_path: str,
    cfg: SpinConfig,
    tokenizer,
    *,
    max_new_tokens: int | None = None,
    model=None,
    worker: int = 0,
):
    """The configured backend for the opponent at `model_path` (on worker `worker`'s device)."""
    decoding = Decoding.from_config(cfg.generation, tokenizer, max_new_tokens)
    if cfg.generation.backend == "vllm":
        check_backend_available(cfg)
        from spin_core.generation.vllm import VLLMBackend

        return VLLMBackend(model_path, tokenizer, decoding, cfg)
    if model is None:
        from spin_core.checkpoint import load_policy, worker_device

        model, _ = load_policy(model_path, cfg.model, on_device=worker_device(worker))
    return HFBackend(
        model,
        tokenizer,
        decoding,
        batch_tokens=cfg.generation.batch_tokens,
        max_batch_size=cfg.generation.max_batch_size,
    )


def worker_shards(num_rows: int, shard_size: int, num_workers: int, worker: int) -> list[int]:
    """The shard indices of one generation worker (round robin, so every worker gets work)."""
    total = (num_rows + shard_size - 1) // shard_size
    return list(range(worker, total, num_workers))


def shard_path(shards_dir: Path, index: int) -> Path:
    return shards_dir / f"part-{index:05d}.parquet"


def generate_shards(
    backend: GenerationBackend,
    prompts: pd.DataFrame,
    prompt_ids: Sequence[list[int]],
    shards_dir: str | Path,
    *,
    shard_size: int,
    opponent: str,
    decoding: Decoding,
    shard_indices: Sequence[int] | None = None,
    show_progress: bool = True,
    on_shard: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Generate every missing or truncated shard of `prompts`; returns all shard paths.

    prompts: prompts.parquet rows (id, prompt, real, prompt_ids, real_ids; in sample order). Shard k holds rows
    [k·shard_size, (k+1)·shard_size). `shard_indices` restricts the work to some
    shards (one worker's share); `on_shard(done, total)` reports progress.
    """
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    total = (len(prompts) + shard_size - 1) // shard_size
    todo = list(range(total)) if shard_indices is None else list(shard_indices)
    paths = []
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not show_progress)
    for done, k in enumerate(todo, 1):
        rows = prompts.iloc[k * shard_size : (k + 1) * shard_size]
        path = shard_path(shards_dir, k)
        if read_parquet_checked(path, expected_rows=len(rows)) is not None:
            bar.update(len(rows))
            paths.append(path)
            continue
        interrupt.check()  # a worker thread stops between shards when the run was interrupted
        ids = list(prompt_ids[k * shard_size : (k + 1) * shard_size])
        # A backend seeds its sampling from (seed, first_row), so a redone shard samples
        # what the lost one did (HF: a generator of the shard; vLLM: a seed per request).
        generated = backend.generate(ids, progress=bar.update, first_row=k * shard_size)
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
        paths.append(write_parquet_atomic(shard, path))
        if on_shard is not None:
            on_shard(done, len(todo))
    bar.close()
    return paths


def generate_from_model(
    opponent: str,
    cfg: SpinConfig,
    prompts: pd.DataFrame,
    shards_dir: str | Path,
    *,
    worker: int = 0,
    shard_indices: Sequence[int] | None = None,
    show_progress: bool = True,
    on_shard: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """The whole generation step for `prompts` with the model at `opponent`: load it on
    worker `worker`'s device, answer the prompts' stored token ids shard by shard, then
    free the model and its GPU memory (the next step may be training, in this process)."""
    from spin_core.checkpoint import load_tokenizer, worker_device

    tokenizer = load_tokenizer(opponent, trust_remote_code=cfg.model.trust_remote_code)
    device = worker_device(worker)
    # Workers are threads; CUDA's current device is per thread, so each sets its own
    # (vLLM places its engine itself, in its own process).
    on_device = device.type == "cuda" and cfg.generation.backend == "hf"
    with torch.cuda.device(device) if on_device else contextlib.nullcontext():
        backend = make_backend(opponent, cfg, tokenizer, worker=worker)
        try:
            return generate_shards(
                backend,
                prompts,
                [list(ids) for ids in prompts["prompt_ids"]],
                shards_dir,
                shard_size=cfg.generation.shard_size,
                opponent=opponent,
                decoding=Decoding.from_config(cfg.generation, tokenizer),
                shard_indices=shard_indices,
                show_progress=show_progress,
                on_shard=on_shard,
            )
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()  # vLLM: stops the engine
            del backend, close
            release_memory()


def merge_shards(
    shards_dir: str | Path, num_rows: int, shard_size: int, out_path: str | Path
) -> Path:
    """Concatenate the shards in order into `generated.parquet` (atomically)."""
    shards_dir = Path(shards_dir)
    total = (num_rows + shard_size - 1) // shard_size
    frames = []
    for k in range(total):
        expected = min(shard_size, num_rows - k * shard_size)
        frame = read_parquet_checked(shard_path(shards_dir, k), expected_rows=expected)
        if frame is None:
            raise RuntimeError(f"{shard_path(shards_dir, k)}: shard missing or incomplete")
        frames.append(frame)
    return write_parquet_atomic(pd.concat(frames, ignore_index=True), out_path)
