"""Summed response log-probabilities under teacher forcing.

log p(y|x) is the sum over response tokens of log softmax(logits)[label], from one
forward pass over prompt + response. The vocabulary projection is applied only
at positions that carry a label, in float32 (hidden states and head weight
upcast before the matmul), `chunk_size` positions at a time, so an
(n_labelled, vocab) float32 tensor is never built; backward recomputes each
chunk's logits. The LM head module is called exactly once per forward whatever
the number of chunks: under ZeRO-3 each call is an all-gather of its weight (and
its backward a gradient reduce), so every rank must issue the same number of
them however long its sequences are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()  # (chunk, vocab)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _logits_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Token log-probs (n,) from logits already computed (n, vocab): the fp32 log-softmax
    is taken `chunk` rows at a time, each recomputed in backward, so no fp32 copy of
    all of them is kept."""
    pieces = []
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled() and logits.requires_grad:
            pieces.append(
                checkpoint(_token_logps, logits[part], targets[part], use_reentrant=False)
            )
        else:
            pieces.append(_token_logps(logits[part], targets[part]))
    return torch.cat(pieces) if pieces else logits.new_zeros(0, dtype=torch.float32)


class _HeadTokenLogps(torch.autograd.Function):
    """log softmax(h·Wᵀ + b)[target] per position, in fp32, `chunk` positions at a time.

    Forward keeps only each position's logsumexp; backward recomputes one chunk of
    logits at a time. So a (positions, vocab) float32 tensor is never built, the
    weight is upcast once per pass, and W's gradient is summed over the chunks in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # (n, hidden), (vocab, hidden)
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        token = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(token)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = F.linear(hidden[part].float(), weight32, bias32)  # (chunk, vocab)
            lse[part] = logits.logsumexp(-1)
            token[part] = logits.gather(-1, targets[part, None]).squeeze(-1) - lse[part]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return token

    @staticmethod
    def backward(ctx, grad_token):  # (n,)
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight32) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias32) if bias is not None and ctx.needs_input_grad[2] else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            h = hidden[part].float()
            # d token / d logits = onehot(target) − softmax(logits), all in place
            grad_logits = F.linear(h, weight32, bias32)  # (chunk, vocab)
            grad_logits.sub_(lse[part, None]).exp_().neg_()
            grad_logits.scatter_add_(-1, targets[part, None], torch.ones_like(lse[part, None]))
            grad_logits.mul_(grad_token[part, None].float())
            if grad_hidden is not None:
                grad_hidden[part] = (grad_logits @ weight32).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _head_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Token log-probs (n,) of the labelled positions through the LM head, one head call.

    A plain nn.Linear head runs `_HeadTokenLogps` inside its own call, so the hooks
    DeepSpeed ZeRO-3 puts on the head module gather its weight once for this forward
    (and once for backward) however many chunks there are. Any other head (an
    adapter on it, a quantized layer) is called once on all positions and only the
    float32 log-softmax is chunked: its (n, vocab) logits exist at once in its dtype.
    """
    if type(head) is not torch.nn.Linear:
        return _logits_logps(head(hidden), targets, chunk)  # (n, vocab) logits, one call

    def fused(h: torch.Tensor) -> torch.Tensor:
        return _HeadTokenLogps.apply(h, head.weight, head.bias, targets, chunk)

    own_forward = head.__dict__.get("forward")  # e.g. an accelerate hook's
    head.forward = fused
    try:
        return head(hidden)
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward


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
    flat_targets = targets[valid]  # (n_valid,)
    split = _split_model(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (batch, seq, hidden)
        token_logps = _head_logps(head, hidden[:, :-1][valid], flat_targets, chunk_size)
    else:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits[:, :-1][valid]  # (n_valid, vocab)
        token_logps = _logits_logps(logits, flat_targets, chunk_size)
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
    fast path exists to avoid. Tolerance: 1e-3 relative in fp32; in 16-bit 2e-2 relative
    plus the rounding of the model's own 16-bit logits (2^-8 of the largest, twice, per token).
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
    errors = (logps.float() - reference).abs()  # (batch,)
    allowed = 1e-3 * reference.abs().clamp(min=1.0)
    if next(model.parameters()).dtype != torch.float32:
        # The model's own 16-bit logits are rounded to 2^-8 of their size, the fast path's
        # fp32 head is not: up to about that much per token and logit, on top of 2e-2.
        largest = (logits.abs().amax(-1) * valid).amax(-1)  # (batch,)
        allowed = 2e-2 * reference.abs().clamp(min=1.0) + 2 * 2**-8 * largest * valid.sum(-1)
    error = errors.max().item()
    if (errors > allowed).any():
        config = getattr(model, "config", None)
        architecture = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
        raise InputError(
            f"model.name_or_path: the fast log-prob path disagrees with the model's own forward "
            f"for {architecture} (max difference {error:.3g} nats): its logits are not a plain "
            "linear map of the hidden states; this architecture is not supported yet"
        )
