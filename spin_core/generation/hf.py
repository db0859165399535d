"""The Hugging Face backend: a cached decoder over a transformers model, greedy or sampled.

Prompts arrive as token ids, are batched by a token budget
(`spin_core.generation.decoding.token_budget_batches`) and left-padded; each
response keeps the exact ids the model produced. Sampling applies transformers'
own temperature and top-p warpers and draws from a `torch.Generator` of the call
(one per shard), never from torch's global generator, so a shard draws the same
whichever worker writes it and whatever ran before it in that process.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from spin_core.generation.decoding import (
    Decoding,
    Generated,
    stop_token_ids,
    token_budget_batches,
)


def shard_generator(seed: int, first_row: int, device: torch.device) -> torch.Generator:
    """The random stream of one shard: seeded from (generation.seed, the shard's first row),
    so a redone shard draws what the lost one drew, whoever runs beside it."""
    state = np.random.SeedSequence([seed, first_row]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def sampling_warpers(decoding: Decoding) -> LogitsProcessorList:
    """transformers' temperature and top-p warpers, as `generate(do_sample=True)` applies them."""
    warpers = LogitsProcessorList()
    if decoding.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(decoding.temperature))
    if decoding.top_p < 1.0:
        warpers.append(TopPLogitsWarper(decoding.top_p))
    return warpers


class HFBackend:
    """Batched cached decoding with left padding; stops each row at EOS."""

    def __init__(
        self, model, tokenizer, decoding: Decoding, *, batch_tokens: int, max_batch_size: int
    ):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.batch_tokens, self.max_batch_size = batch_tokens, max_batch_size
        self.stop_ids = stop_token_ids(getattr(model, "generation_config", None), tokenizer)

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
        pad = self.tokenizer.pad_token_id
        generator, warpers = None, None
        if self.decoding.do_sample:
            generator = shard_generator(self.decoding.seed, first_row, device)
            warpers = sampling_warpers(self.decoding)
        for batch in batches:
            rows = [prompt_ids[i] for i in batch]
            longest = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for j, row in enumerate(rows):  # left padding: generation continues at the right edge
                input_ids[j, longest - len(row) :] = torch.tensor(row)
                attention_mask[j, longest - len(row) :] = 1
            new_ids = decode(
                self.model,
                input_ids.to(device),
                attention_mask.to(device),
                max_new_tokens=self.decoding.max_new_tokens,
                eos_token_id=self.stop_ids,
                warpers=warpers,
                generator=generator,
            )
            for j, index in enumerate(batch):
                results[index] = Generated.from_ids(new_ids[j], self.tokenizer, self.stop_ids)
            if progress is not None:
                progress(len(batch))
        return results


def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
) -> list[list[int]]:
    """`decode` without sampling: the argmax token at every step."""
    return decode(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
    )


def _next_tokens(
    logits: torch.Tensor, warpers: LogitsProcessorList | None, generator: torch.Generator | None
) -> torch.Tensor:
    """(active,) next token of each row: argmax, or a draw from the warped distribution."""
    if generator is None:
        return logits.argmax(-1)
    scores = warpers(None, logits.float()) if warpers else logits.float()  # (active, vocab)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """The name `model_class.forward` gives its KV cache: `cache` in transformers 5.20 and
    later, `past_key_values` before. An unknown keyword is swallowed by `**kwargs`, and
    every step after the prefill would then see only its last token, with no error."""
    parameters = inspect.signature(model_class.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(f"{model_class.__name__}.forward takes neither `cache` nor `past_key_values`")


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    warpers: LogitsProcessorList | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids of each left-padded row; a row leaves the batch at its EOS.

    Greedy without `generator`: the same tokens as `model.generate(do_sample=False)`.
    With one, it samples as `generate(do_sample=True)` does (the `warpers`, then
    `torch.multinomial`), drawing from `generator`. `generate` keeps computing every
    row until the batch's longest one ends, and on the toy task one row that never
    stops makes 255 finished ones run 32 steps. Here the KV cache and the batch
    shrink as rows finish, so decoding costs the tokens actually generated.
    `eos_token_id` may be several ids (a row stops at any of them), as in `generate`.
    """
    from transformers import DynamicCache

    cache_keyword = _cache_keyword(type(model))
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    stops = torch.tensor(eos, device=input_ids.device)
    new_tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = torch.arange(input_ids.shape[0])  # (active,) row of each live sequence
    cache = DynamicCache(config=model.config)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (batch, seq)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{cache_keyword: cache},
    ).logits[:, -1]  # (active, vocab)
    for step in range(max_new_tokens):
        tokens = _next_tokens(logits, warpers, generator)  # (active,)
        for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
            new_tokens[row].append(token)
        running = ~torch.isin(tokens, stops)  # (active,)
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
            use_cache=True,
            **{cache_keyword: cache},
        ).logits[:, -1]
    return new_tokens


def decode_against_generate(device: str = "cpu") -> tuple[list[list[int]], list[list[int]]]:
    """(decode's, `generate`'s) greedy tokens on a tiny random Mistral with left-padded rows,
    on `device`, in fp32: equal on a transformers `decode` supports. A self-check for a new
    environment (tests/spin_core/test_decode_versions.py, benchmarks/gpu_check.py)."""
    from transformers import MistralConfig, MistralForCausalLM

    generator = torch.Generator().manual_seed(0)
    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(device).eval()
    ids = torch.randint(3, 100, (3, 7), generator=generator).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left-padded rows
    mask[2, :5] = 0
    ours = decode(model, ids, mask, max_new_tokens=12, eos_token_id=1)
    with torch.no_grad():
        theirs = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=0,
        )[:, ids.shape[1] :].tolist()
    return ours, [row[: row.index(1) + 1] if 1 in row else row for row in theirs]
