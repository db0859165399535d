import pandas as pd
import pytest

from spin_core.checkpoint import load_policy
from spin_core.data import read_parquet_checked
from spin_core.generate import (
    Decoding,
    HFBackend,
    encode_prompts,
    generate_shards,
    merge_shards,
    shard_path,
    token_budget_batches,
)


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
    ids = encode_prompts(tokenizer, prompts["prompt"].tolist(), 64)
    shards = tmp_path / "generated"
    paths = generate_shards(
        backend,
        prompts,
        ids,
        shards,
        shard_size=16,
        opponent="θ0",
        decoding=decoding,
        show_progress=False,
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
    generate_shards(
        backend,
        prompts,
        ids,
        shards,
        shard_size=16,
        opponent="θ0",
        decoding=decoding,
        show_progress=False,
    )
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
