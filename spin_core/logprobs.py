"""Summed response log-probabilities under teacher forcing.

log p(y|x) is the sum over response tokens of log softmax(logits)[label], from one
forward pass over prompt + response. The vocabulary projection is applied only
at positions that carry a label, in chunks, so a (batch, seq, vocab) float32
tensor is never built; under autograd each chunk is recomputed in backward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from spin_core.errors import InputError
from spin_core.prompts import IGNORE_INDEX


def pad_batch(
    input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a batch to its own longest sequence: (input_ids, attention_mask, labels)."""
    longest = max(len(ids) for ids in input_ids)
    batch = len(input_ids)
    ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    targets = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(input_ids, labels, strict=True)):
        span = slice(0, len(seq)) if side == "right" else slice(longest - len(seq), longest)
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
        targets[row, span] = torch.tensor(lab, dtype=torch.long)
    return ids, mask, targets


def _split_model(model):
    """(backbone, lm_head) when the logits are a plain linear map of the hidden states."""
    config = getattr(model, "config", None)
    # Architectures whose logits are not head(hidden): soft-capping (Gemma 2), a logit scale
    # (Cohere), Granite's divisor. Anything else is caught by `check_logprob_path`.
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = get_decoder() if get_decoder is not None else None
    if backbone is None or head is None or backbone is model:
        return None
    return backbone, head


def _token_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each row, and their count.

    input_ids, attention_mask, labels: (batch, seq); labels are -100 where no token
    is scored (prompt, padding). Left or right padding both work: positions are
    taken from the attention mask. Returns (logps (batch,), token_counts (batch,)).
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, seq)
    targets = labels[:, 1:]  # token t+1 is predicted at position t
    valid = targets != IGNORE_INDEX  # (batch, seq-1)
    rows = valid.nonzero(as_tuple=True)[0]  # (n_valid,)
    split = _split_model(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (batch, seq, hidden)
        hidden = hidden[:, :-1][valid]  # (n_valid, hidden)
    else:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits  # (batch, seq, vocab)
        hidden = logits[:, :-1][valid]  # (n_valid, vocab)
        head = torch.nn.Identity()
    flat_targets = targets[valid]  # (n_valid,)
    pieces = []
    for start in range(0, flat_targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], flat_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            pieces.append(_token_logps(head, h, t))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    batch = input_ids.shape[0]
    logps = torch.zeros(batch, dtype=torch.float32, device=input_ids.device)
    logps = logps.index_add(0, rows, token_logps)
    counts = valid.sum(-1)
    return logps, counts


@torch.no_grad()
def check_logprob_path(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    logps: torch.Tensor,
    rows: int = 2,
) -> None:
    """Refuse a model whose chunked log-probs differ from a plain full-logits forward.

    `sequence_logps` calls the backbone and the LM head separately; an
    architecture that transforms logits in its own forward (a scale, a cap, a
    bias added outside the head) would otherwise get silently wrong log-probs.
    `logps`: what `sequence_logps` gave for this batch. Only its first `rows` rows
    are checked: the full-logits forward is the (batch, seq, vocab) tensor the
    fast path exists to avoid. Tolerance: 1e-3 relative in fp32, 2e-2 in 16-bit.
    """
    input_ids, attention_mask = input_ids[:rows], attention_mask[:rows]
    labels, logps = labels[:rows], logps[:rows]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        .logits[:, :-1]
        .float()
    )  # (batch, seq-1, vocab)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    reference = (token * valid).sum(-1)  # (batch,)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 2e-2
    error = (logps.float() - reference).abs().max().item()
    if error > tolerance * max(1.0, reference.abs().max().item()):
        config = getattr(model, "config", None)
        architecture = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
        raise InputError(
            f"model.name_or_path: the fast log-prob path disagrees with the model's own forward "
            f"for {architecture} (max difference {error:.3g} nats): its logits are not a plain "
            "linear map of the hidden states; this architecture is not supported yet"
        )
