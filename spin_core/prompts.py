"""One tokenization of a conversation, the SFT trainer's own, for every step.

SPIN compares log p(y|x) of the real and the generated response, so every token
sequence must be the one the model itself saw or produced:

- the prompt x is the chat template with `add_generation_prompt=True` (or the
  plain template), tokenized in one pass; generation continues from these ids;
- a real response y is tokenized as an SFT trainer tokenizes the chat: the whole
  conversation rendered with the assistant turn and tokenized in one pass; y is
  what follows the prompt's ids, up to and including EOS. With SentencePiece
  tokenizers (Llama, Mistral, zephyr) encoding y on its own would give its first
  word the word-start marker (`▁Le` instead of `Le`) and drop BOS;
- a generated response y' is never re-encoded: generation stores the ids it
  produced (see `spin_core.generation`).

BOS follows the tokenizer (what `add_special_tokens=True` puts before the text)
unless the rendered template already starts with it. `encode_conversation` is
the one function that does this; training, scoring, evaluation and generation
all call it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from spin_core.errors import InputError

PLAIN_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "
IGNORE_INDEX = -100

logger = logging.getLogger(__name__)

Message = dict[str, str]


def template_name(tokenizer) -> str:
    """'chat' when the tokenizer's chat template is used, else 'plain'."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def prompt_messages(prompt: str, context: str | None = None) -> list[Message]:
    """The conversation that a prompt row stands for.

    `context` is the JSON list of {role, content} messages before the final user
    turn (multi-turn data with `data.prompt_turns: all`); without it the prompt is
    one user message.
    """
    earlier = json.loads(context) if context else []
    return [*earlier, {"role": "user", "content": prompt}]


def frame_conversations(frame) -> list[list[Message]]:
    """The prompt conversation of every row of a frame with prompt (and context) columns."""
    contexts = frame["context"] if "context" in frame else [None] * len(frame)
    return [prompt_messages(p, c) for p, c in zip(frame["prompt"], contexts, strict=True)]


def _plain_text(messages: Sequence[Message], response: str | None) -> str:
    """The plain template over a conversation: earlier exchanges are written out in full."""
    text, pending = "", None
    for message in messages:
        if message["role"] == "user":
            pending = message["content"]
        elif message["role"] == "assistant" and pending is not None:
            text += PLAIN_TEMPLATE.format(prompt=pending) + message["content"] + "\n\n"
            pending = None
    text += PLAIN_TEMPLATE.format(prompt=pending or "")
    return text if response is None else text + response


def render(tokenizer, messages: Sequence[Message], response: str | None = None) -> str:
    """The text of the prompt (response None) or of the whole conversation with y."""
    if template_name(tokenizer) == "plain":
        return _plain_text(messages, response)
    if response is None:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
    return tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )


@functools.lru_cache(maxsize=16)
def _special_prefix(tokenizer) -> tuple[int, ...]:
    """Ids the tokenizer puts before any text (BOS via `add_bos_token` or its post-processor)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return tuple(full[:start])
    return ()


TOKENIZE_CHUNK = 2048  # texts per tokenizer call: bounds the encodings held at once


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text in one pass; the tokenizer's BOS first unless the template wrote it."""
    prefix = list(_special_prefix(tokenizer))
    out: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        encoded = tokenizer(
            texts[start : start + TOKENIZE_CHUNK],
            add_special_tokens=False,
            return_attention_mask=False,
        )["input_ids"]
        out += [ids if ids[: len(prefix)] == prefix else prefix + ids for ids in encoded]
    return out


def encode_prompt(tokenizer, prompt: str | Sequence[Message]) -> list[int]:
    """Token ids of the formatted prompt: generation continues from exactly these."""
    messages = prompt_messages(prompt) if isinstance(prompt, str) else prompt
    return _tokenize(tokenizer, [render(tokenizer, messages)])[0]


def encode_conversations(
    tokenizer, conversations: Sequence[Sequence[Message]], responses: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) of each conversation, as the SFT trainer tokenized it.

    The conversation with its assistant turn is tokenized in one pass; the
    response ids are what follows the prompt's ids, cut after the first EOS (a
    template that does not end the assistant turn with EOS gets one appended).
    Raises InputError when the prompt's ids are not a prefix of the whole
    conversation's: the template (or the plain template with this tokenizer)
    merges tokens across the prompt/response boundary, so no split is right.
    """
    prompts = _tokenize(tokenizer, [render(tokenizer, m) for m in conversations])
    fulls = _tokenize(
        tokenizer, [render(tokenizer, m, r) for m, r in zip(conversations, responses, strict=True)]
    )
    eos = tokenizer.eos_token_id
    responses_ids = []
    for prompt_ids, full_ids, messages in zip(prompts, fulls, conversations, strict=True):
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise InputError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: the prompt's tokens are not "
                f"a prefix of the conversation's (template {template_name(tokenizer)!r}, prompt "
                f"{messages[-1]['content'][:40]!r}): its last prompt token merges with the "
                "response; give the tokenizer a chat template whose generation prompt ends on a "
                "token boundary"
            )
        response = full_ids[len(prompt_ids) :]
        response = response[: response.index(eos) + 1] if eos in response else [*response, eos]
        responses_ids.append(response)
    return prompts, responses_ids


def encode_conversation(
    tokenizer, messages: Sequence[Message], response: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids ending with EOS) of one conversation; see `encode_conversations`."""
    prompts, responses = encode_conversations(tokenizer, [messages], [response])
    return prompts[0], responses[0]


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token pad = eos, with a warning."""
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
    prompt_ids, prompt_cut = truncate_prompt(list(prompt_ids), max_prompt_length)
    room = max_length - len(prompt_ids)
    response_ids = list(response_ids)
    response_cut = len(response_ids) > room
    response_ids = response_ids[:room]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return input_ids, labels, Truncation(int(prompt_cut), int(response_cut))


def drop_overlong_prompts(frame, tokenizer, max_prompt_length: int):
    """Rows of `frame` whose encoded prompt fits `max_prompt_length`, and how many were dropped."""
    ids = _tokenize(tokenizer, [render(tokenizer, m) for m in frame_conversations(frame)])
    fits = [len(i) <= max_prompt_length for i in ids]
    kept = frame[fits]
    return kept, len(frame) - len(kept)


def encode_pairs(
    tokenizer, frame, max_prompt_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, real ids) of the rows of a (prompt, real[, context]) frame.

    Prompt ids are left-truncated to `max_prompt_length`, as generation and
    training use them; real ids end with EOS and are cut to `max_length` only
    when a training example is built.
    """
    prompt_ids, real_ids = encode_conversations(
        tokenizer, frame_conversations(frame), frame["real"].tolist()
    )
    return [truncate_prompt(p, max_prompt_length)[0] for p in prompt_ids], real_ids


def encode_prompts(
    tokenizer, prompts: Sequence[str | Sequence[Message]], max_prompt_length: int
) -> list[list[int]]:
    """Prompt ids of many prompts, left-truncated to `max_prompt_length` as training uses them."""
    conversations = [prompt_messages(p) if isinstance(p, str) else p for p in prompts]
    ids = _tokenize(tokenizer, [render(tokenizer, m) for m in conversations])
    return [truncate_prompt(i, max_prompt_length)[0] for i in ids]
