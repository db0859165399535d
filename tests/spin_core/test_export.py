"""What a training iteration leaves behind on a GPU box: the exported weights (from the fp32
master copy, the fraction that changed), the memory it frees, the RNG state it saves, the
DeepSpeed and pre-flight settings it runs under, and what rank 1 does at a ZeRO-3 export."""

import gc
import json
import logging
import os
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file

from spin_core.config import deepspeed_config, load_config
from spin_core.storage.rundir import RunDir
from spin_core.training.job import TrainJob
from tests.spin_core.test_train import _config, toy_job, train_parquet  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def bf16_theta0(toy_build, tmp_path_factory):
    """The toy θ0 stored in bf16, as zephyr-7b-sft-full and SmolLM2 are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16-theta0")
    model = AutoModelForCausalLM.from_pretrained(toy_build.model_dir, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(toy_build.model_dir).save_pretrained(out)
    return out


def test_loading_a_model_leaves_the_default_dtype_as_it_was(bf16_theta0, monkeypatch):
    """Also when the load fails after transformers switched it to the model's dtype."""
    from transformers import AutoModelForCausalLM

    from spin_core.errors import InputError
    from spin_core.storage.models import load_model

    load_model(str(bf16_theta0), dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32

    def fails_midway(*args, **kwargs):
        torch.set_default_dtype(torch.bfloat16)
        raise OSError("a shard is truncated")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fails_midway)
    with pytest.raises(InputError, match="a shard is truncated"):
        load_model(str(bf16_theta0), dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def _changed(new: dict, old: dict) -> float:
    keys = [k for k in old if k in new]
    diff = sum(int((new[k].float() != old[k].float()).sum()) for k in keys)
    return diff / sum(old[k].numel() for k in keys)


@pytest.mark.parametrize("export_dtype", ["fp32", "bf16"])
def test_bf16_training_exports_the_fp32_master_update_or_says_it_was_lost(
    export_dtype,
    toy_build,
    bf16_theta0,
    train_parquet,  # noqa: F811
    tmp_path,
    caplog,
):
    """bf16 compute, ZeRO-0, lr 1e-6, 4 steps with accumulation 2: the update lives in the fp32
    master weights. Exported in fp32 it is kept; in bf16 it rounds away (θ1 = θ0 almost
    everywhere), which metrics.json, metrics.parquet and the report then say."""
    from spin_core.reports.report import write_report
    from spin_core.training.state import training_summary
    from spin_core.training.train import train_iteration
    from tests.spin_core.test_report import write_eval

    run = RunDir(tmp_path / "run")
    cfg = _config(
        toy_build,
        f"model.name_or_path={bf16_theta0}",
        "model.precision=bf16",
        "training.learning_rate=1e-6",
        "training.num_epochs=1",
        "training.zero_stage=0",
        f"training.export_dtype={export_dtype}",
    )
    with caplog.at_level(logging.WARNING, logger="spin_core.training.train"):
        train_iteration(
            cfg,
            TrainJob(
                init_model=str(bf16_theta0),
                train_path=train_parquet,
                state_dir=run.train_state(0),
                model_out=run.model(0),
                iteration=0,
                num_steps=4,
            ),
            stop_after_steps=None,
        )
    exported, theta0 = _weights(run.model(0)), _weights(bf16_theta0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[export_dtype]
    assert {t.dtype for t in exported.values()} == {dtype}
    changed = _changed(exported, theta0)
    summary = json.loads((run.train_state(0) / "export.json").read_text())
    assert summary["weights_changed"] == pytest.approx(changed)
    # What generation and evaluation, in bf16, see of it: the fp32 file's change is mostly
    # below bf16's spacing, so it is the bf16 export's.
    as_computed = _changed({k: v.to(torch.bfloat16) for k, v in exported.items()}, theta0)
    assert summary["weights_changed_as_computed"] == pytest.approx(as_computed)
    assert as_computed < 0.01
    lost = [r for r in caplog.records if "update was mostly lost" in r.getMessage()]
    if export_dtype == "fp32":
        assert changed > 0.5 and not lost  # measured: 0.992
    else:
        assert changed < 0.01 and lost  # measured: 0.0078 (θ1 = θ0 in 99.2 %)
    # metrics.json → metrics.parquet and the report
    (run.iteration(0) / "pairs.json").write_text(json.dumps({"train_pairs": 64}))
    write_eval(run.theta0(), right=20, loglik_per_token=-1.0)
    metrics = write_eval(run.iteration(0), right=21, loglik_per_token=-1.0)
    (run.iteration_metrics(0)).write_text(json.dumps(metrics | training_summary(run, 0)))
    report, table = write_report(run.root)
    assert table.loc[table["iteration"] == 1, "weights_changed"].item() == pytest.approx(changed)
    text = report.read_text()
    assert "weights changed vs θt" in text
    assert ("the training update was mostly lost" in text) == (export_dtype == "bf16")
    assert ("once rounded to bfloat16" in text) == (export_dtype == "fp32")


def test_the_engine_is_freed_when_training_returns(toy_build, train_parquet, tmp_path, monkeypatch):  # noqa: F811
    """With the cyclic GC off (as when it has not run yet), the engine and its optimizer,
    which refer to each other, are still freed when the in-process training returns."""
    from spin_core.training import train

    engines = []
    build = train._Trainer.build.__func__

    def recording_build(cls, *args, **kwargs):
        trainer = build(cls, *args, **kwargs)
        engines.append(weakref.ref(trainer.engine))
        return trainer

    monkeypatch.setattr(train._Trainer, "build", classmethod(recording_build))
    gc.collect()
    gc.disable()
    try:
        train.train_iteration(
            _config(toy_build, "training.num_epochs=1"),
            toy_job(toy_build, train_parquet, tmp_path / "state", tmp_path / "model", num_steps=1),
        )
        assert len(engines) == 1 and engines[0]() is None, "the DeepSpeed engine is still alive"
    finally:
        gc.enable()


def test_deterministic_mode_sets_the_flag_and_the_cublas_workspace(monkeypatch):
    from spin_core.training.train import use_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        use_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_rng_state_is_this_ranks_gpu_only(monkeypatch):
    """Saved on rank 1 of an 8-GPU node, restored on a worker that sees one GPU."""
    from spin_core.training import state as train_state

    calls = []

    def no_all(*args, **kwargs):
        raise AssertionError("the RNG states of every visible GPU were used")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d)) or d)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", s, d)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_all)
    monkeypatch.setenv("LOCAL_RANK", "1")
    state = train_state.rng_state()
    monkeypatch.setenv("LOCAL_RANK", "0")
    train_state.set_rng_state(state)
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert calls == [("get", gpu1), ("set", gpu1, gpu0)]


def test_bf16_at_zero_0_accumulates_gradients_in_fp32_and_preflight_counts_it():
    """One GPU, bf16, 8 accumulation micro-batches: DeepSpeed's BF16_Optimizer (ZeRO-1 with
    fp32 accumulation) instead of summing bf16 gradients; the pre-flight adds its
    persistent fp32 gradient buffer (4 B/param) and drops the step-time fp32 copy."""
    from spin_core.training.memory import GIB, ModelShape, memory_for

    cfg = load_config(
        "configs/demo.yaml",
        [
            "training.num_processes=1",
            "training.zero_stage=0",
            "training.micro_batch_size=8",
            "training.global_batch_size=64",
            "training.optimizer=rmsprop",
        ],
    )
    assert cfg.training.accumulation_steps() == 8
    bf16 = deepspeed_config(cfg.training, bf16=True)
    assert bf16["zero_optimization"]["stage"] == 1
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = deepspeed_config(cfg.training, bf16=False)
    assert fp32["zero_optimization"]["stage"] == 0 and "data_types" not in fp32

    psi = 7_241_732_096  # Mistral-7B
    shape = ModelShape(
        name_or_path="mistral-7b",
        model_type="mistral",
        parameters=psi,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        gated_mlp=True,
        largest_module=32000 * 4096,
    )
    cfg.model.precision = "bf16"
    memory = memory_for(cfg, shape, max_length=1024)
    names = [row.name for row in memory.rows]
    assert "fp32 gradient accumulation (BF16_Optimizer)" in names
    assert memory.states == pytest.approx((2 + 2 + 4 + 4 + 4) * psi)  # RMSprop, 16 B/param
    assert memory.optimizer_step == 0
    assert memory.peak / GIB > 110  # does not fit an 80 GB GPU; the old 12Ψ + step did less
    three = memory_for(cfg, shape, max_length=1024, num_processes=8, zero_stage=3)
    assert "fp32 gradient accumulation (BF16_Optimizer)" not in [r.name for r in three.rows]


def test_optimizers_step_one_parameter_at_a_time(toy_build):
    """No foreach: its sqrt(state) temporary for every parameter at once is 4 B/param."""
    from spin_core.training.train import _build_optimizer

    model = torch.nn.Linear(4, 4)
    for name in ("rmsprop", "adamw"):
        cfg = load_config("configs/demo.yaml", [f"training.optimizer={name}"])
        assert _build_optimizer(model, cfg.training, 1e-6).defaults["foreach"] is False


SLOW_WRITE = 3.0  # seconds rank 0's write of the export takes in the test below


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_training_starts_from_the_fp32_weights_of_theta_t(toy_build, stage):
    """The fp32 export keeps what bf16 would round away; the next iteration's optimizer starts
    from it too, not from the bf16 module copy DeepSpeed builds its masters from."""
    from deepspeed.utils import safe_get_full_fp32_param

    from spin_core.training import train

    cfg = load_config(
        "configs/demo.yaml",
        [
            f"model.name_or_path={toy_build.model_dir}",
            "model.precision=bf16",
            f"training.zero_stage={stage}",
            "training.global_batch_size=8",
            "training.micro_batch_size=4",
        ],
    )
    train.init_distributed()
    stored = _weights(toy_build.model_dir)  # fp32, random: not representable in bf16
    trainer = train._Trainer.build(str(toy_build.model_dir), cfg, 1e-6, 1)
    try:
        masters = {
            name: safe_get_full_fp32_param(param)
            for name, param in trainer.engine.module.policy.named_parameters()
        }
        assert masters.keys() <= stored.keys()
        for name, master in masters.items():
            assert master.dtype == torch.float32
            torch.testing.assert_close(master.cpu(), stored[name], rtol=0, atol=0)
    finally:
        trainer.close()


def test_collectives_wait_as_long_as_the_config_says(monkeypatch):
    """DeepSpeed's default, 10 minutes, is shorter than a 7B checkpoint save on slow storage."""
    import deepspeed
    import torch.distributed as dist

    from spin_core.training.train import init_distributed

    asked = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: asked.update(kwargs))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(
        "configs/zephyr-7b-ultrachat.yaml", ["training.collective_timeout_minutes=90"]
    )
    init_distributed(cfg.training.collective_timeout_minutes)
    assert asked["timeout"].total_seconds() == 90 * 60


def _export_rank(rank, port, model_dir, out_dir, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["WORLD_SIZE"] = "2"
    from spin_core.training import export, train
    from tests.spin_core.test_train import ZERO3_ALL_PARTITIONED

    cfg = load_config(
        "configs/demo.yaml",
        [
            f"model.name_or_path={model_dir}",
            "training.num_processes=2",
            "training.zero_stage=3",
            "training.global_batch_size=8",
            "training.micro_batch_size=4",
            ZERO3_ALL_PARTITIONED,
        ],
    )
    train.init_distributed()
    copies = []
    real_copy = export.host_copy

    def counting_copy(tensor, rank):
        copy = real_copy(tensor, rank)
        if copy is not None:
            copies.append(copy.numel() * copy.element_size())
        return copy

    export.host_copy = counting_copy
    real_save = export.save_model_dir

    def slow_save(*args, **kwargs):  # slow shared storage
        time.sleep(SLOW_WRITE)
        real_save(*args, **kwargs)
        results["written"] = time.monotonic()

    export.save_model_dir = slow_save
    trainer = train._Trainer.build(str(model_dir), cfg, 1e-6, 1)
    export.export_model(
        trainer.engine,
        trainer.tokenizer,
        out_dir,
        rank,
        3,
        torch.float32,
        base=(str(model_dir), cfg.model),
    )
    results[rank] = sum(copies)
    results[f"returned {rank}"] = time.monotonic()


@pytest.mark.slow
def test_zero3_export_copies_to_host_memory_on_rank_0_only(toy_build, tmp_path):
    """And the other ranks do not wait for rank 0's write: the atomic rename says it is done,
    and a rank waiting in a collective is killed at the collective timeout."""
    import torch.multiprocessing as mp

    from spin_core.training.launch import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            _export_rank,
            args=(free_port(), toy_build.model_dir, tmp_path / "model", results),
            nprocs=2,
        )
        copied = dict(results)
    theta0 = _weights(toy_build.model_dir)
    assert copied[1] == 0
    assert copied[0] == sum(t.numel() * 4 for t in theta0.values())
    # Rank 1 did not wait for rank 0's write (7B: 28 GB) within the collective timeout.
    assert copied["returned 1"] < copied["written"] - SLOW_WRITE / 2
    exported = _weights(tmp_path / "model")
    assert exported.keys() == theta0.keys()
    for key, tensor in theta0.items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0)


def test_a_lora_update_on_a_bf16_model_is_merged_and_exported_in_fp32(
    toy_build,
    bf16_theta0,
    train_parquet,  # noqa: F811
    tmp_path,
):
    """bf16 θt and compute, a small adapter update (lr 1e-6, 4 steps): merged into a fresh
    fp32 θt and exported in fp32, it changes the adapted weights; merged into the bf16
    module (as before) it vanished into bf16's spacing."""
    from spin_core.training.train import train_iteration

    cfg = _config(
        toy_build,
        f"model.name_or_path={bf16_theta0}",
        "model.precision=bf16",
        "training.lora.r=4",
        "training.lora.alpha=8",
        "training.learning_rate=1e-6",
        "training.num_epochs=1",
    )
    train_iteration(
        cfg,
        TrainJob(
            init_model=str(bf16_theta0),
            train_path=train_parquet,
            state_dir=tmp_path / "state",
            model_out=tmp_path / "model",
            iteration=0,
            num_steps=4,
        ),
    )
    exported, theta0 = _weights(tmp_path / "model"), _weights(bf16_theta0)
    assert exported.keys() == theta0.keys()
    targets = cfg.training.lora.target_modules
    adapted = {k: v for k, v in theta0.items() if any(f".{t}." in k for t in targets)}
    frozen = {k: v for k, v in theta0.items() if k not in adapted}
    assert adapted and _changed(exported, adapted) > 0.5  # measured: 0.99
    assert _changed(exported, frozen) == 0
    summary = json.loads((tmp_path / "state" / "export.json").read_text())
    assert summary["export_dtype"] == "float32" and 0 < summary["weights_changed"] < 1
