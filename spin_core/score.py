"""Tokenized pairs and no-grad scoring of summed response log-probabilities.

The opponent θt is frozen during iteration t, so log pθt(y|x) and log pθt(y'|x)
are computed once per iteration and stored in `train.parquet`; training then
needs no second model in memory. Because θ(t+1) starts as θt, the training ranks
do this scoring with their own engine before the first optimizer step
(`spin_core.training.train`), each rank a share, so it scales with the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from spin_core.config import TrainingConfig
from spin_core.generation.decoding import token_budget_batches
from spin_core.logprobs import check_logprob_path, pad_batch, sequence_logps
from spin_core.prompts import Truncation, build_example, encode_conversations, prompt_messages
from spin_core.runtime.devices import all_reduce_sum
from spin_core.runtime.devices import device as rank_device

# What scoring adds to the training set: θt's summed log-probs of each pair's two responses.
SCORED_COLUMNS = ("opponent_real_logps", "opponent_generated_logps")


@dataclass
class Examples:
    """Tokenized prompt + response rows: input_ids and labels (-100 on the prompt)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncation: Truncation = field(default_factory=Truncation)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def examples_from_ids(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    max_length: int,
    max_prompt_length: int,
) -> Examples:
    """prompt + response ids of every row (no re-encoding), truncated to the limits (counted)."""
    examples = Examples([], [])
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        ids, labels, cut = build_example(prompt, response, max_length, max_prompt_length)
        examples.input_ids.append(ids)
        examples.labels.append(labels)
        examples.truncation.add(cut)
    return examples


def tokenize_responses(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int,
    contexts: Sequence[str | None] | None = None,
) -> Examples:
    """Real responses tokenized with their prompts as the SFT trainer did (`encode_conversations`)."""
    contexts = contexts if contexts is not None else [None] * len(prompts)
    conversations = [prompt_messages(p, c) for p, c in zip(prompts, contexts, strict=True)]
    prompt_ids, response_ids = encode_conversations(tokenizer, conversations, responses)
    return examples_from_ids(
        prompt_ids, response_ids, max_length=max_length, max_prompt_length=max_prompt_length
    )


def frame_examples(frame: pd.DataFrame, response_ids_column: str, training: TrainingConfig):
    """Examples of a frame's `prompt_ids` + `response_ids_column`, at the training limits."""
    return examples_from_ids(
        frame["prompt_ids"].tolist(),
        frame[response_ids_column].tolist(),
        max_length=training.max_length,
        max_prompt_length=training.max_prompt_length,
    )


@torch.no_grad()
def score_examples(
    model,
    examples: Examples,
    pad_token_id: int,
    *,
    batch_tokens: int,
    chunk_size: int = 1024,
    progress: Callable[[int], None] | None = None,
    check: bool = True,
    world_size: int = 1,
    forward: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and response token counts of every example.

    Examples are sorted by length and batched by a token budget, so each batch is
    padded only to its own longest row. With `check`, the first batch is also
    scored by a plain full-logits forward and must agree (`check_logprob_path`).
    With `world_size` > 1 (called on every rank of a process group) each rank
    scores every world_size-th batch and all ranks return the whole result.
    `forward(ids, mask, labels)` gives a batch's (log-probs, counts); by default
    `sequence_logps` on `model`. Training passes its DeepSpeed engine, whose module
    computes the same: the engine's own forward lets ZeRO-3 record the order it fetches
    parameters in and prefetch them, which calling the module directly bypasses.
    """
    if forward is None:

        def forward(ids, mask, labels):
            return sequence_logps(model, ids, mask, labels, chunk_size=chunk_size)

    device = next(model.parameters()).device
    logps = np.zeros(len(examples.input_ids), dtype=np.float64)
    counts = np.zeros(len(examples.input_ids), dtype=np.int64)
    batches = token_budget_batches(examples.lengths(), batch_tokens, max_batch_size=1024)
    rank = dist.get_rank() if world_size > 1 else 0
    mine = batches[rank::world_size]
    # ZeRO-3 gathers weights collectively in every forward: all ranks run as many
    # (a spare rank re-scores a batch and discards it).
    rounds = -(-len(batches) // world_size)
    checked = not check
    for round_index in range(rounds):
        batch = mine[round_index] if round_index < len(mine) else batches[0]
        ids, mask, labels = pad_batch(
            [examples.input_ids[i] for i in batch],
            [examples.labels[i] for i in batch],
            pad_token_id,
        )
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        batch_logps, batch_counts = forward(ids, mask, labels)
        if not checked:  # once per call: the fast path must agree with a plain forward
            check_logprob_path(model, ids, mask, labels, batch_logps)
            checked = True
        if round_index >= len(mine):
            continue
        logps[batch] = batch_logps.double().cpu().numpy()
        counts[batch] = batch_counts.cpu().numpy()
        if progress is not None:
            progress(len(batch) * world_size)
    if world_size > 1:  # every row was scored by exactly one rank: a sum gathers them
        # On the rank's device (where NCCL reduces), which need not be the weights' (offload).
        gathered = torch.from_numpy(np.stack([logps, counts.astype(np.float64)]))
        gathered = all_reduce_sum(gathered.to(rank_device()))
        logps, counts = gathered[0].cpu().numpy(), gathered[1].cpu().numpy().astype(np.int64)
    return logps, counts


def score_named(
    model,
    examples: dict[str, Examples],
    pad_token_id: int,
    *,
    batch_tokens: int,
    chunk_size: int = 1024,
    show_progress: bool = False,
    world_size: int = 1,
    forward: Callable | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Log-probs and token counts of several sets of examples (e.g. real and generated).

    All sets go through one length-sorted pass, so responses of similar length
    share batches whichever set they come from.
    """
    merged = Examples([], [])
    for part in examples.values():
        merged.input_ids += part.input_ids
        merged.labels += part.labels
    bar = tqdm(total=len(merged.input_ids), desc="score", unit="seq", disable=not show_progress)
    logps, counts = score_examples(
        model,
        merged,
        pad_token_id,
        batch_tokens=batch_tokens,
        chunk_size=chunk_size,
        progress=bar.update,
        world_size=world_size,
        forward=forward,
    )
    bar.close()
    logp_out, count_out, start = {}, {}, 0
    for name, part in examples.items():
        end = start + len(part.input_ids)
        logp_out[name], count_out[name] = logps[start:end], counts[start:end]
        start = end
    return logp_out, count_out


def score_with_opponent(
    opponent,
    pad_token_id: int,
    training_set: pd.DataFrame,
    training: TrainingConfig,
    *,
    show_progress: bool = False,
    world_size: int = 1,
    forward: Callable | None = None,
) -> tuple[pd.DataFrame, Truncation]:
    """Add opponent_real_logps and opponent_generated_logps to the training set.

    Scores the stored ids: the real responses as the SFT trainer tokenized them,
    the generated ones exactly as the opponent produced them. `world_size` > 1:
    called on every training rank, which share the work (see `score_examples`, also for
    `forward`).
    """
    examples = {
        "real": frame_examples(training_set, "real_ids", training),
        "generated": frame_examples(training_set, "generated_ids", training),
    }
    logps, _ = score_named(
        opponent,
        examples,
        pad_token_id,
        batch_tokens=training.score_batch_tokens,
        chunk_size=training.logprob_chunk_size,
        show_progress=show_progress,
        world_size=world_size,
        forward=forward,
    )
    truncation = Truncation()
    for part in examples.values():
        truncation.add(part.truncation)
    real, generated = SCORED_COLUMNS
    scored = training_set.assign(**{real: logps["real"], generated: logps["generated"]})
    return scored, truncation
