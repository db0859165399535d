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
