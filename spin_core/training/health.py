"""The in-training health check (docs/DESIGN.md §5 "Health"): every `training.eval_steps`
optimizer steps the policy scores held-out real responses, and a fall of their per-token
log-likelihood below the opponent's by more than `run.collapse_tolerance` is warned about
and recorded in the step's record (`healthy: false`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch.distributed as dist

from spin_core.config import SpinConfig
from spin_core.evaluate import collapsed
from spin_core.score import Examples, tokenize_responses

logger = logging.getLogger(__name__)


@dataclass
class HealthProbe:
    """The in-training health check (docs/DESIGN.md §5 "Health") on a held-out slice.

    Every `every` optimizer steps the policy scores the real responses of
    `examples`; when their mean per-token log-likelihood falls more than
    `tolerance` below the opponent's (`opponent_loglik`), a warning is logged and
    the step's record says `healthy: false`. Reward accuracy is never used here.
    """

    examples: Examples
    opponent_loglik: float  # nats/token of the real responses under θt
    tolerance: float
    every: int
    batch_tokens: int = 16_384


def health_probe(cfg: SpinConfig, opponent: str, opponent_eval_file: str | Path) -> HealthProbe:
    """The first `eval.health_size` held-out pairs of θt's evaluation, with θt's log-likelihood."""
    from spin_core.storage.models import load_tokenizer

    scored = pd.read_parquet(opponent_eval_file).head(cfg.eval.health_size)
    tokenizer = load_tokenizer(opponent, trust_remote_code=cfg.model.trust_remote_code)
    examples = tokenize_responses(
        tokenizer,
        scored["prompt"].tolist(),
        scored["real"].tolist(),
        max_length=cfg.training.max_length,
        max_prompt_length=cfg.training.max_prompt_length,
        contexts=scored["context"].tolist() if "context" in scored else None,
    )
    return HealthProbe(
        examples=examples,
        opponent_loglik=float(scored["real_logps"].sum() / max(scored["real_tokens"].sum(), 1)),
        tolerance=cfg.run.collapse_tolerance,
        every=cfg.training.eval_steps,
        batch_tokens=cfg.training.score_batch_tokens,
    )


def check_health(engine, health: HealthProbe, pad_id: int, chunk: int, step: int) -> dict:
    """Held-out real log-likelihood per token now, and whether it is within tolerance."""
    from spin_core.score import score_examples

    policy = engine.module.policy
    policy.eval()
    logps, counts = score_examples(
        policy,
        health.examples,
        pad_id,
        batch_tokens=health.batch_tokens,
        chunk_size=chunk,
        check=False,
        world_size=dist.get_world_size(),
        forward=engine,  # not the module: ZeRO-3 keeps its trace (score_examples)
    )
    policy.train()
    loglik = float(logps.sum() / max(counts.sum(), 1))
    healthy = not collapsed(loglik, health.opponent_loglik, health.tolerance)
    if not healthy:
        logger.warning(
            "step %d: held-out real log-likelihood %.4f nats/token is %.4f below the opponent's "
            "%.4f (collapse_tolerance %.2f): training may be collapsing",
            step,
            loglik,
            health.opponent_loglik - loglik,
            health.opponent_loglik,
            health.tolerance,
        )
    return {"heldout_real_loglik": loglik, "healthy": healthy}
