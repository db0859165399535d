"""Generation: sampled shards reproduce whoever writes them, every stop token is the model's
own, and each step gives its GPU memory back (docs/DESIGN.md "Generation workers")."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from spin_core.config import ModelConfig
from spin_core.generation import (
    Decoding,
    HFBackend,
    generate_shards,
    merge_shards,
    shard_path,
)
from spin_core.prompts import encode_prompts
from spin_core.storage.models import load_policy

SHARD_SIZE = 10
BATCHING = {"batch_tokens": 4096, "max_batch_size": 64}


@pytest.fixture(scope="module")
def opponent(toy_build):
    return load_policy(str(toy_build.model_dir), ModelConfig(precision="fp32"))


@pytest.fixture(scope="module")
def prompts(toy_build):
    frame = pd.read_parquet(toy_build.eval_path).head(4 * SHARD_SIZE)
    return pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(len(frame))],
            "prompt": frame["messages"].map(lambda m: m[0]["content"]),
            "real": frame["messages"].map(lambda m: m[1]["content"]),
        }
    )


def _generate(backend, prompts, shards, decoding):
    generate_shards(
        backend, prompts, shards, shard_size=SHARD_SIZE, opponent="θ0", decoding=decoding
    )


def test_a_redone_sampled_shard_equals_the_lost_one(opponent, prompts, tmp_path):
    """do_sample: delete one shard, regenerate it after other work moved torch's global
    generator, and get the same rows (each shard draws from its own generator)."""
    model, tokenizer = opponent
    decoding = Decoding(True, 1.0, 1.0, 12, 3, "chat")
    backend = HFBackend(model, tokenizer, decoding, **BATCHING)
    frame = prompts.copy()
    frame["prompt_ids"] = encode_prompts(tokenizer, prompts["prompt"].tolist(), 64)
    shards = tmp_path / "generated"
    _generate(backend, frame, shards, decoding)
    reference = pd.read_parquet(
        merge_shards(shards, len(frame), SHARD_SIZE, tmp_path / "a.parquet")
    )
    assert reference["generated"].nunique() > len(frame) // 2  # really sampled

    shard_path(shards, 1).unlink()
    torch.rand(1000)  # another worker's draws, in another process, cannot matter either
    global_state = torch.random.get_rng_state()
    _generate(backend, frame, shards, decoding)
    again = pd.read_parquet(merge_shards(shards, len(frame), SHARD_SIZE, tmp_path / "b.parquet"))
    pd.testing.assert_frame_equal(reference, again)
    # Sampling draws from the shard's own generator, never from torch's global one.
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert not list(shards.glob(".*claim*"))  # every claim released


def test_sampling_draws_what_model_generate_draws_from_the_same_seed(opponent, prompts):
    """The sampler is transformers' own: its warpers, then multinomial; one row at a time the
    tokens equal `model.generate(do_sample=True)` after torch.manual_seed of the same seed."""
    from spin_core.generation import decode
    from spin_core.generation.hf import sampling_warpers

    model, tokenizer = opponent
    decoding = Decoding(True, 0.7, 0.9, 12, 0, "chat")
    sampled = 0
    for prompt in encode_prompts(tokenizer, prompts["prompt"].tolist()[:6], 64):
        input_ids = torch.tensor([prompt])
        mask = torch.ones_like(input_ids)
        torch.manual_seed(11)
        theirs = model.generate(
            input_ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            top_k=None,
            max_new_tokens=12,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
        ours = decode(
            model,
            input_ids,
            mask,
            max_new_tokens=12,
            eos_token_id=tokenizer.eos_token_id,
            warpers=sampling_warpers(decoding),
            generator=torch.Generator().manual_seed(11),
        )[0]
        assert ours == theirs[: len(ours)] and len(ours) > 0
        greedy = decode(model, input_ids, mask, max_new_tokens=12, eos_token_id=2)[0]
        sampled += ours != greedy[: len(ours)]
    assert sampled  # at temperature 0.7 some rows leave the greedy path


# ------------------------------------------------------------- devices and memory


def _sample_frame(tokenizer, prompts):
    from spin_core.prompts import encode_pairs

    frame = prompts.head(SHARD_SIZE).copy()
    frame["prompt_ids"], frame["real_ids"] = encode_pairs(tokenizer, frame, 64)
    return frame


def test_generation_frees_the_model_then_empties_the_cuda_cache(
    opponent, prompts, toy_config, monkeypatch, tmp_path
):
    """After the HF generation step the model is gone before torch.cuda.empty_cache runs
    (else the cache keeps its blocks and the next step, training or vLLM, cannot have them)."""
    import weakref

    from spin_core.generation import generate_from_model
    from spin_core.storage import models

    _, tokenizer = opponent
    loaded, emptied = [], []
    real_load = models.load_policy

    def load_policy(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        model.self_reference = [model]  # a reference cycle, as DeepSpeed and hooks make
        loaded.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(models, "load_policy", load_policy)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(loaded[0]() is None))
    generate_from_model(
        toy_config.model.name_or_path,
        toy_config,
        _sample_frame(tokenizer, prompts),
        tmp_path / "generated",
    )
    assert len(loaded) == 1 and shard_path(tmp_path / "generated", 0).is_file()
    assert emptied == [True]  # emptied once, after the model was collected


def test_vllm_completions_keep_the_stop_token_the_model_produced():
    """A stopped completion ends with its stop token (put back when vLLM left it out), one
    that names another EOS id of generation_config.json keeps that one and gets no extra
    EOS, and a completion cut at max_tokens gets none."""
    import types

    from spin_core.generation.vllm import generated_from_vllm

    tokenizer = types.SimpleNamespace(eos_token_id=2, decode=lambda ids, **kw: str(ids))

    def completion(ids, reason, stop_reason=None):
        return types.SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop_reason)

    stops = (2, 9)
    assert generated_from_vllm(completion([5, 6], "stop"), tokenizer, stops).token_ids == [5, 6, 2]
    assert generated_from_vllm(completion([5, 6, 2], "stop"), tokenizer, stops).token_ids == [
        5,
        6,
        2,
    ]
    eot = generated_from_vllm(completion([5, 9], "stop", 9), tokenizer, stops)
    assert (eot.token_ids, eot.finish_reason) == ([5, 9], "stop")
    left_out = generated_from_vllm(completion([5], "stop", 9), tokenizer, stops)
    assert left_out.token_ids == [5, 9]
    cut = generated_from_vllm(completion([5, 6, 7], "length"), tokenizer, stops)
    assert (cut.token_ids, cut.finish_reason) == ([5, 6, 7], "length")


def test_the_hf_decoder_stops_at_every_eos_id_of_the_generation_config(opponent, prompts):
    """Llama-3 style: generation_config.json lists a second EOS id. The HF backend stops at
    it and stores it as the last token, as `generate` does, with no extra EOS."""
    import copy

    from spin_core.generation import stop_token_ids

    model, tokenizer = opponent
    decoding = Decoding(False, 1.0, 1.0, 16, 0, "chat")
    ids = encode_prompts(tokenizer, prompts["prompt"].tolist()[:8], 64)
    plain = HFBackend(model, tokenizer, decoding, **BATCHING).generate(ids)
    # The token found in most greedy answers becomes a second EOS.
    seen = pd.Series([t for g in plain for t in set(g.token_ids[:-1])])
    second = int(seen.mode()[0])
    assert second != tokenizer.eos_token_id
    twin = copy.copy(model)
    twin.generation_config = copy.deepcopy(model.generation_config)
    twin.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    assert stop_token_ids(twin.generation_config, tokenizer) == (tokenizer.eos_token_id, second)
    stopped = HFBackend(twin, tokenizer, decoding, **BATCHING).generate(ids)
    input_ids = torch.tensor([ids[0]])
    theirs = twin.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=16,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids[0]) :].tolist()
    assert stopped[0].token_ids == theirs[: len(stopped[0].token_ids)]
    for mine, before in zip(stopped, plain, strict=True):
        if second in before.token_ids:
            cut = before.token_ids.index(second) + 1
            assert (mine.token_ids, mine.finish_reason) == (before.token_ids[:cut], "stop")
    assert sum(g.token_ids[-1] == second for g in stopped) >= 2


def test_vllm_with_several_workers_is_accepted(toy_config):
    from spin_core.config import load_config

    config = load_config(
        "configs/demo.yaml", ["generation.backend=vllm", "generation.num_workers=4"]
    )
    assert config.generation.num_workers == 4


def test_evaluation_frees_the_model_then_empties_the_cuda_cache(monkeypatch, tmp_path):
    """The evaluate step drops θ before torch.cuda.empty_cache: the next step (vLLM's
    start-up check, in-process training) finds the memory free."""
    import weakref

    from spin_core import steps
    from spin_core.config import load_config
    from spin_core.execution import PlainContext
    from spin_core.storage.rundir import RunDir

    loaded, emptied = [], []

    def load_policy(model, model_config):
        policy = torch.nn.Linear(2, 2)
        policy.self_reference = [policy]  # freed by the cyclic collector only
        loaded.append(weakref.ref(policy))
        return policy, None

    def evaluate_model(policy, tokenizer, heldout, config, **kwargs):
        return pd.DataFrame({"id": ["a"]}), {"exact_match": 0.5, "real_loglik_per_token": -1.0}

    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    pd.DataFrame({"id": ["a"], "prompt": ["What is 2 + 3?"]}).to_parquet(run.heldout)
    monkeypatch.setattr(steps, "load_policy", load_policy)
    monkeypatch.setattr(steps, "evaluate_model", evaluate_model)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(loaded[0]() is None))
    metrics = steps.evaluate.body(
        PlainContext(),
        config=load_config("configs/demo.yaml"),
        run_dir=str(run.root),
        model="θ1",
        out_dir=str(tmp_path / "eval"),
    )
    assert metrics["exact_match"] == 0.5
    assert emptied == [True]
