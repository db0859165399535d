"""The real-tokenizer fixture is what it claims: Mistral-7B's tokenizer as zephyr uses it."""

from __future__ import annotations

import unicodedata

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from tests import realtok

HI_PROMPT = "<|user|>\nHi</s>\n<|assistant|>\n"


def _find(haystack: list[int], needle: tuple[int, ...]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if tuple(haystack[start : start + len(needle)]) == needle:
            return start
    raise AssertionError(f"{needle} not in {haystack}")


def test_encodes_like_mistral(mistral_build):
    tok = mistral_build.tokenizer
    assert tok("Hello").input_ids == [1, 22557]  # BOS added, no EOS
    ids = tok("Leaves fall").input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁Le", "aves", "▁fall"]
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2
    assert len(tok) == realtok.VOCAB_SIZE
    # Byte fallback: a newline is <0x0A>, an emoji is its UTF-8 bytes, and both round-trip.
    text = "café\n🙂 done"
    assert "<0x0A>" in tok.tokenize(text)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_has_no_pad_token(mistral_build):
    tok = mistral_build.tokenizer
    assert tok.pad_token is None and tok.pad_token_id is None
    generation = GenerationConfig.from_pretrained(mistral_build.model_dir)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 2)


def test_chat_template_is_zephyrs(mistral_build):
    tok = mistral_build.tokenizer
    assert tok.chat_template == realtok.ZEPHYR_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == HI_PROMPT
    # '<|user|>' and '<|assistant|>' are not special tokens: they are split into pieces.
    assert tok.convert_tokens_to_ids("<|assistant|>") == tok.unk_token_id
    assert tok.tokenize("<|user|>") == ["▁<", "|", "user", "|", ">"]


def test_assistant_turn_tokenizes_differently_in_context(mistral_build):
    tok = mistral_build.tokenizer
    assert tok.convert_ids_to_tokens(tok("Leaves fall", add_special_tokens=False).input_ids)[0] == (
        "▁Le"
    )
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Leaves fall"}]
    ids = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids
    # After '</s>' the legacy tokenizer starts the next chunk with '▁', then '\n' ...
    eos_at = ids.index(tok.eos_token_id)
    assert tuple(ids[eos_at + 1 : eos_at + 3]) == realtok.AFTER_EOS_IDS
    # ... and '<|assistant|>\n' there begins with '<', not the '▁<' it gets when encoded alone.
    at = _find(ids, realtok.ASSISTANT_PREFIX_IDS_IN_CONTEXT)
    assert at == eos_at + 3
    alone = tok("<|assistant|>\n", add_special_tokens=False).input_ids
    assert (
        tuple(alone)
        == realtok.ASSISTANT_PREFIX_IDS_ALONE
        != realtok.ASSISTANT_PREFIX_IDS_IN_CONTEXT
    )
    after = tok.convert_ids_to_tokens(ids[at + len(realtok.ASSISTANT_PREFIX_IDS_IN_CONTEXT) :])
    assert after[:3] == ["Le", "aves", "▁fall"]  # no '▁' after the newline
    assert ids[-3:] == [tok.eos_token_id, *realtok.AFTER_EOS_IDS]


def test_model_loads_with_real_vocabulary(mistral_build):
    model = AutoModelForCausalLM.from_pretrained(mistral_build.model_dir).eval()
    cfg = model.config
    assert cfg.model_type == "mistral" and cfg.vocab_size == realtok.VOCAB_SIZE
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.attention_dropout == 0.0 and cfg.sliding_window == 64
    assert next(model.parameters()).dtype == torch.float32
    assert (mistral_build.model_dir / "model.safetensors").is_file()
    size = sum(p.stat().st_size for p in mistral_build.model_dir.iterdir())
    assert size < 16 * 2**20
    ids = mistral_build.tokenizer(["Leaves fall", "Hello"], padding=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids[0]])).logits
    assert logits.shape == (1, len(ids[0]), realtok.VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def _responses(frame: pd.DataFrame) -> list[str]:
    return [m["content"] for chat in frame["messages"] for m in chat if m["role"] == "assistant"]


def _user_turns(frame: pd.DataFrame) -> set[str]:
    return {m["content"] for chat in frame["messages"] for m in chat if m["role"] == "user"}


def test_datasets_are_ultrachat_shaped(mistral_build):
    train = pd.read_parquet(mistral_build.dataset)
    held_out = pd.read_parquet(mistral_build.eval_dataset)
    assert list(train.columns) == list(held_out.columns) == ["messages"]
    assert (len(train), len(held_out)) == (realtok.NUM_TRAIN, realtok.NUM_EVAL)
    turns = set()
    for chat in [*train["messages"], *held_out["messages"]]:
        roles = [m["role"] for m in chat]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        turns.add(len(roles) // 2)
    assert turns == {1, 2}
    assert not _user_turns(train) & _user_turns(held_out)
    responses = _responses(train)
    firsts = {r[0] for r in responses}
    assert any(c.isalpha() for c in firsts)
    assert {" ", "\n"} <= firsts
    assert any(c.isdigit() for c in firsts)
    assert any(unicodedata.category(c).startswith("P") for c in firsts)
    assert any("café" in r for r in responses)
    assert any(any(ord(c) > 0xFFFF for c in r) for r in responses)  # emoji
    again = realtok.make_chats(realtok.NUM_TRAIN + realtok.NUM_EVAL, seed=0)["messages"]
    assert [[dict(m) for m in chat] for chat in train["messages"]] == list(again[: len(train)])


def test_config_overrides_point_at_the_build(mistral_build):
    from spin_core.config import load_config

    cfg = load_config("configs/demo.yaml", mistral_build.config_overrides())
    assert cfg.model.name_or_path == str(mistral_build.model_dir)
    assert cfg.data.dataset == str(mistral_build.dataset)
    assert cfg.data.eval_dataset == str(mistral_build.eval_dataset)


def test_every_chat_splits_at_the_prompt(mistral_build):
    """The pipeline's prompt/response split holds for every chat of the build."""
    from spin_core.prompts import encode_conversations

    tok = mistral_build.tokenizer
    frame = pd.read_parquet(mistral_build.dataset)
    conversations = [list(chat[:-1]) for chat in frame["messages"]]
    responses = [chat[-1]["content"] for chat in frame["messages"]]
    prompts, answers = encode_conversations(tok, conversations, responses)
    for prompt_ids, answer_ids, response in zip(prompts, answers, responses, strict=True):
        assert prompt_ids[0] == tok.bos_token_id and prompt_ids.count(tok.bos_token_id) == 1
        assert tuple(prompt_ids[-7:]) == realtok.ASSISTANT_PREFIX_IDS_IN_CONTEXT
        assert answer_ids[-1] == tok.eos_token_id
        decoded = tok.decode(answer_ids, skip_special_tokens=True)
        # The decoder strips one leading space (its '▁' stands for the dummy prefix), so a
        # response that starts with a space does not come back from its ids alone.
        assert decoded == (response[1:] if response.startswith(" ") else response)


@pytest.mark.parametrize("seed", [0, 1])
def test_chats_are_deterministic(seed):
    assert realtok.make_chats(16, seed).equals(realtok.make_chats(16, seed))
    assert not realtok.make_chats(16, seed).equals(realtok.make_chats(16, seed + 7))
