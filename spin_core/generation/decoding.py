"""What generation produces, independent of the engine: decoding settings, responses, batching.

`spin_core.generation` (Hugging Face) and `spin_core.generation.vllm` implement
`GenerationBackend` over these; scoring and evaluation share `token_budget_batches`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from spin_core.config import GenerationConfig
from spin_core.prompts import template_name


@dataclass(frozen=True)
class Decoding:
    """Decoding settings, recorded with every generated row."""

    do_sample: bool
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    template: str

    @classmethod
    def from_config(cls, cfg: GenerationConfig, tokenizer, max_new_tokens: int | None = None):
        return cls(
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=max_new_tokens or cfg.max_new_tokens,
            seed=cfg.seed,
            template=template_name(tokenizer),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Generated:
    text: str  # decoded for display; never re-encoded
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    token_ids: list[int]  # as generated; EOS last only when finish_reason is "stop"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_ids(cls, new_ids: Sequence[int], tokenizer, stop_ids=None) -> Generated:
        """A response from the new ids of one row: cut after the first stop token (EOS, or
        any of `stop_ids`), if any, which it keeps as the model produced it."""
        stops = set(stop_ids or ()) | {tokenizer.eos_token_id}
        new_ids = list(new_ids)
        first = next((i for i, token in enumerate(new_ids) if token in stops), None)
        if first is not None:
            new_ids, reason = new_ids[: first + 1], "stop"
        else:
            reason = "length"
        text_ids = new_ids[:-1] if reason == "stop" else new_ids
        text = tokenizer.decode(text_ids, skip_special_tokens=True)
        return cls(text=text, finish_reason=reason, token_ids=new_ids)


def stop_token_ids(model_config, tokenizer) -> tuple[int, ...]:
    """The tokens generation stops at: the tokenizer's EOS and every EOS id of the model's
    `generation_config.json` (Llama-3 instruct models end a turn with `<|eot_id|>`, which
    is not the tokenizer's EOS), as `generate` and vLLM stop."""
    listed = getattr(model_config, "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return tuple(dict.fromkeys([tokenizer.eos_token_id, *listed]))


class GenerationBackend(Protocol):
    """Maps prompt token ids to responses; must keep the order of its input."""

    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        progress: Callable[[int], None] | None = None,
        first_row: int = 0,
    ) -> list[Generated]:
        """Responses in input order; `first_row` is the run-wide index of the first prompt
        (a backend that seeds each request uses it so that no two prompts share a seed)."""


def token_budget_batches(
    lengths: Sequence[int], budget: int, max_batch_size: int, extra: int = 0
) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size fits `budget`.

    A batch's cost is rows × (its longest length + `extra`); one row always fits.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[index] + extra  # sorted ascending: the newest row is the longest
        if current and ((len(current) + 1) * longest > budget or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
