"""Generation workers: sampled shards reproduce whatever runs beside them, and each
step gives its GPU memory back (docs/DESIGN.md "Generation workers")."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
import torch

from spin_core.checkpoint import load_policy
from spin_core.config import ModelConfig
from spin_core.generation import (
    Decoding,
    HFBackend,
    generate_shards,
    merge_shards,
    shard_path,
    worker_shards,
)
from spin_core.prompts import encode_prompts

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


class TakeTurns:
    """Makes threads take turns, one model call each (the call and the sampling after it),
    as Prefect's worker threads interleave on a busy machine, but every time the same way."""

    def __init__(self, names: list[str]):
        self.names, self.turn, self.done = names, 0, set()
        self.holding: set[str] = set()
        self.cond = threading.Condition()

    def _pass_turn(self, me: str) -> None:
        self.holding.discard(me)
        self.turn = (self.turn + 1) % len(self.names)
        self.cond.notify_all()

    def hook(self, module, args):
        me = threading.current_thread().name
        with self.cond:
            if me in self.holding:
                self._pass_turn(me)
            self.cond.wait_for(
                lambda: self.names[self.turn] == me or self.names[self.turn] in self.done
            )
            while self.names[self.turn] in self.done and self.names[self.turn] != me:
                self.turn = (self.turn + 1) % len(self.names)
            self.holding.add(me)

    def run(self, work) -> None:
        try:
            work()
        finally:
            me = threading.current_thread().name
            with self.cond:
                self.done.add(me)
                if me in self.holding or self.names[self.turn] == me:
                    self._pass_turn(me)


def _generate(backend, prompts, ids, shards, decoding, shard_indices=None):
    return generate_shards(
        backend,
        prompts,
        ids,
        shards,
        shard_size=SHARD_SIZE,
        opponent="θ0",
        decoding=decoding,
        shard_indices=shard_indices,
        show_progress=False,
    )


def test_a_redone_sampled_shard_equals_the_one_written_beside_another_worker(
    opponent, prompts, tmp_path
):
    """do_sample with 2 concurrent workers: delete one shard, regenerate it alone, same rows."""
    model, tokenizer = opponent
    decoding = Decoding(True, 1.0, 1.0, 12, 3, "chat")
    backend = HFBackend(model, tokenizer, decoding, batch_tokens=4096, max_batch_size=64)
    ids = encode_prompts(tokenizer, prompts["prompt"].tolist(), 64)
    shards = tmp_path / "generated"
    names = ["worker-0", "worker-1"]
    turns = TakeTurns(names)
    handle = model.register_forward_pre_hook(turns.hook)
    try:
        threads = [
            threading.Thread(
                name=name,
                target=turns.run,
                args=(
                    lambda w=w: _generate(
                        backend,
                        prompts,
                        ids,
                        shards,
                        decoding,
                        worker_shards(len(prompts), SHARD_SIZE, 2, w),
                    ),
                ),
            )
            for w, name in enumerate(names)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        handle.remove()
    both = merge_shards(shards, len(prompts), SHARD_SIZE, tmp_path / "both.parquet")
    reference = pd.read_parquet(both)
    assert reference["generated"].nunique() > len(prompts) // 2  # really sampled

    shard_path(shards, 1).unlink()
    global_state = torch.random.get_rng_state()
    _generate(backend, prompts, ids, shards, decoding, shard_indices=[1])  # alone
    again = pd.read_parquet(merge_shards(shards, len(prompts), SHARD_SIZE, tmp_path / "a.parquet"))
    pd.testing.assert_frame_equal(reference, again)
    # Sampling draws from the shard's own generator, never from torch's global one.
    assert torch.equal(torch.random.get_rng_state(), global_state)


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


def test_each_worker_thread_generates_on_its_own_gpu(
    opponent, prompts, toy_config, monkeypatch, tmp_path
):
    """torch.cuda's current device is per thread: worker 1 of 2 GPUs sets cuda:1 for its work."""
    import contextlib

    from spin_core.generation import generate_from_model
    from spin_core.generation import shards as shards_module

    _, tokenizer = opponent
    current: list[torch.device] = []
    seen = {}

    @contextlib.contextmanager
    def set_device(device):
        current.append(torch.device(device))
        yield
        current.pop()

    class Recorder:
        def generate(self, ids, progress=None, first_row=0):
            seen["device"] = current[-1] if current else None
            decoding = Decoding(False, 1.0, 1.0, 4, 0, "chat")
            backend = HFBackend(opponent[0], tokenizer, decoding, **BATCHING)
            return backend.generate(ids, progress, first_row)

    def make_backend(model_path, cfg, tokenizer, *, worker=0, **kwargs):
        seen["made_on"] = current[-1] if current else None
        return Recorder()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", set_device)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(shards_module, "make_backend", make_backend)
    generate_from_model(
        toy_config.model.name_or_path,
        toy_config,
        _sample_frame(tokenizer, prompts),
        tmp_path / "generated",
        worker=1,
        show_progress=False,
    )
    assert seen == {"made_on": torch.device("cuda", 1), "device": torch.device("cuda", 1)}


def test_generation_frees_the_model_then_empties_the_cuda_cache(
    opponent, prompts, toy_config, monkeypatch, tmp_path
):
    """After the HF generation step the model is gone before torch.cuda.empty_cache runs
    (else the cache keeps its blocks and the next step, training or vLLM, cannot have them)."""
    import weakref

    from spin_core import checkpoint
    from spin_core.generation import generate_from_model

    _, tokenizer = opponent
    loaded, emptied = [], []
    real_load = checkpoint.load_policy

    def load_policy(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        model.self_reference = [model]  # a reference cycle, as DeepSpeed and hooks make
        loaded.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(checkpoint, "load_policy", load_policy)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(loaded[0]() is None))
    paths = generate_from_model(
        toy_config.model.name_or_path,
        toy_config,
        _sample_frame(tokenizer, prompts),
        tmp_path / "generated",
        show_progress=False,
    )
    assert len(paths) == 1 and len(loaded) == 1
    assert emptied == [True]  # emptied once, after the model was collected


def _fake_vllm(events: list, monkeypatch, eos: int):
    """A `vllm` module that records what the backend hands it and when it is shut down."""
    import importlib.machinery
    import sys
    import types

    class EngineCore:
        def shutdown(self):
            events.append("shutdown")

    class LLM:
        def __init__(self, **kwargs):
            events.append(("LLM", kwargs))
            self.llm_engine = types.SimpleNamespace(engine_core=EngineCore())

        def generate(self, prompts, params, use_tqdm):
            events.append(("generate", prompts))
            done = types.SimpleNamespace(token_ids=[5, eos], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[done]) for _ in prompts]

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    module(
        "vllm",
        LLM=LLM,
        SamplingParams=lambda **kw: types.SimpleNamespace(**kw),
        TokensPrompt=lambda prompt_token_ids: prompt_token_ids,
    )
    module("vllm.distributed")
    module(
        "vllm.distributed.parallel_state",
        cleanup_dist_env_and_memory=lambda: events.append("cleanup"),
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))


def test_vllm_gets_plain_ints_its_memory_share_and_is_shut_down_after_generating(
    opponent, prompts, toy_config, monkeypatch, tmp_path
):
    from spin_core.generation import generate_from_model

    _, tokenizer = opponent
    events: list = []
    _fake_vllm(events, monkeypatch, tokenizer.eos_token_id)
    config = toy_config.model_copy(deep=True)
    config.generation.backend = "vllm"
    config.generation.gpu_memory_utilization = 0.55
    frame = _sample_frame(tokenizer, prompts)
    frame.to_parquet(tmp_path / "prompts.parquet")
    frame = pd.read_parquet(tmp_path / "prompts.parquet")  # ids as numpy arrays, as in a run
    generate_from_model(
        config.model.name_or_path, config, frame, tmp_path / "generated", show_progress=False
    )
    (_, engine), (_, requests), *after = events
    assert engine["gpu_memory_utilization"] == 0.55
    assert len(requests) == len(frame)
    assert all(type(t) is int for ids in requests for t in ids)  # not numpy.int64
    assert [list(ids) for ids in requests] == [list(ids) for ids in frame["prompt_ids"]]
    # The engine stops and its memory is given back after generating, before anything else.
    assert after == ["shutdown", "cleanup", "empty_cache"]
    shard = pd.read_parquet(tmp_path / "generated" / "part-00000.parquet")
    assert shard["finish_reason"].eq("stop").all()


def test_vllm_with_several_workers_is_refused_naming_the_field(toy_config):
    from spin_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"generation: num_workers \(4\) must be 1 with backend"):
        load_config("configs/demo.yaml", ["generation.backend=vllm", "generation.num_workers=4"])
    one_engine = load_config(
        "configs/demo.yaml",
        [
            "generation.backend=vllm",
            "generation.num_workers=1",
            "generation.tensor_parallel_size=2",
        ],
    )
    assert one_engine.generation.tensor_parallel_size == 2


def test_evaluation_frees_the_model_then_empties_the_cuda_cache(monkeypatch, tmp_path):
    """The evaluate step drops θ before torch.cuda.empty_cache: the next step (vLLM's
    start-up check, in-process training) finds the memory free."""
    import weakref

    from spin_core import steps
    from spin_core.config import load_config
    from spin_core.rundir import RunDir
    from spin_core.step import PlainContext

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
