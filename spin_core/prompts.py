"""Prompt formatting and tokenization, shared by generation and training.

SPIN compares log p(y|x) of the real and the generated response, so the prompt x
must be the very same token sequence when the opponent writes y' and when the
policy is trained on it. Both paths call `encode_prompt`; responses are encoded
separately and appended, exactly as generation continues from the prompt ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

PLAIN_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "
IGNORE_INDEX = -100

logger = logging.getLogger(__name__)


def template_name(tokenizer) -> str:
    """'chat' when the tokenizer's chat template is used, else 'plain'."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as text, ready for the response to follow."""
    if template_name(tokenizer) == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the formatted prompt (the one encoding used everywhere)."""
    text = format_prompt(tokenizer, prompt)
    # A chat template writes its own BOS; the plain template relies on the tokenizer's.
    add_special = template_name(tokenizer) == "plain"
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def encode_response(tokenizer, response: str) -> list[int]:
    """Response ids followed by EOS, as generation ends a response."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [
        tokenizer.eos_token_id
    ]


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token pad = eos, with a warning (SPEC §2)."""
    if tokenizer.pad_token_id is None:
        logger.warning("tokenizer has no pad token; using eos (%r) as pad", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class Truncation:
    """Counts of what `build_example` had to cut."""

    prompts: int = 0
    responses: int = 0

    def add(self, other: Truncation) -> None:
        self.prompts += other.prompts
        self.responses += other.responses


def truncate_prompt(prompt_ids: list[int], max_prompt_length: int) -> tuple[list[int], bool]:
    """Keep the last `max_prompt_length` prompt tokens (the end holds the question)."""
    if len(prompt_ids) <= max_prompt_length:
        return prompt_ids, False
    return prompt_ids[-max_prompt_length:], True


def build_example(
    prompt_ids: list[int], response_ids: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], Truncation]:
    """input_ids and labels of prompt + response; labels are -100 on the prompt.

    The prompt is left-truncated to `max_prompt_length`, then the response cut to
    fit `max_length`.
    """
    prompt_ids, prompt_cut = truncate_prompt(prompt_ids, max_prompt_length)
    room = max_length - len(prompt_ids)
    response_cut = len(response_ids) > room
    response_ids = response_ids[:room]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return input_ids, labels, Truncation(int(prompt_cut), int(response_cut))


def drop_overlong_prompts(frame, tokenizer, max_prompt_length: int):
    """Rows of `frame` whose encoded prompt fits `max_prompt_length`, and how many were dropped."""
    fits = [len(encode_prompt(tokenizer, p)) <= max_prompt_length for p in frame["prompt"]]
    kept = frame[fits]
    return kept, len(frame) - len(kept)
