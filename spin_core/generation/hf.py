"""The Hugging Face backend: batched `generate` (sampling) or a cached greedy decoder.

Prompts arrive as token ids, are batched by a token budget
(`spin_core.generation.decoding.token_budget_batches`) and left-padded; each
response keeps the exact ids the model produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig as HFGenerationConfig

from spin_core.generation.decoding import Decoding, Generated, token_budget_batches


class HFBackend:
    """Batched `model.generate` with left padding; stops each row at EOS."""

    def __init__(
        self, model, tokenizer, decoding: Decoding, *, batch_tokens: int, max_batch_size: int
    ):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.batch_tokens, self.max_batch_size = batch_tokens, max_batch_size
        self.hf_config = HFGenerationConfig(
            do_sample=decoding.do_sample,
            temperature=decoding.temperature if decoding.do_sample else None,
            top_p=decoding.top_p if decoding.do_sample else None,
            top_k=None,
            max_new_tokens=decoding.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )

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
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        # Sampling draws from torch's global generator, seeded per shard by generate_shards.
        for batch in batches:
            rows = [prompt_ids[i] for i in batch]
            longest = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for j, row in enumerate(rows):  # left padding: generation continues at the right edge
                input_ids[j, longest - len(row) :] = torch.tensor(row)
                attention_mask[j, longest - len(row) :] = 1
            if self.decoding.do_sample:
                output = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=self.hf_config,
                )  # (batch, longest + new)
                new_ids = [row.tolist() for row in output[:, longest:]]
            else:
                new_ids = greedy_decode(
                    self.model,
                    input_ids.to(device),
                    attention_mask.to(device),
                    max_new_tokens=self.decoding.max_new_tokens,
                    eos_token_id=eos,
                )
            for j, index in enumerate(batch):
                results[index] = Generated.from_ids(new_ids[j], self.tokenizer)
            if progress is not None:
                progress(len(batch))
        return results


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
) -> list[list[int]]:
    """New token ids of each left-padded row, greedily; a row leaves the batch at its EOS.

    The same tokens as `model.generate(do_sample=False)`, but `generate` keeps computing
    every row until the batch's longest one ends, and on the toy task one row that
    never stops makes 255 finished ones run 32 steps. Here the KV cache and the batch
    shrink as rows finish, so decoding costs the tokens actually generated.
    """
    from transformers import DynamicCache

    new_tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = torch.arange(input_ids.shape[0])  # (active,) row of each live sequence
    cache = DynamicCache(config=model.config)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (batch, seq)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]  # (active, vocab)
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)  # (active,)
        for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
            new_tokens[row].append(token)
        running = tokens != eos_token_id  # (active,)
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
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
    return new_tokens
