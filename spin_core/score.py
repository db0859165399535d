"""Tokenized pairs and no-grad scoring of summed response log-probabilities.

The opponent θt is frozen during iteration t, so log pθt(y|x) and log pθt(y'|x)
are computed once per iteration, here, and stored in `train.parquet`; training
then needs no second model in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from spin_core.generate import token_budget_batches
from spin_core.logprobs import pad_batch, sequence_logps
from spin_core.prompts import Truncation, build_example, encode_prompt, encode_response


@dataclass
class Examples:
    """Tokenized prompt + response rows: input_ids and labels (-100 on the prompt)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncation: Truncation = field(default_factory=Truncation)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def tokenize_responses(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int,
) -> Examples:
    """prompt + response + EOS for every row, truncated per SPEC (counted)."""
    examples = Examples([], [])
    prompt_cache: dict[str, list[int]] = {}
    for prompt, response in zip(prompts, responses, strict=True):
        if prompt not in prompt_cache:
            prompt_cache[prompt] = encode_prompt(tokenizer, prompt)
        ids, labels, cut = build_example(
            prompt_cache[prompt],
            encode_response(tokenizer, response),
            max_length,
            max_prompt_length,
        )
        examples.input_ids.append(ids)
        examples.labels.append(labels)
        examples.truncation.add(cut)
    return examples


@torch.no_grad()
def score_examples(
    model,
    examples: Examples,
    pad_token_id: int,
    *,
    batch_tokens: int,
    chunk_size: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and response token counts of every example.

    Examples are sorted by length and batched by a token budget, so each batch is
    padded only to its own longest row.
    """
    device = next(model.parameters()).device
    logps = np.zeros(len(examples.input_ids), dtype=np.float64)
    counts = np.zeros(len(examples.input_ids), dtype=np.int64)
    for batch in token_budget_batches(examples.lengths(), batch_tokens, max_batch_size=1024):
        ids, mask, labels = pad_batch(
            [examples.input_ids[i] for i in batch],
            [examples.labels[i] for i in batch],
            pad_token_id,
        )
        batch_logps, batch_counts = sequence_logps(
            model, ids.to(device), mask.to(device), labels.to(device), chunk_size=chunk_size
        )
        logps[batch] = batch_logps.double().cpu().numpy()
        counts[batch] = batch_counts.cpu().numpy()
        if progress is not None:
            progress(len(batch))
    return logps, counts


def score_columns(
    model,
    tokenizer,
    frame: pd.DataFrame,
    columns: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int,
    batch_tokens: int,
    chunk_size: int = 1024,
    show_progress: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Truncation]:
    """Log-probs and token counts of each response column of `frame` given its prompts.

    All columns go through one length-sorted pass, so real and generated responses
    of similar length share batches.
    """
    per_column = {
        column: tokenize_responses(
            tokenizer,
            frame["prompt"].tolist(),
            frame[column].tolist(),
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for column in columns
    }
    merged = Examples([], [])
    for examples in per_column.values():
        merged.input_ids += examples.input_ids
        merged.labels += examples.labels
        merged.truncation.add(examples.truncation)
    bar = tqdm(total=len(merged.input_ids), desc="score", unit="seq", disable=not show_progress)
    logps, counts = score_examples(
        model,
        merged,
        tokenizer.pad_token_id,
        batch_tokens=batch_tokens,
        chunk_size=chunk_size,
        progress=bar.update,
    )
    bar.close()
    n = len(frame)
    logp_out = {c: logps[i * n : (i + 1) * n] for i, c in enumerate(columns)}
    count_out = {c: counts[i * n : (i + 1) * n] for i, c in enumerate(columns)}
    return logp_out, count_out, merged.truncation


def score_with_opponent(
    opponent, tokenizer, training_set: pd.DataFrame, training_cfg, *, show_progress: bool = False
) -> tuple[pd.DataFrame, Truncation]:
    """Add opponent_real_logps and opponent_generated_logps to the training set."""
    logps, _, truncation = score_columns(
        opponent,
        tokenizer,
        training_set,
        ["real", "generated"],
        max_length=training_cfg.max_length,
        max_prompt_length=training_cfg.max_prompt_length,
        batch_tokens=training_cfg.score_batch_tokens,
        chunk_size=training_cfg.logprob_chunk_size,
        show_progress=show_progress,
    )
    scored = training_set.assign(
        opponent_real_logps=logps["real"], opponent_generated_logps=logps["generated"]
    )
    return scored, truncation
