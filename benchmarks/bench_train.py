"""Training: spin's trainer versus TRL's DPOTrainer on the same model, data, batch and steps.

spin: the pipeline's training step as it is now, `spin_core.training.train.train_iteration`
given the *unscored* pairs (pairs.parquet: token ids, no opponent log-probs); the
engine scores them with θt's weights before its first optimizer step (no second
model in memory, no separate scoring step) and writes train.parquet. Its time is
split into load, scoring, steps, checkpoint and export, timed around the library's
own calls (`_common.TrainPhases`). TRL: `DPOTrainer` with `loss_type=["sigmoid"]`
and the reference model evaluated online at every step, as the official SPIN
trainer (a fork of TRL's DPO trainer) does. Both start from the same weights, use
the same optimizer (RMSprop), learning-rate schedule, β, clipping and fp32, and go
over the same (prompt, real, generated) pairs in the same number of optimizer
steps; the pairs are θ0's own greedy generations against the toy data (the
pipeline's sample, generate and build steps), identical ones dropped. spin trains
on the stored ids; TRL re-tokenizes the texts: the benchmark asserts that it gets
the same prompt + real tokens, and counts the generated responses whose re-encoding
differs from the ids the opponent produced. Each side runs in its own process, so its
peak RSS is its own.
Without TRL installed (`pip install -e '.[bench]'`), only spin's side runs.

`--model smollm2` (the default): the real chat model SmolLM2-135M-Instruct on natural-
language chat-task pairs (`spin_core/chat_tasks.py`: the prompt, its real answer, and the
model's own greedy answer from spin's generation step). Its `mfu` is 6·parameters ×
trained tokens/s per optimizer step ÷ the fp32 torch.mm FLOP/s measured in the same run
at the model's shapes (`_common.matmul_peak`, before and after the two sides, the higher
kept). `--model toy`: the toy θ0 (1M parameters, where fixed costs dominate) and a wider
Llama with the same tokenizer (~57M parameters, randomly initialised).

    python -m benchmarks.bench_train               # SmolLM2: ≥ 1.10× TRL's tokens/s, mfu ≥ 0.5
    python -m benchmarks.bench_train --model toy   # ≥ 1.3× TRL's tokens/s, ≤ 0.6× its peak memory
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _common
from spin_core.training.job import TrainJob

TARGET_SPEED = 1.3
# The real model: TRL's step runs the reference forward too (2N of its 8N FLOPs a token), spin
# scores once: over 2 epochs spin does 6+6+2 = 14 against TRL's 16, a bound of 8/7 = 1.14×.
TARGET_SPEED_SMOLLM2 = 1.10
TARGET_MFU = 0.5
PEAK_TOKENS = 1024  # rows of the timed torch.mm: about one micro-batch of 8 pairs
BENCH_MAX_LENGTH = 128  # training.max_length of _common.BENCH_CONFIG
TARGET_MEMORY = 0.6
LOSS_TOLERANCE = 1e-4  # fp32 (this benchmark's precision); bf16 would need ~1e-2
LEARNING_RATE = 1e-5
BETA = 0.1
SEED = 42

# name -> (pairs, batch, epochs, wider architecture or None for the toy θ0 itself)
SETUPS = {
    "toy": (1024, 32, 2, None),
    # The paper's 2 epochs per iteration, so scoring once is amortised as in a real run.
    "wide": (96, 8, 2, {"hidden_size": 768, "num_layers": 8, "num_heads": 12}),
}
QUICK_SETUPS = {
    "toy": (128, 32, 1, None),
    "wide": (16, 8, 1, {"hidden_size": 256, "num_layers": 4, "num_heads": 4}),
}
# --model smollm2: 2 steps an epoch of 8 pairs (16 sequences of ~70 tokens), 2 epochs (small:
# one step took 1-4 min at one thread on the loaded 2-core machine of docs/PERFORMANCE.md).
SMOLLM2_SETUP = {"smollm2": (16, 8, 2, "smollm2")}
SMOLLM2_QUICK_SETUP = {"smollm2": (8, 4, 1, "smollm2")}


# ------------------------------------------------------------------- inputs


def prepare_pairs(num_pairs: int, model: str = "toy") -> Path:
    """`num_pairs` unscored pairs (pairs.parquet): θ0's greedy answers, identical ones dropped."""
    import pyarrow.parquet as pq

    from spin_core import data
    from spin_core.storage.files import write_parquet_atomic

    suffix = "" if model == "toy" else f"-{model}"
    path = _common.CACHE / "train" / f"pairs-{num_pairs}{suffix}.parquet"
    # A cache from before the ids data model (texts only) is rebuilt.
    if path.exists() and set(data.TRAINING_COLUMNS) <= set(pq.read_schema(path).names):
        return path
    if model == "smollm2":
        return _prepare_chat_pairs(num_pairs, path)
    cfg = _common.toy_config()
    train_pairs = len(data.load_sft_data(cfg.data)[0])
    # About 40% of θ0's answers equal the real ones and are dropped; draw enough prompts.
    sample = _common.sample_with_ids(cfg, min(train_pairs, num_pairs * 2 + 64), seed=SEED)
    with tempfile.TemporaryDirectory(dir=_common.CACHE) as tmp:
        training_set, _ = _common.generate_and_build(cfg, sample, Path(tmp))
    if len(training_set) < num_pairs:
        raise RuntimeError(f"only {len(training_set)} non-identical pairs, need {num_pairs}")
    return write_parquet_atomic(training_set.head(num_pairs), path)


def _prepare_chat_pairs(num_pairs: int, path: Path) -> Path:
    """The real model's pairs: chat-task prompts and answers, SmolLM2's own greedy answers
    generated by spin's generation step (`_common.generate_and_build`), identical ones dropped."""
    from spin_core.storage.files import write_parquet_atomic

    cfg = spin_config(_common.smollm2_dir(), 8, 1, "smollm2")
    sample = _common.with_ids(_common.chat_sample(num_pairs + 8, seed=SEED), cfg)
    with tempfile.TemporaryDirectory(dir=_common.CACHE) as tmp:
        training_set, _ = _common.generate_and_build(cfg, sample, Path(tmp))
    if len(training_set) < num_pairs:
        raise RuntimeError(f"only {len(training_set)} non-identical pairs, need {num_pairs}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_parquet_atomic(training_set.head(num_pairs), path)


def prepare_model(name: str, architecture: dict | str | None) -> Path:
    """The toy θ0, or a wider Llama with its tokenizer (randomly initialised, seeded)."""
    from spin_core import toy
    from spin_core.storage.models import load_tokenizer, save_model_dir

    if architecture == "smollm2":
        return _common.smollm2_dir()
    theta0 = _common.toy().model_dir
    if architecture is None:
        return theta0
    path = _common.CACHE / "train" / f"model-{name}-{architecture['hidden_size']}"
    if (path / "config.json").exists():
        return path
    tokenizer = load_tokenizer(str(theta0))
    width = architecture["hidden_size"]
    model = toy.build_model(tokenizer, intermediate_size=8 * width // 3, seed=SEED, **architecture)
    return save_model_dir(model, tokenizer, path)


def count_tokens(pairs_path: Path, training) -> int:
    """Non-padding tokens of one epoch: prompt + real and prompt + generated of every pair,
    from the stored ids at the training limits (what the trainer feeds the model)."""
    import pandas as pd

    from spin_core.score import frame_examples

    frame = pd.read_parquet(pairs_path)
    return sum(
        sum(frame_examples(frame, column, training).lengths())
        for column in ("real_ids", "generated_ids")
    )


def spin_config(model_dir: Path, batch: int, epochs: int, model: str = "toy"):
    """The benchmark config (RMSprop, fp32, ZeRO 0, max_length 128) at this batch size.

    The opponent is scored in batches of one training micro-batch of pairs (both
    responses at max_length), the batch TRL's in-step reference forward sees. On this
    CPU a larger budget is slower: scoring the 57M model's 192 sequences took 10.9 s at
    the default 32,768 tokens, 8.2 s at 2,048 and 6.3-6.9 s at 1,024 (activations that
    no longer fit the caches); on a GPU the default's larger batches are the faster ones.
    """
    base = _common.smollm2_config if model == "smollm2" else _common.toy_config
    return base(
        [
            f"training.score_batch_tokens={batch * 2 * BENCH_MAX_LENGTH}",
            f"model.name_or_path={model_dir}",
            f"training.global_batch_size={batch}",
            f"training.micro_batch_size={batch}",
            f"training.num_epochs={epochs}",
            f"training.learning_rate={LEARNING_RATE}",
            f"training.beta={BETA}",
            f"training.seed={SEED}",
            "training.save_steps=100000",  # one DeepSpeed checkpoint, at the end
        ]
    )


# ---------------------------------------------------------------- one side


def peak_memory() -> dict:
    import torch

    figures = {"peak_rss_mib": round(_common.peak_rss_mib(), 1)}
    if torch.cuda.is_available():
        figures["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return figures


def run_spin(args, out_dir: Path) -> dict:
    """The pipeline's training step: `train_iteration` on the unscored pairs, scoring inside."""
    import deepspeed  # noqa: F401 - imported by train_iteration; counted before the baseline RSS

    from spin_core.training import train

    cfg = spin_config(args.model_dir, args.batch, args.epochs, args.model)
    rss_before = _common.current_rss_mib()
    phases = _common.TrainPhases()
    with phases.timing():
        train.train_iteration(
            cfg,
            TrainJob(
                init_model=str(args.model_dir),
                train_path=args.pairs,
                scored_path=out_dir / "train.parquet",
                state_dir=out_dir / "train_state",
                model_out=out_dir / "model",
                iteration=0,
            ),
            on_step=phases.on_step,
            on_phase=phases.on_phase,
        )
    split = phases.split()
    return {
        "seconds": split["total"],
        "phases": split,
        "step_seconds": phases.step_seconds(),
        "losses": [record["loss"] for record in phases.records],
        "rss_before_mib": round(rss_before, 1),
        **peak_memory(),
    }


def run_trl(args, out_dir: Path) -> dict:
    """TRL's DPOTrainer, sigmoid loss, reference model evaluated online at every step."""
    import pandas as pd
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cfg = spin_config(args.model_dir, args.batch, args.epochs, args.model)
    pairs = pd.read_parquet(args.pairs)
    rss_before = _common.current_rss_mib()
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in pairs["prompt"]],
            "chosen": [[{"role": "assistant", "content": r}] for r in pairs["real"]],
            "rejected": [[{"role": "assistant", "content": g}] for g in pairs["generated"]],
        }
    )
    config = DPOConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        num_train_epochs=args.epochs,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=cfg.training.warmup_ratio,  # a float < 1 is a ratio, rounded up like spin's
        optim="rmsprop",
        weight_decay=cfg.training.weight_decay,
        max_grad_norm=cfg.training.max_grad_norm,
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        max_length=cfg.training.max_length,
        bf16=False,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        logging_steps=1,
        # One full checkpoint (model, optimizer, scheduler, RNG) after the last step, as spin saves.
        save_strategy="steps",
        save_steps=args.steps,
        report_to="none",
        seed=SEED,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimes()],
    )
    train_started = time.perf_counter()
    trainer.train()
    trainer.save_model(str(out_dir / "model"))
    seconds, train_seconds = time.perf_counter() - started, time.perf_counter() - train_started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens_checked = _same_tokens_as_spin(trainer.train_dataset, pairs, cfg, tokenizer.eos_token_id)
    return {
        "seconds": seconds,
        "train_seconds": train_seconds,
        "step_seconds": _durations(train_started, step_ends),
        "losses": losses,
        "tokens_checked": tokens_checked,
        "rss_before_mib": round(rss_before, 1),
        **peak_memory(),
    }


def _same_tokens_as_spin(dataset, pairs, cfg, eos: int) -> dict:
    """Check that TRL trains on the tokens spin trains on (the stored ids, at the limits).

    Prompt + real must match exactly (both are the SFT tokenization of the chat), but
    for what a chat template writes after the end-of-turn token: SmolLM2's ends every
    turn with `<|im_end|>` and a newline, TRL keeps the newline (one more token a
    response, on both sides of a pair) and spin stops at EOS; such responses are counted.
    TRL re-tokenizes the *decoded* generated text, which need not give back the
    ids the opponent produced (spin trains on those); such pairs are counted.
    """
    from spin_core.score import frame_examples

    def up_to_eos(ids: list[int]) -> tuple[list[int], int]:
        """`ids` cut after their last EOS, and how many tokens followed it."""
        if eos not in ids:
            return ids, 0
        end = len(ids) - ids[::-1].index(eos)
        return ids[:end], len(ids) - end

    real = frame_examples(pairs, "real_ids", cfg.training)
    generated = frame_examples(pairs, "generated_ids", cfg.training)
    reencoded_differs = after_eos = 0
    for i, row in enumerate(dataset):
        chosen, extra_chosen = up_to_eos(row["prompt_ids"] + row["chosen_ids"])
        rejected, extra_rejected = up_to_eos(row["prompt_ids"] + row["rejected_ids"])
        assert chosen == list(real.input_ids[i]), f"pair {i}: real"
        after_eos += extra_chosen + extra_rejected
        reencoded_differs += rejected != list(generated.input_ids[i])
    return {
        "pairs_checked": len(dataset),
        "generated_reencoded_differs": int(reencoded_differs),
        "tokens_after_eos": int(after_eos),
    }


def _durations(started: float, ends: list[float]) -> list[float]:
    return [round(b - a, 4) for a, b in zip([started, *ends], ends, strict=False)]


def run_side(args) -> None:
    _common.setup(args.threads)
    run = run_spin if args.side == "spin" else run_trl
    with tempfile.TemporaryDirectory(dir=_common.CACHE) as tmp:
        if args.profile:
            profile = cProfile.Profile()
            result = profile.runcall(run, args, Path(tmp))
            name = f"profile-train-{args.model_dir.name}-{args.side}.txt"
            with (_common.CACHE / name).open("w") as out:
                pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(60)
        else:
            result = run(args, Path(tmp))
    print(json.dumps({"side": args.side, **result}), flush=True)


# ------------------------------------------------------------- comparison


def trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None


def model_peak(model_dir: Path) -> float:
    """fp32 matmul FLOP/s at the model's shapes, in this process at its thread count."""
    from transformers import AutoConfig

    return _common.matmul_peak(AutoConfig.from_pretrained(str(model_dir)), tokens=PEAK_TOKENS)


def compare(name: str, setup: tuple, args) -> None:
    num_pairs, batch, epochs, architecture = setup
    pairs = prepare_pairs(num_pairs, args.model)
    model_dir = prepare_model(name, architecture)
    cfg = spin_config(model_dir, batch, epochs, args.model)
    tokens = epochs * count_tokens(pairs, cfg.training)
    steps = epochs * math.ceil(num_pairs / batch)
    common = ["--profile"] if args.profile else []
    common += [
        f"--pairs={pairs}",
        f"--model-dir={model_dir}",
        f"--batch={batch}",
        f"--epochs={epochs}",
        f"--steps={steps}",
        f"--threads={args.threads}",
        f"--model={args.model}",
    ]
    peaks = [model_peak(model_dir)]
    spin = _common.run_json("benchmarks.bench_train", "--side=spin", *common)
    assert len(spin["losses"]) == steps, f"steps: spin {len(spin['losses'])}, expected {steps}"
    # θ(t+1) starts as θt and the engine scored the pairs with those weights: ln 2.
    assert abs(spin["losses"][0] - math.log(2)) <= LOSS_TOLERANCE, spin["losses"][0]
    trl = None
    if trl_installed():
        trl = _common.run_json("benchmarks.bench_train", "--side=trl", *common)
        assert len(trl["losses"]) == steps, f"steps: TRL {len(trl['losses'])}, expected {steps}"
        first_gap = abs(spin["losses"][0] - trl["losses"][0])
        assert first_gap <= LOSS_TOLERANCE, (
            f"first-step losses differ by {first_gap:.2e}: spin {spin['losses'][0]}, "
            f"TRL {trl['losses'][0]}"
        )
    else:
        print(
            "trl is not installed (pip install -e '.[bench]'): spin's side only, no comparison",
            file=sys.stderr,
        )

    def steady(side: dict) -> float:
        # Steps after the first (one-off costs) at the mean tokens per step.
        return (tokens / steps) / statistics.mean(side["step_seconds"][1:] or side["step_seconds"])

    peaks.append(model_peak(model_dir))
    peak = max(peaks)
    memory_key = "peak_cuda_mib" if "peak_cuda_mib" in spin else "peak_rss_mib"
    parameters = _common.parameter_count(model_dir)
    label = model_dir.name if architecture == "smollm2" else f"{name} Llama"
    figures = {
        "model": f"{label}, {parameters / 1e6:.2f}M parameters",
        "pairs": num_pairs,
        "batch": batch,
        "steps": steps,
        "tokens": tokens,
        "first_loss_spin": round(spin["losses"][0], 6),
        "spin_s": round(spin["seconds"], 2),
        # train_iteration's phases: load, scoring (inside training), steps, checkpoint, export.
        **{f"spin_{k}_s": v for k, v in spin["phases"].items() if k != "total"},
        "spin_tokens_per_s": round(tokens / spin["seconds"], 1),
        "spin_step_tokens_per_s": round(steady(spin), 1),
        "memory": memory_key,
        "spin_rss_before_mib": spin["rss_before_mib"],
        "spin_peak_mib": spin[memory_key],
        "trl": "installed" if trl else "not installed: spin only",
        "threads": args.threads,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_before_after_gflops": [round(p / 1e9, 1) for p in peaks],
        "mfu": round(6 * parameters * steady(spin) / peak, 3),
        "mfu_end_to_end": round(6 * parameters * tokens / spin["seconds"] / peak, 3),
    }
    met = None
    if trl:
        speed = trl["seconds"] / spin["seconds"]
        memory = spin[memory_key] / trl[memory_key]
        figures |= {
            "first_loss_trl": round(trl["losses"][0], 6),
            "trl_s": round(trl["seconds"], 2),
            "trl_tokens_per_s": round(tokens / trl["seconds"], 1),
            "speed_ratio": round(speed, 2),
            "trl_step_tokens_per_s": round(steady(trl), 1),
            "step_speed_ratio": round(steady(spin) / steady(trl), 2),
            "trl_rss_before_mib": trl["rss_before_mib"],
            "trl_peak_mib": trl[memory_key],
            "memory_ratio": round(memory, 3),
            "trl_generated_reencoded_differs": trl["tokens_checked"]["generated_reencoded_differs"],
            # Tokens TRL trains on after a response's EOS (the template's newline), spin does not.
            "trl_tokens_after_eos": trl["tokens_checked"].get("tokens_after_eos", 0),
        }
        figures["trl_mfu"] = round(6 * parameters * steady(trl) / peak, 3)
        met = speed >= TARGET_SPEED and memory <= TARGET_MEMORY
    target = f"tokens/s >= {TARGET_SPEED}x TRL and peak memory <= {TARGET_MEMORY}x TRL"
    if architecture == "smollm2":
        target = f"tokens/s >= {TARGET_SPEED_SMOLLM2}x TRL end to end and mfu >= {TARGET_MFU}"
        met = None  # without TRL there is no comparison
        if trl:
            met = figures["mfu"] >= TARGET_MFU and speed >= TARGET_SPEED_SMOLLM2
    _common.emit(
        "train" if name == "toy" else f"train_{name}",
        figures,
        target=target,
        met=met,
        quick=args.quick,
    )


def main() -> None:
    _common.offline()
    args = _common.training_parser(__doc__.splitlines()[0], ["spin", "trl"])
    args.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args.add_argument(
        "--profile", action="store_true", help="write a cProfile summary of each side to .cache/"
    )
    args.add_argument(
        "--only", choices=sorted(SETUPS), help="with --model toy: run one of its model setups"
    )
    _common.add_model_argument(args)
    args = args.parse_args()
    if args.side:
        run_side(args)
        return
    _common.setup(args.threads)
    _common.warm_up_deepspeed()
    if args.model == "smollm2":
        setups = SMOLLM2_QUICK_SETUP if args.quick else SMOLLM2_SETUP
    else:
        setups = QUICK_SETUPS if args.quick else SETUPS
    for name, setup in setups.items():
        if args.only in (None, name):
            compare(name, setup, args)


if __name__ == "__main__":
    main()
