"""The embedded default: correct tasks, a faithful tokenizer, a loadable cached θ0."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_core import toy
from spin_core.prompts import encode_conversation, encode_prompt, prompt_messages

TINY_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def _prompt(messages) -> str:
    return messages[0]["content"]


def _answer(messages) -> str:
    return messages[1]["content"]


def _solve(prompt: str) -> str:
    """The answer, computed independently of spin_core.toy."""
    head, operand = prompt.split(": ", 1)
    if head == "reverse":
        return operand[::-1]
    if head == "sort":
        return "".join(sorted(operand))
    if head == "add":
        left, right = operand.split("+")
        return str(int(left) + int(right))
    if head.startswith("shift by "):
        by = int(head.removeprefix("shift by "))
        return "".join(chr((ord(c) - ord("a") + by) % 26 + ord("a")) for c in operand)
    raise AssertionError(f"unexpected prompt {prompt!r}")


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    return toy.make_pairs(400, seed=3)


@pytest.fixture(scope="module")
def tokenizer(pairs, tmp_path_factory):
    texts = [m["content"] for messages in pairs["messages"] for m in messages]
    return toy.train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"))


def test_every_answer_is_correct_and_all_tasks_appear(pairs):
    for messages, task in zip(pairs["messages"], pairs["task"], strict=True):
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert _answer(messages) == _solve(_prompt(messages))
        assert toy.task_of(_prompt(messages)) == task
    assert pairs["task"].value_counts().to_dict() == {task: 100 for task in toy.TASKS}


def test_known_examples():
    assert _solve("shift by 2: xyz") == "zab"  # the independent solver wraps around too
    assert toy.task_of("shift by 2: abc") == "shift"
    with pytest.raises(ValueError, match="not a toy prompt"):
        toy.task_of("translate: hello")


def test_difficulty_varies(pairs):
    prompts = [_prompt(m) for m in pairs["messages"]]
    words = [p.split(": ", 1)[1] for p in prompts if not p.startswith("add")]
    assert len({len(w) for w in words}) >= 4
    sums = [_answer(m) for m, t in zip(pairs["messages"], pairs["task"], strict=True) if t == "add"]
    assert len({len(s) for s in sums}) >= 2


def test_make_pairs_is_deterministic_by_seed():
    first, again, other = toy.make_pairs(50, 7), toy.make_pairs(50, 7), toy.make_pairs(50, 8)
    assert first["messages"].tolist() == again["messages"].tolist()
    assert first["messages"].tolist() != other["messages"].tolist()


def test_eval_prompts_are_disjoint_from_train(tmp_path):
    train_path, eval_path = toy.write_dataset(tmp_path, num_train=300, num_eval=100, seed=1)
    train, held_out = pd.read_parquet(train_path), pd.read_parquet(eval_path)
    assert (len(train), len(held_out)) == (300, 100)
    assert list(train.columns) == ["messages", "task"]
    train_prompts = {_prompt(m) for m in train["messages"]}
    assert not train_prompts & {_prompt(m) for m in held_out["messages"]}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_tokenizer_round_trips_text_exactly(tokenizer):
    for text in ["reverse: abc", "add: 37+58", "two  spaces\nnew line\ttab", " lead & trail "]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.bos_token_id not in ids


def test_chat_prompt_and_response_tokens(tokenizer):
    prompt_ids = encode_prompt(tokenizer, "sort: cba")
    assert tokenizer.convert_ids_to_tokens(prompt_ids) == [
        "<s>", "<|user|>", *"sort: cba", "<|assistant|>",
    ]  # fmt: skip
    prompt_again, response_ids = encode_conversation(tokenizer, prompt_messages("sort: cba"), "abc")
    assert prompt_again == prompt_ids
    assert tokenizer.convert_ids_to_tokens(response_ids) == [*"abc", "</s>"]
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort: cba"}, {"role": "assistant", "content": "abc"}],
        tokenize=False,
    )
    assert full == "<s><|user|>sort: cba<|assistant|>abc</s>"


def test_tokenizer_reloads_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(reloaded, name) == getattr(tokenizer, name)
    assert encode_prompt(reloaded, "add: 1+2") == encode_prompt(tokenizer, "add: 1+2")


def test_sft_warmup_lowers_the_loss(pairs, tokenizer):
    model = toy.build_model(tokenizer, **TINY_MODEL)
    prompts = [_prompt(m) for m in pairs["messages"]]
    responses = [_answer(m) for m in pairs["messages"]]
    losses = toy.sft_warmup(
        model, tokenizer, prompts, responses, steps=30, lr=1e-2, batch_size=16, seed=0
    )
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # at least 20% lower


def test_build_model_is_seeded_and_keeps_the_global_rng(tokenizer):
    state = torch.random.get_rng_state()
    first = toy.build_model(tokenizer, seed=1, **TINY_MODEL)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = toy.build_model(tokenizer, seed=1, **TINY_MODEL)
    assert all(
        torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True)
    )
    assert first.config.vocab_size == len(tokenizer)
    assert first.generation_config.eos_token_id == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("toy")
    return out_dir, toy.build_toy(out_dir, num_train=200, num_eval=40, sft_steps=5)


def test_build_toy_writes_a_loadable_theta0_that_generates(built):
    _, artifacts = built
    assert len(pd.read_parquet(artifacts.train_path)) == 200
    assert len(pd.read_parquet(artifacts.eval_path)) == 40
    names = {p.name for p in artifacts.model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    tokenizer = AutoTokenizer.from_pretrained(artifacts.model_dir)
    model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir)
    assert tokenizer.chat_template
    prompt_ids = torch.tensor([encode_prompt(tokenizer, "reverse: abc")])  # (1, prompt)
    output = model.generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=8, do_sample=False
    )  # (1, prompt + new)
    new = output[0, prompt_ids.shape[1] :].tolist()
    assert 0 < len(new) <= 8
    assert tokenizer.eos_token_id not in new[:-1]  # nothing is generated after EOS


def test_build_toy_second_call_reuses_the_build(built):
    out_dir, artifacts = built
    weights = artifacts.model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = toy.build_toy(out_dir, num_train=200, num_eval=40, sft_steps=5)
    assert again == artifacts
    assert weights.stat().st_mtime_ns == before
    assert json.loads((out_dir / "toy.json").read_text())["params"]["sft_steps"] == 5
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".toy-build-")]


def test_build_toy_rebuilds_when_parameters_change(tmp_path):
    toy.build_toy(tmp_path, num_train=40, num_eval=8, sft_steps=1)
    toy.build_toy(tmp_path, num_train=40, num_eval=8, sft_steps=2)
    assert json.loads((tmp_path / "toy.json").read_text())["params"]["sft_steps"] == 2


def test_a_crashed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(toy, "sft_warmup", crash)
    with pytest.raises(RuntimeError, match="killed"):
        toy.build_toy(tmp_path, num_train=40, num_eval=8, sft_steps=1)
    assert not (tmp_path / "toy.json").exists()
    assert not (tmp_path / "theta0").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".toy-build-")]


def test_asking_for_more_pairs_than_distinct_prompts_says_so():
    with pytest.raises(ValueError, match="distinct prompts"):
        toy.make_pairs(45_000, seed=0)
