import types

import pandas as pd
import pytest
import torch

from spin_core.generation import (
    Decoding,
    Generated,
    HFBackend,
    generate_shards,
    merge_shards,
    shard_path,
    token_budget_batches,
)
from spin_core.prompts import encode_prompts
from spin_core.storage.files import read_parquet_checked
from spin_core.storage.models import load_policy


@pytest.fixture(scope="module")
def opponent(toy_build):
    return load_policy(
        str(toy_build.model_dir),
        __import__("spin_core.config").config.ModelConfig(precision="fp32"),
    )


@pytest.fixture(scope="module")
def prompts(toy_build):
    frame = pd.read_parquet(toy_build.eval_path).head(40)
    return pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(len(frame))],
            "prompt": frame["messages"].map(lambda m: m[0]["content"]),
            "real": frame["messages"].map(lambda m: m[1]["content"]),
        }
    )


def _backend(model, tokenizer, budget=4096, max_batch=64):
    decoding = Decoding(False, 1.0, 1.0, 24, 0, "chat")
    return HFBackend(
        model, tokenizer, decoding, batch_tokens=budget, max_batch_size=max_batch
    ), decoding


def test_batched_greedy_equals_one_prompt_at_a_time(opponent, prompts):
    model, tokenizer = opponent
    ids = encode_prompts(tokenizer, prompts["prompt"].tolist()[:16], 64)
    batched, _ = _backend(model, tokenizer)
    single, _ = _backend(model, tokenizer, max_batch=1)
    together = batched.generate(ids)
    alone = single.generate(ids)
    assert [g.text for g in together] == [g.text for g in alone]
    assert len({len(p) for p in ids}) > 1  # the batch really mixed prompt lengths
    assert all(g.finish_reason in ("stop", "length") for g in together)
    stopped = [g for g in together if g.finish_reason == "stop"]
    assert stopped and all(tokenizer.eos_token not in g.text for g in stopped)


def test_token_budget_batches_group_by_length_within_budget():
    lengths = [5, 50, 6, 48, 7, 49]
    batches = token_budget_batches(lengths, budget=120, max_batch_size=8, extra=10)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) * (max(lengths[i] for i in batch) + 10) <= 120 or len(batch) == 1
    assert batches[0] == [0, 2, 4]  # the short prompts share a batch


def test_shards_resume_and_merge_in_order(opponent, prompts, tmp_path):
    model, tokenizer = opponent
    backend, decoding = _backend(model, tokenizer)
    prompts = prompts.assign(prompt_ids=encode_prompts(tokenizer, prompts["prompt"].tolist(), 64))
    shards = tmp_path / "generated"
    paths = generate_shards(
        backend,
        prompts,
        shards,
        shard_size=16,
        opponent="θ0",
        decoding=decoding,
    )
    assert [p.name for p in paths] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    first = merge_shards(shards, len(prompts), 16, tmp_path / "generated.parquet")
    reference = pd.read_parquet(first)

    # Truncate one shard and delete another, as a crash mid-write would leave them.
    data = shard_path(shards, 1).read_bytes()
    shard_path(shards, 1).write_bytes(data[: len(data) // 2])
    shard_path(shards, 2).unlink()
    kept_mtime = shard_path(shards, 0).stat().st_mtime_ns
    assert read_parquet_checked(shard_path(shards, 1), expected_rows=16) is None
    generate_shards(backend, prompts, shards, shard_size=16, opponent="θ0", decoding=decoding)
    assert shard_path(shards, 0).stat().st_mtime_ns == kept_mtime  # a finished shard is not redone
    again = pd.read_parquet(merge_shards(shards, len(prompts), 16, tmp_path / "again.parquet"))
    pd.testing.assert_frame_equal(reference, again)
    assert reference["id"].tolist() == prompts["id"].tolist()
    assert set(reference.columns) >= {
        "generated",
        "finish_reason",
        "generated_tokens",
        "opponent",
        "decoding",
    }
    assert '"do_sample": false' in reference["decoding"].iloc[0]

    # The ids trained on are the ids generated: EOS last exactly when the row stopped.
    for ids, reason in zip(reference["generated_ids"], reference["finish_reason"], strict=True):
        assert (ids[-1] == tokenizer.eos_token_id) == (reason == "stop")
        assert tokenizer.eos_token_id not in list(ids[:-1])


def test_greedy_decoder_equals_model_generate_token_for_token(opponent, prompts):
    model, tokenizer = opponent
    ids = encode_prompts(tokenizer, prompts["prompt"].tolist()[:12], 64)
    ours = _backend(model, tokenizer)[0].generate(ids)
    for prompt, mine in zip(ids, ours, strict=True):
        output = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
        assert mine.token_ids == Generated.from_ids(output, tokenizer).token_ids


def test_a_cut_off_generation_keeps_its_ids_without_eos(opponent, prompts):
    model, tokenizer = opponent
    ids = encode_prompts(tokenizer, prompts["prompt"].tolist()[:8], 64)
    decoding = Decoding(False, 1.0, 1.0, 2, 0, "chat")  # 2 new tokens
    cut = HFBackend(model, tokenizer, decoding, batch_tokens=4096, max_batch_size=8).generate(ids)
    lengths = [g for g in cut if g.finish_reason == "length"]
    assert len(lengths) >= 4  # most toy answers are longer than 2 characters
    assert all(len(g.token_ids) == 2 and tokenizer.eos_token_id not in g.token_ids for g in lengths)


def test_vllm_completions_map_to_the_ids_generated(opponent):
    from spin_core.generation.vllm import generated_from_vllm

    _, tokenizer = opponent
    eos = tokenizer.eos_token_id
    word = tokenizer("abc", add_special_tokens=False)["input_ids"]
    stopped = generated_from_vllm(
        types.SimpleNamespace(token_ids=word, finish_reason="stop"), tokenizer
    )
    assert stopped.token_ids == [*word, eos] and stopped.text == "abc"  # EOS put back
    with_eos = generated_from_vllm(
        types.SimpleNamespace(token_ids=[*word, eos], finish_reason="stop"), tokenizer
    )
    assert with_eos.token_ids == [*word, eos]
    cut = generated_from_vllm(
        types.SimpleNamespace(token_ids=word, finish_reason="length"), tokenizer
    )
    assert cut.token_ids == word and cut.finish_reason == "length"


def test_vllm_requests_get_distinct_seeds(opponent, toy_build, monkeypatch):
    """One seed per request (seed + run-wide row), so sampled negatives are not correlated."""
    import sys

    from spin_core.generation import vllm as vllm_backend

    _, tokenizer = opponent
    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            pass

        def generate(self, prompts, params, use_tqdm):
            seen["seeds"] = [p.seed for p in params]
            done = types.SimpleNamespace(token_ids=[tokenizer.eos_token_id], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[done]) for _ in prompts]

    fake = types.SimpleNamespace(
        LLM=FakeLLM,
        SamplingParams=lambda **kw: types.SimpleNamespace(**kw),
        TokensPrompt=lambda prompt_token_ids: prompt_token_ids,
    )
    monkeypatch.setitem(sys.modules, "vllm", fake)
    cfg = __import__("spin_core.config").config.load_config("configs/demo.yaml")
    decoding = Decoding(True, 1.0, 1.0, 8, 7, "chat")
    backend = vllm_backend.VLLMBackend(str(toy_build.model_dir), tokenizer, decoding, cfg)
    backend.generate([[1, 2]] * 3, first_row=100)
    assert seen["seeds"] == [107, 108, 109]
