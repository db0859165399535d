"""A naive reference for stored log-probs: one plain forward, full logits, log-softmax."""

from __future__ import annotations

import torch


@torch.no_grad()
def teacher_forced_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log p(response | prompt) summed over the response's tokens, the textbook way."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (response, vocab)
    targets = torch.tensor(list(response_ids))[:, None]
    return logits.log_softmax(-1).gather(-1, targets).sum().item()
