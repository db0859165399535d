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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig

from spin_core.config import ConfigError, SpinConfig
from spin_core.data import SAMPLE_COLUMNS, read_parquet_checked, write_parquet_atomic
from spin_core.decoding import Decoding, Generated, GenerationBackend, token_budget_batches

logger = logging.getLogger(__name__)


class HFBackend:
    """Batched `model.generate` with left padding; stops each row at EOS."""

    def __init__(
        self, model, tokenizer, decoding: Decoding, *, batch_tokens: int, max_batch_size: int
    ):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.batch_tokens, self.max_batch_size = batch_tokens, max_batch_size
        self.hf_config = HFGenerationConfig(
            do_sample=decoding.do_sample,
            temperature=decoding.temperature if decoding.do_sample else None,
            top_p=decoding.top_p if decoding.do_sample else None,
            top_k=None,
            max_new_tokens=decoding.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        progress: Callable[[int], None] | None = None,
        first_row: int = 0,
    ):
        results: list[Generated | None] = [None] * len(prompt_ids)
        batches = token_budget_batches(
            [len(p) for p in prompt_ids],
            self.batch_tokens,
            self.max_batch_size,
            self.decoding.max_new_tokens,
        )
        device = next(self.model.parameters()).device
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        # Sampling draws from torch's global generator, seeded per shard by generate_shards.
        for batch in batches:
            rows = [prompt_ids[i] for i in batch]
            longest = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for j, row in enumerate(rows):  # left padding: generation continues at the right edge
                input_ids[j, longest - len(row) :] = torch.tensor(row)
                attention_mask[j, longest - len(row) :] = 1
            if self.decoding.do_sample:
                output = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=self.hf_config,
                )  # (batch, longest + new)
                new_ids = [row.tolist() for row in output[:, longest:]]
            else:
                new_ids = greedy_decode(
                    self.model,
                    input_ids.to(device),
                    attention_mask.to(device),
                    max_new_tokens=self.decoding.max_new_tokens,
                    eos_token_id=eos,
                )
            for j, index in enumerate(batch):
                results[index] = Generated.from_ids(new_ids[j], self.tokenizer)
            if progress is not None:
                progress(len(batch))
        return results


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
) -> list[list[int]]:
    """New token ids of each left-padded row, greedily; a row leaves the batch at its EOS.

    The same tokens as `model.generate(do_sample=False)`, but `generate` keeps computing
    every row until the batch's longest one ends, and on the toy task one row that
    never stops makes 255 finished ones run 32 steps. Here the KV cache and the batch
    shrink as rows finish, so decoding costs the tokens actually generated.
    """
    from transformers import DynamicCache

    new_tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = torch.arange(input_ids.shape[0])  # (active,) row of each live sequence
    cache = DynamicCache(config=model.config)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (batch, seq)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]  # (active, vocab)
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)  # (active,)
        for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
            new_tokens[row].append(token)
        running = tokens != eos_token_id  # (active,)
        if step + 1 == max_new_tokens or not running.any():
            break
        if not running.all():
            keep = running.nonzero(as_tuple=True)[0]
            cache.batch_select_indices(keep)
            rows, tokens, attention_mask = rows[keep.cpu()], tokens[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], -1)
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=attention_mask.sum(-1, keepdim=True) - 1,  # (active, 1)
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
    return new_tokens


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
        from spin_core.vllm_backend import VLLMBackend

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
        ids = list(prompt_ids[k * shard_size : (k + 1) * shard_size])
        # Seeded per shard so a redone shard samples what the lost one would have.
        torch.manual_seed(decoding.seed + k)
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
    worker `worker`'s device and answer the prompts' stored token ids, shard by shard."""
    from spin_core.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(opponent, trust_remote_code=cfg.model.trust_remote_code)
    backend = make_backend(opponent, cfg, tokenizer, worker=worker)
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
