"""The SPIN objective as a pure function on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    opponent_real_logps: torch.Tensor,
    opponent_generated_logps: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPIN loss (Chen et al., 2024, eq. 4.7 with ℓ the logistic loss, λ = 1/β).

    All inputs have shape (batch,) and hold **summed** response log-probabilities.

        real_reward      = β · (log pθ(y|x)  − log pθt(y|x))
        generated_reward = β · (log pθ(y'|x) − log pθt(y'|x))
        loss             = mean( −log σ(real_reward − generated_reward) )

    Returns (loss, real_reward, generated_reward); the rewards are detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    real_reward = beta * (policy_real_logps - opponent_real_logps)  # (batch,)
    generated_reward = beta * (policy_generated_logps - opponent_generated_logps)  # (batch,)
    loss = -F.logsigmoid(real_reward - generated_reward).mean()
    return loss, real_reward.detach(), generated_reward.detach()


def sft_loss(policy_real_logps: torch.Tensor, real_token_counts: torch.Tensor) -> torch.Tensor:
    """Token-averaged negative log-likelihood of the real responses (continued SFT)."""
    return -policy_real_logps.sum() / real_token_counts.sum().clamp(min=1)


def spin_sft_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    opponent_real_logps: torch.Tensor,
    opponent_generated_logps: torch.Tensor,
    real_token_counts: torch.Tensor,
    *,
    beta: float,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SFT-anchored SPIN: the SPIN loss plus α · the real responses' per-token NLL.

        loss = spin_loss + α · ( −Σ log pθ(y|x) / Σ |y| )      (α = sft_weight ≥ 0)

    The anchor keeps the real responses' likelihood up while the margin grows (as in
    RPO, Pang et al. 2024, and TRL's `loss_type=["sigmoid", "sft"]`); α = 0 is the
    paper's loss, bit for bit. Returns (loss, nll, real_reward, generated_reward);
    nll and the rewards are detached.
    """
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    loss, real_reward, generated_reward = spin_loss(
        policy_real_logps,
        policy_generated_logps,
        opponent_real_logps,
        opponent_generated_logps,
        beta=beta,
    )
    nll = sft_loss(policy_real_logps, real_token_counts)
    if sft_weight:
        loss = loss + sft_weight * nll
    return loss, nll.detach(), real_reward, generated_reward


def reward_sums(real_reward, generated_reward, tie) -> dict[str, float]:
    """What `reward_metrics` needs of a batch of pairs, as sums that add up across batches
    and ranks: per-pair implicit rewards and tie mask (tensors or NumPy arrays) in, floats out.
    A tie (y' = y token for token) has a margin of 0 by construction: it is neither won nor
    lost, so the margin and the accuracy are summed over the pairs that differ."""
    margin = real_reward - generated_reward
    differ = ~tie
    return {
        "real_reward": float(real_reward.sum()),
        "generated_reward": float(generated_reward.sum()),
        "margin": float(margin[differ].sum()),
        "correct": float((margin[differ] > 0).sum()),
        "differing": float(differ.sum()),
        "pairs": float(len(real_reward)),
    }


def reward_metrics(sums: dict[str, float]) -> dict[str, float | None]:
    """The reward metrics of pairs from their `reward_sums`: the mean rewards over all pairs;
    the margin and the reward accuracy over the pairs that differ (counting ties as failures
    would understate the accuracy; None when every pair is a tie); ties, their share."""
    pairs, differing = sums["pairs"], sums["differing"]
    return {
        "real_reward": sums["real_reward"] / pairs,
        "generated_reward": sums["generated_reward"] / pairs,
        "margin": sums["margin"] / differing if differing else 0.0,
        "reward_accuracy": sums["correct"] / differing if differing else None,
        "ties": (pairs - differing) / pairs,
    }
