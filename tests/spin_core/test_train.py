"""Training: the loss falls, resume reproduces the losses, the export loads."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from spin_core.generation import Decoding, HFBackend
from spin_core.prompts import encode_pairs
from spin_core.score import score_with_opponent
from spin_core.storage.models import load_policy
from spin_core.storage.rundir import STEP_LOG
from spin_core.training.job import TrainJob
from spin_core.training.state import COMPLETE_MARKER, complete_checkpoints
from spin_core.training.train import step_indices, train_iteration


def toy_job(toy_build, train_path, state_dir, model_out, **changes) -> TrainJob:
    """Iteration 0 of training the toy θ0 on `train_path`."""
    return TrainJob(str(toy_build.model_dir), train_path, state_dir, model_out, 0, **changes)


def _unscored_job(toy_build, train_parquet, tmp_path) -> TrainJob:
    """Training on the unscored pairs beside `train_parquet`: the ranks score them first,
    into tmp_path/train.parquet."""
    pairs = train_parquet.parent / "pairs.parquet"
    return toy_job(
        toy_build,
        pairs,
        tmp_path / "state",
        tmp_path / "model",
        scored_path=tmp_path / "train.parquet",
    )


@pytest.fixture(scope="module")
def train_parquet(toy_build, tmp_path_factory):
    """A SPIN training set: real answers vs the toy θ0's own greedy answers, scored by θ0."""
    from spin_core.config import load_config

    cfg = load_config(
        "configs/demo.yaml", ["training.max_length=96", "training.max_prompt_length=48"]
    )
    model, tokenizer = load_policy(str(toy_build.model_dir), cfg.model)
    frame = pd.read_parquet(toy_build.train_path).head(96)
    pairs = pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(len(frame))],
            "prompt": frame["messages"].map(lambda m: m[0]["content"]),
            "real": frame["messages"].map(lambda m: m[1]["content"]),
        }
    )
    backend = HFBackend(
        model, tokenizer, Decoding(False, 1, 1, 24, 0, "chat"), batch_tokens=8192, max_batch_size=96
    )
    pairs["prompt_ids"], pairs["real_ids"] = encode_pairs(tokenizer, pairs, 48)
    generated = backend.generate(pairs["prompt_ids"].tolist())
    pairs["generated"] = [g.text for g in generated]
    pairs["generated_ids"] = [g.token_ids for g in generated]
    pairs = pairs[pairs["generated"] != pairs["real"]].head(64)
    folder = tmp_path_factory.mktemp("train")
    pairs.to_parquet(folder / "pairs.parquet")
    scored, _ = score_with_opponent(model, tokenizer.pad_token_id, pairs, cfg.training)
    scored.to_parquet(folder / "train.parquet")
    return folder / "train.parquet"


def _config(toy_build, *extra):
    from spin_core.config import load_config

    return load_config(
        "configs/demo.yaml",
        [
            f"model.name_or_path={toy_build.model_dir}",
            "training.learning_rate=1e-4",
            "training.optimizer=adamw",
            "training.global_batch_size=8",
            "training.micro_batch_size=4",
            "training.num_epochs=4",
            "training.warmup_ratio=0",
            "training.max_length=96",
            "training.max_prompt_length=48",
            "training.save_steps=10",
            *extra,
        ],
    )


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_spin_training_lowers_loss_and_raises_reward_accuracy(toy_build, train_parquet, tmp_path):
    cfg = _config(toy_build)
    result = train_iteration(
        cfg,
        toy_job(toy_build, train_parquet, tmp_path / "state", tmp_path / "model"),
    )
    log = _log(result.log_path)
    assert result.steps == 32 and len(log) == 32  # 64 pairs / 8 per step × 4 epochs
    # Step 1 starts at the opponent: policy == θ0, so loss = log 2 and margin = 0.
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert abs(log[0]["margin"]) < 1e-3
    first, last = log[:4], log[-4:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)
    assert sum(r["reward_accuracy"] for r in last) > sum(r["reward_accuracy"] for r in first)
    assert all(r["tokens_per_s"] > 0 and r["learning_rate"] > 0 for r in log)

    # The export is a normal HF directory holding exactly the trained weights: those of the
    # engine's last DeepSpeed checkpoint (the policy sits under `policy.` in the wrapper).
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    _, last = complete_checkpoints(tmp_path / "state")[-1]
    trained = torch.load(  # our own checkpoint, with DeepSpeed's non-tensor client state
        last / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, trained[f"policy.{name}"], rtol=0, atol=0)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    assert not torch.allclose(
        exported(ids).logits, AutoModelForCausalLM.from_pretrained(toy_build.model_dir)(ids).logits
    )
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "model" / "tokenizer_config.json").exists()
    assert (tmp_path / "model" / "generation_config.json").exists()


def test_interrupted_then_resumed_run_reproduces_losses(toy_build, train_parquet, tmp_path):
    cfg = _config(toy_build, "training.num_epochs=2", "training.save_steps=3")
    job = toy_job(toy_build, train_parquet, tmp_path / "a", tmp_path / "ma")
    straight = train_iteration(cfg, job)
    interrupted = replace(job, state_dir=tmp_path / "b", model_out=tmp_path / "mb")
    stopped = train_iteration(cfg, interrupted, stop_after_steps=7)
    assert stopped.model_dir is None and not (tmp_path / "mb").exists()
    assert [s for s, _ in complete_checkpoints(tmp_path / "b")] == [6, 7]  # keep_checkpoints=2
    # A checkpoint without its completion marker (a crash mid-save: files copied, one of
    # them cut short) is ignored.
    half = tmp_path / "b" / "step_000008"
    shutil.copytree(tmp_path / "b" / "step_000007", half)
    (half / COMPLETE_MARKER).unlink()
    biggest = max(half.rglob("*.pt"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    resumed = train_iteration(cfg, interrupted)
    assert resumed.resumed_from == 7

    a, b = _log(straight.log_path), _log(resumed.log_path)
    assert [r["step"] for r in b] == list(range(1, 17))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
        assert y["learning_rate"] == pytest.approx(x["learning_rate"], rel=1e-9)
    sa = AutoModelForCausalLM.from_pretrained(tmp_path / "ma").state_dict()
    sb = AutoModelForCausalLM.from_pretrained(tmp_path / "mb").state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=1e-6, rtol=1e-5)


def test_data_order_is_a_seeded_permutation_with_wraparound():
    steps = [step_indices(10, s, 4, seed=3) for s in range(3)]
    epoch = [i for s in steps for i in s]
    assert len(epoch) == 12 and set(epoch) == set(range(10))
    assert step_indices(10, 0, 4, seed=3) == steps[0]
    assert step_indices(10, 3, 4, seed=3) != steps[0]  # the next epoch is reshuffled


def _launch(cfg, train_parquet, state_dir, model_out):
    from spin_core.training.launch import launch_training

    steps: list[dict] = []
    job = TrainJob(cfg.model.name_or_path, train_parquet, state_dir, model_out, iteration=0)
    launch_training(cfg, job, on_step=steps.append)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(
    zero_stage, toy_build, train_parquet, tmp_path
):
    common = ["training.num_epochs=1"]
    one = train_iteration(
        _config(toy_build, *common, "training.zero_stage=2"),
        toy_job(toy_build, train_parquet, tmp_path / "one", tmp_path / "m1"),
    )
    two_cfg = _config(
        toy_build, *common, "training.num_processes=2", f"training.zero_stage={zero_stage}"
    )  # 2 ranks × 1 micro-batch of 4
    streamed = _launch(two_cfg, train_parquet, tmp_path / "two", tmp_path / "m2")

    a, b = _log(one.log_path), _log(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in streamed] == [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["margin"] == pytest.approx(x["margin"], abs=1e-5)
    # ZeRO-3 shards are gathered into one ordinary safetensors directory.
    assert sorted(p.name for p in (tmp_path / "m2").glob("*.safetensors")) == ["model.safetensors"]
    sa = AutoModelForCausalLM.from_pretrained(tmp_path / "m1").state_dict()
    sb = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch_with_its_error(toy_build, tmp_path):
    from spin_core.training.launch import LaunchError

    cfg = _config(toy_build, "training.num_processes=2", "training.zero_stage=2")
    with pytest.raises(LaunchError, match="no-such.parquet"):
        _launch(cfg, tmp_path / "no-such.parquet", tmp_path / "state", tmp_path / "model")


# Persistence threshold 0 partitions every parameter, the LM head included.
ZERO3_ALL_PARTITIONED = (
    'training.deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}}'
)


@pytest.mark.slow
def test_zero3_with_accumulation_equals_zero0_and_two_zero2_ranks(
    toy_build, train_parquet, tmp_path
):
    """Accumulation 2 on 1 rank under ZeRO-3 = ZeRO-0 on 1 rank = ZeRO-2 on 2 ranks (fp32)."""
    common = ["training.num_epochs=1"]

    def one_rank(stage: int, *extra: str):
        return train_iteration(
            _config(toy_build, *common, f"training.zero_stage={stage}", *extra),
            toy_job(toy_build, train_parquet, tmp_path / f"z{stage}", tmp_path / f"m{stage}"),
        )

    zero0 = _log(one_rank(0).log_path)
    zero3 = _log(one_rank(3, ZERO3_ALL_PARTITIONED).log_path)
    two_cfg = _config(toy_build, *common, "training.num_processes=2", "training.zero_stage=2")
    _launch(two_cfg, train_parquet, tmp_path / "two", tmp_path / "m_two")
    zero2 = _log(tmp_path / "two" / "metrics.jsonl")
    assert len(zero0) == len(zero3) == len(zero2) == 8
    for a, b, c in zip(zero0, zero3, zero2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert c["loss"] == pytest.approx(a["loss"], abs=1e-5)
    weights = [
        AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict()
        for name in ("m0", "m3", "m_two")
    ]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(weights[2][key], weights[0][key], atol=1e-5, rtol=1e-4)


def test_training_scores_unscored_pairs_itself_before_its_first_step(
    toy_build, train_parquet, tmp_path
):
    """pairs.parquet in, train.parquet out: the engine's own θt log-probs equal separate scoring."""
    cfg = _config(toy_build, "training.num_epochs=1")
    pairs = train_parquet.parent / "pairs.parquet"
    train_iteration(
        cfg,
        toy_job(
            toy_build,
            pairs,
            tmp_path / "state",
            tmp_path / "model",
            scored_path=tmp_path / "train.parquet",
        ),
    )
    ours, reference = pd.read_parquet(tmp_path / "train.parquet"), pd.read_parquet(train_parquet)
    for column in ("opponent_real_logps", "opponent_generated_logps"):
        np.testing.assert_allclose(ours[column], reference[column], atol=1e-5)
    log = _log(tmp_path / "state" / "metrics.jsonl")
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_zero3_scores_and_checks_health_through_the_engine_so_it_can_prefetch(
    toy_build, train_parquet
):
    """ZeRO-3 records the order it fetches parameters in between two of the engine's forward
    calls, then prefetches in that order. Scoring through the module itself never ends a
    recording: nothing is prefetched, and a health check would spoil the training trace."""
    from spin_core.score import frame_examples
    from spin_core.training.health import HealthProbe, check_health
    from spin_core.training.train import _score_opponent, _Trainer, init_distributed

    cfg = _config(toy_build, "training.zero_stage=3", "training.score_batch_tokens=512")
    init_distributed()
    trainer = _Trainer.build(str(toy_build.model_dir), cfg, 1e-6, 1)
    try:
        coordinator = trainer.engine.optimizer.parameter_offload.get_param_coordinator()
        pairs = pd.read_parquet(train_parquet.parent / "pairs.parquet")
        scored = _score_opponent(trainer.engine, pairs, cfg.training, trainer.pad_id, None, 1)
        assert coordinator.is_complete_trace()  # several batches, each through the engine
        reference = pd.read_parquet(train_parquet)
        for column in ("opponent_real_logps", "opponent_generated_logps"):
            np.testing.assert_allclose(scored[column], reference[column], atol=1e-5)
        probe = HealthProbe(frame_examples(pairs, "real_ids", cfg.training), -1.0, 10.0, 1, 512)
        check_health(trainer.engine, probe, trainer.pad_id, 1024, step=1)
        check_health(trainer.engine, probe, trainer.pad_id, 1024, step=2)
        assert coordinator.is_complete_trace()
    finally:
        trainer.close()


@pytest.mark.slow
def test_two_ranks_score_the_same_opponent_columns_as_one(toy_build, train_parquet, tmp_path):
    cfg = _config(toy_build, "training.num_epochs=1", "training.num_processes=2")
    job = _unscored_job(toy_build, train_parquet, tmp_path)
    from spin_core.training.launch import launch_training

    launch_training(cfg, job, on_step=lambda record: None)
    ours, reference = pd.read_parquet(tmp_path / "train.parquet"), pd.read_parquet(train_parquet)
    for column in ("opponent_real_logps", "opponent_generated_logps"):
        np.testing.assert_allclose(ours[column], reference[column], atol=1e-5)


def test_dropout_is_off_during_training(toy_build, train_parquet, tmp_path):
    """A θt whose config has dropout 0.1 still starts at loss ln 2: the policy equals θt."""
    from transformers import AutoConfig

    model_dir = tmp_path / "dropout-model"
    shutil.copytree(toy_build.model_dir, model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    config.attention_dropout = 0.1
    config.save_pretrained(model_dir)
    cfg = _config(toy_build, "training.num_epochs=1", f"model.name_or_path={model_dir}")
    result = train_iteration(
        cfg,
        TrainJob(
            init_model=str(model_dir),
            train_path=train_parquet,
            state_dir=tmp_path / "state",
            model_out=tmp_path / "model",
            iteration=0,
        ),
    )
    assert _log(result.log_path)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_sft_weight_is_logged_apart_and_zero_gives_the_papers_losses(
    toy_build, train_parquet, tmp_path
):
    def run(name: str, *extra: str) -> list[dict]:
        result = train_iteration(
            _config(toy_build, "training.num_epochs=1", *extra),
            toy_job(toy_build, train_parquet, tmp_path / name, tmp_path / f"m-{name}"),
            stop_after_steps=2,
        )
        return _log(result.log_path)

    paper, anchored = run("paper"), run("anchored", "training.sft_weight=0.5")
    assert "sft_nll" not in paper[0] and anchored[0]["sft_nll"] > 0
    # Step 1 starts at θt: the SPIN part is ln 2, the anchor adds 0.5 · NLL.
    assert anchored[0]["loss"] == pytest.approx(
        math.log(2) + 0.5 * anchored[0]["sft_nll"], abs=1e-5
    )
    assert paper[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert paper[0]["ties"] == 0.0  # identical pairs were dropped from this set


@pytest.fixture(scope="module")
def one_rank_reference(toy_build, train_parquet, tmp_path_factory):
    """1 rank, ZeRO-0, one log-prob chunk per forward: scores pairs.parquet, then trains."""
    folder = tmp_path_factory.mktemp("reference")
    train_iteration(
        _config(toy_build, "training.num_epochs=1", "training.zero_stage=0"),
        toy_job(
            toy_build,
            train_parquet.parent / "pairs.parquet",
            folder / "state",
            folder / "model",
            scored_path=folder / "train.parquet",
        ),
    )
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_with_many_logprob_chunks_equal_one_rank(
    zero_stage, toy_build, train_parquet, one_rank_reference, tmp_path
):
    """Several chunks per forward, in different numbers on each rank (their sequences differ
    in length), nothing resident under ZeRO-3: scoring and training still equal 1 rank.

    Each LM-head call is a collective under ZeRO-3, and a gradient hook under ZeRO-2; one
    call per chunk made the ranks disagree on how many there are, and the run aborted.
    Also: run.deterministic reaches every launched rank.
    """
    cfg = _config(
        toy_build,
        "training.num_epochs=1",
        "training.num_processes=2",
        f"training.zero_stage={zero_stage}",
        "training.logprob_chunk_size=4",
        "training.score_batch_tokens=512",  # several scoring batches, of different lengths
        ZERO3_ALL_PARTITIONED,
        "run.deterministic=true",
    )
    job = _unscored_job(toy_build, train_parquet, tmp_path)
    from spin_core.training.launch import launch_training

    lines: list[str] = []
    launch_training(cfg, job, on_step=lambda record: None, on_log=lines.append)
    for rank in (0, 1):
        assert any(f"rank {rank}: deterministic algorithms on (CUBLAS" in x for x in lines)
    ours = pd.read_parquet(tmp_path / "train.parquet")
    reference = pd.read_parquet(one_rank_reference / "train.parquet")
    for column in ("opponent_real_logps", "opponent_generated_logps"):
        np.testing.assert_allclose(ours[column], reference[column], atol=1e-4, rtol=0)
    a, b = _log(one_rank_reference / "state" / "metrics.jsonl"), _log(tmp_path / "state" / STEP_LOG)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-4)
        assert y["margin"] == pytest.approx(x["margin"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_accumulation_under_zero_2_and_3_is_summed_in_fp32(
    toy_build, train_parquet, tmp_path, stage
):
    """bf16, 2 micro-batches a step: DeepSpeed is told to accumulate in fp32 (its ZeRO-2/3
    optimizers honour data_types.grad_accum_dtype), and a run on the CPU in bf16 trains with it."""
    from spin_core.config import deepspeed_config

    cfg = _config(
        toy_build,
        "training.num_epochs=1",
        f"training.zero_stage={stage}",
        "model.precision=bf16",
        ZERO3_ALL_PARTITIONED,
    )
    assert cfg.training.accumulation_steps() == 2
    assert deepspeed_config(cfg.training, bf16=True)["data_types"] == {"grad_accum_dtype": "fp32"}
    one_step = cfg.training.model_copy(update={"micro_batch_size": 8})  # no accumulation
    assert "data_types" not in deepspeed_config(one_step, bf16=True)
    result = train_iteration(cfg, toy_job(toy_build, train_parquet, tmp_path / "s", tmp_path / "m"))
    losses = [r["loss"] for r in _log(result.log_path)]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses)
