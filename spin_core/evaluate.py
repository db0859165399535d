"""Held-out evaluation of θ0, θ1, ...

For each model: greedy exact match of its generations, the mean per-token
log-likelihood of the real responses (the health signal: SPIN's fixed point is
pθ = p_data), and, against its opponent θt, the reward accuracy and margin on
held-out pairs (x, y, y') where y' is the opponent's greedy generation. The
opponent's generations and log-probs come from its own evaluation, so each model
is generated from and scored once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from spin_core.config import SpinConfig
from spin_core.generation import Decoding, Generated, HFBackend
from spin_core.loss import reward_metrics, reward_sums
from spin_core.prompts import encode_pairs
from spin_core.score import examples_from_ids, score_named


def collapsed(loglik: float, opponent_loglik: float, tolerance: float) -> bool:
    """The health rule: the real responses' per-token log-likelihood fell more than
    `tolerance` (run.collapse_tolerance) below the opponent's. Reward accuracy is never used."""
    return bool(opponent_loglik - loglik > tolerance)


def evaluation_config(cfg: SpinConfig) -> SpinConfig:
    """`cfg` as a held-out evaluation generates: greedy, `eval.max_new_tokens` new tokens."""
    generation = cfg.generation.model_copy(
        update={
            "do_sample": False,
            "max_new_tokens": cfg.eval.max_new_tokens or cfg.generation.max_new_tokens,
        }
    )
    return cfg.model_copy(update={"generation": generation})


def evaluate_model(
    model,
    tokenizer,
    heldout: pd.DataFrame,
    cfg: SpinConfig,
    *,
    opponent_frame: pd.DataFrame | None = None,
    beta: float | None = None,
    group_of: Callable[[str], str] | None = None,
    show_progress: bool = False,
    generated: list[Generated] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Evaluate `model` on `heldout` (id, prompt, real[, context]): generate → score → metrics.

    opponent_frame: the opponent's own evaluation frame (same ids), whose
    `generated_ids`, `real_logps` and `generated_logps` give the held-out pairs
    and the opponent's log-probs; pairs whose y' equals y token for token are
    ties, reported apart (`ties`) and left out of reward accuracy and margin.
    group_of: maps a prompt to a group (e.g. the toy task) for a per-group exact-match
    breakdown.
    generated: the greedy answers to `heldout`'s prompts in order, when the generation
    workers wrote them (`evaluation_config`); else `model` writes them here.
    Returns (per-example frame, metrics dict).
    """
    if opponent_frame is not None and beta is None:
        raise ValueError("beta is needed to compute rewards against the opponent")
    prompt_ids, real_ids = encode_pairs(tokenizer, heldout, cfg.training.max_prompt_length)
    if generated is None:
        generated = generate_heldout(model, tokenizer, prompt_ids, cfg)
    frame = heldout_frame(heldout, generated)
    opponent = None
    if opponent_frame is not None:  # its rows in `frame`'s order
        opponent = opponent_frame.set_index("id").loc[frame["id"]].reset_index()
    opponent_logps = score_heldout(
        model, tokenizer, frame, prompt_ids, real_ids, cfg, opponent, show_progress
    )
    return frame, heldout_metrics(frame, opponent, opponent_logps, beta, group_of)


def generate_heldout(model, tokenizer, prompt_ids: list[list[int]], cfg: SpinConfig):
    """The model's greedy answers to the held-out prompts (`evaluation_config`), in order."""
    generation = evaluation_config(cfg).generation
    backend = HFBackend(
        model,
        tokenizer,
        Decoding.from_config(generation, tokenizer),
        batch_tokens=generation.batch_tokens,
        max_batch_size=generation.max_batch_size,
    )
    return backend.generate(prompt_ids)


def heldout_frame(heldout: pd.DataFrame, generated: list[Generated]) -> pd.DataFrame:
    """One row per held-out example with its answer, the answer's ids and exact match."""
    columns = [c for c in ("id", "prompt", "context", "real") if c in heldout]
    frame = heldout[columns].reset_index(drop=True).copy()
    frame["generated"] = [g.text for g in generated]
    frame["generated_ids"] = [np.asarray(g.token_ids, dtype=np.int32) for g in generated]
    frame["finish_reason"] = [g.finish_reason for g in generated]
    frame["exact_match"] = frame["generated"].str.strip() == frame["real"].str.strip()
    return frame


def score_heldout(
    model,
    tokenizer,
    frame: pd.DataFrame,
    prompt_ids: list[list[int]],
    real_ids: list[list[int]],
    cfg: SpinConfig,
    opponent: pd.DataFrame | None = None,
    show_progress: bool = False,
):
    """The model's log-probs of the real answers and of its own, added to `frame`
    (real_logps, real_tokens, generated_logps); with the opponent's evaluation rows (in
    `frame`'s order), also the pairs against the opponent's answers (opponent_generated,
    tie), whose log-probs it returns."""
    training = cfg.training
    limits = {"max_length": training.max_length, "max_prompt_length": training.max_prompt_length}
    examples = {
        "real": examples_from_ids(prompt_ids, real_ids, **limits),
        "generated": examples_from_ids(
            prompt_ids, [ids.tolist() for ids in frame["generated_ids"]], **limits
        ),
    }
    if opponent is not None:
        opponent_ids = [list(ids) for ids in opponent["generated_ids"]]
        frame["opponent_generated"] = opponent["generated"].to_numpy()
        # y' = y token for token: the margin is 0 whatever the model, so it is a tie.
        frame["tie"] = [g == r for g, r in zip(opponent_ids, real_ids, strict=True)]
        examples["opponent_generated"] = examples_from_ids(prompt_ids, opponent_ids, **limits)
    logps, counts = score_named(
        model,
        examples,
        tokenizer.pad_token_id,
        batch_tokens=training.score_batch_tokens,
        chunk_size=training.logprob_chunk_size,
        show_progress=show_progress,
    )
    frame["real_logps"] = logps["real"]
    frame["real_tokens"] = counts["real"]
    frame["generated_logps"] = logps["generated"]
    return logps.get("opponent_generated")


def heldout_metrics(
    frame: pd.DataFrame,
    opponent: pd.DataFrame | None = None,
    opponent_generated_logps=None,
    beta: float | None = None,
    group_of: Callable[[str], str] | None = None,
) -> dict:
    """Exact match, the real answers' per-token log-likelihood and, against the opponent's
    evaluation rows (in `frame`'s order), the reward metrics (adding each pair's `margin`
    to `frame`)."""
    metrics: dict = {
        "eval_pairs": len(frame),
        "exact_match": float(frame["exact_match"].mean()),
        "real_loglik_per_token": float(
            frame["real_logps"].sum() / max(frame["real_tokens"].sum(), 1)
        ),
    }
    if group_of is not None:
        groups = frame["prompt"].map(group_of)
        metrics["exact_match_by_group"] = {
            str(k): float(v) for k, v in frame["exact_match"].groupby(groups).mean().items()
        }
    if opponent is not None:
        metrics |= _reward_metrics(frame, opponent, opponent_generated_logps, beta)
    return metrics


def _reward_metrics(frame: pd.DataFrame, opponent: pd.DataFrame, opponent_generated_logps, beta):
    """The implicit rewards against the opponent on the held-out pairs (y, the opponent's
    y'); adds each pair's `margin` to `frame`."""
    real_reward = beta * (frame["real_logps"].to_numpy() - opponent["real_logps"].to_numpy())
    generated_reward = beta * (opponent_generated_logps - opponent["generated_logps"].to_numpy())
    frame["margin"] = real_reward - generated_reward
    sums = reward_sums(real_reward, generated_reward, frame["tie"].to_numpy(dtype=bool))
    return reward_metrics(sums) | {
        "opponent_real_loglik_per_token": float(
            opponent["real_logps"].sum() / max(frame["real_tokens"].sum(), 1)
        ),
    }
