"""Generation: spin's generation step versus one `generate` call per prompt and HF batched `generate`.

The per-prompt loop is how public SPIN write-ups generate y': format the prompt
with the chat template, call `model.generate` on it alone, decode. spin's step is
`spin_core.generation` as the pipeline runs it: the prompts' ids from
`spin_core.prompts.encode_prompts` (what the sample step stores as `prompt_ids`),
`make_backend` (batched, length-sorted, left-padded greedy decoding), `generate_shards`
writing the Parquet shards with the generated ids. Same toy θ0, same prompts, same
greedy settings; the outputs must be identical, token for token (the loop's new ids
against the shards' `generated_ids`). A third side is HF's batched `model.generate` over
the same left-padded prompts (one call per `--hf-batch` prompts), whose rows keep
decoding until the longest one stops; its outputs are compared, not asserted (padding
may change fp32 rounding).

`fraction_of_matmul_peak` is spin's generated tokens/s × 2·parameters over the fp32
torch.mm FLOP/s measured in the same run at the model's shapes (`_common.matmul_peak`,
before and after the timed rounds, the higher kept).

    python -m benchmarks.bench_generate                # SmolLM2-135M-Instruct, 64 chat prompts,
                                                       # 48 new tokens; target ≥ 10×, ≥ 0.4 of peak
    python -m benchmarks.bench_generate --model toy    # the toy θ0, 512 prompts; target ≥ 20×
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import torch

from benchmarks import _common

TARGET_SPEEDUP = {"toy": 20.0, "smollm2": 10.0}
TARGET_FRACTION = 0.4  # of the fp32 matmul peak, on the real model
# model -> (prompts, quick prompts, max_new_tokens, rounds)
SIZES = {"toy": (512, 64, 32, 3), "smollm2": (64, 8, 48, 1)}


@torch.no_grad()
def per_prompt_loop(model, tokenizer, prompts: list[str], max_new_tokens: int):
    """(texts, new token ids incl. EOS): one greedy `generate` call per prompt."""
    texts, ids = [], []
    eos = tokenizer.eos_token_id
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )  # (1, prompt + new)
        new = output[0, inputs["input_ids"].shape[1] :].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        ids.append(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts, ids


@torch.no_grad()
def hf_batched(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """New token ids incl. EOS: HF `generate` over `batch_size` left-padded prompts at a time."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
            )
            for p in prompts[start : start + batch_size]
        ]
        rows = [r["input_ids"] if hasattr(r, "keys") else r for r in rows]
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for j, row in enumerate(rows):
            input_ids[j, longest - len(row) :] = torch.tensor(row)
            attention_mask[j, longest - len(row) :] = 1
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )  # (batch, longest + new): finished rows are padded to the longest
        for row in output[:, longest:].tolist():
            ids.append(row[: row.index(eos) + 1] if eos in row else row)
    return ids


def spin_generation(model, tokenizer, prompts: list[str], cfg, out_dir: str):
    """(texts, generated token ids): spin_core's generation step into Parquet shards."""
    from spin_core import generation
    from spin_core.prompts import encode_prompts

    prompt_ids = encode_prompts(tokenizer, prompts, cfg.training.max_prompt_length)
    frame = pd.DataFrame(
        {
            "id": [str(i) for i in range(len(prompts))],
            "prompt": prompts,
            "real": "",
            "prompt_ids": prompt_ids,
        }
    )
    backend = generation.make_backend(str(cfg.model.name_or_path), cfg, tokenizer, model=model)
    decoding = generation.Decoding.from_config(cfg.generation, tokenizer)
    paths = generation.generate_shards(
        backend,
        frame,
        out_dir,
        shard_size=cfg.generation.shard_size,
        opponent=str(cfg.model.name_or_path),
        decoding=decoding,
    )
    shards = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    return shards["generated"].tolist(), [ids.tolist() for ids in shards["generated_ids"]]


def _inputs(args):
    """(cfg, prompts, rounds, model directory) of the chosen model at the chosen size."""
    num_prompts, quick_prompts, max_new_tokens, rounds = SIZES[args.model]
    num_prompts = quick_prompts if args.quick else num_prompts
    rounds = 1 if args.quick else (args.rounds or rounds)
    if args.model == "toy":
        cfg = _common.toy_config()  # greedy, max_new_tokens 32
        prompts = _common.toy_prompts(num_prompts)
    else:
        cfg = _common.smollm2_config([f"generation.max_new_tokens={max_new_tokens}"])
        prompts = _common.chat_sample(num_prompts)["prompt"].tolist()
    return cfg, prompts, rounds


def _timed_rounds(model, tokenizer, prompts, cfg, rounds: int, hf_batch: int) -> dict:
    """Alternating timed rounds of the three sides; spin's outputs checked against the loop's."""
    max_new_tokens = cfg.generation.max_new_tokens
    times: dict[str, list] = {"loop": [], "spin": [], "hf": []}
    with tempfile.TemporaryDirectory(dir=_common.CACHE) as tmp:
        # Warm-up: first calls pay one-off costs (allocator, kernels) on every side.
        per_prompt_loop(model, tokenizer, prompts[:2], max_new_tokens)
        spin_generation(model, tokenizer, prompts[:4], cfg, f"{tmp}/warmup")
        hf_batched(model, tokenizer, prompts[:4], max_new_tokens, hf_batch)
        # Alternating rounds, so a change in the machine's load hits every side alike.
        for round_ in range(rounds):
            with _common.Timer() as loop_time:
                loop_texts, loop_ids = per_prompt_loop(model, tokenizer, prompts, max_new_tokens)
            with _common.Timer() as spin_time:
                spin_texts, spin_ids = spin_generation(
                    model, tokenizer, prompts, cfg, f"{tmp}/round-{round_}"
                )
            with _common.Timer() as hf_time:
                hf_ids = hf_batched(model, tokenizer, prompts, max_new_tokens, hf_batch)
            for side, timer in (("loop", loop_time), ("spin", spin_time), ("hf", hf_time)):
                times[side].append(timer)
            mismatches = [
                i for i, (a, b) in enumerate(zip(loop_ids, spin_ids, strict=True)) if a != b
            ]
            assert not mismatches, (
                f"{len(mismatches)} of {len(prompts)} outputs differ, e.g. prompt "
                f"{prompts[mismatches[0]]!r}: {loop_texts[mismatches[0]]!r} (per prompt) vs "
                f"{spin_texts[mismatches[0]]!r} (spin)"
            )
            assert loop_texts == spin_texts, "same ids, different decoded texts"
    return {
        "wall": {k: statistics.median(t.wall for t in v) for k, v in times.items()},
        "cpu": {k: statistics.median(t.cpu for t in v) for k, v in times.items()},
        "tokens": sum(len(ids) for ids in spin_ids),
        "ids": spin_ids,
        "hf_differs": sum(a != b for a, b in zip(hf_ids, spin_ids, strict=True)),
    }


VLLM_PYTHON = _common.ROOT / ".venv-vllm" / "bin" / "python"
VLLM_SCALING_PROMPTS = 128  # ≥ 64 per worker when two share them
TARGET_PAIR = 1.7  # 2 one-core vLLM workers against 1


def vllm_engines(cfg, model_dir: str, shares: list[list[list[int]]], cores: list[list[int]]):
    """One vLLM engine per share of prompt ids, each on its own cores, started together and
    timed from the moment every engine is warm; [(tokens, seconds, ids)] per engine."""
    import subprocess

    from spin_core.runtime.devices import WorkerDevices

    with tempfile.TemporaryDirectory(dir=_common.CACHE) as tmp:
        procs = []
        for name, (ids, own) in enumerate(zip(shares, cores, strict=True)):
            args = Path(tmp) / f"{name}.json"
            args.write_text(
                json.dumps(
                    {
                        "config": cfg.model_dump(mode="json"),
                        "model": model_dir,
                        "prompt_ids": ids,
                        "barrier": tmp,
                        "engines": len(shares),
                        "name": name,
                    }
                )
            )
            env = os.environ | WorkerDevices(cores=tuple(own)).env()
            env |= {"PYTHONPATH": str(_common.ROOT), "VLLM_CPU_KVCACHE_SPACE": "2"}
            procs.append(
                subprocess.Popen(
                    [str(VLLM_PYTHON), "-m", "benchmarks.vllm_side", str(args)],
                    cwd=_common.ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=1800)
            assert proc.returncode == 0, f"vLLM engine exited with {proc.returncode}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def vllm_side(cfg, model_dir: str, tokenizer, prompts: list[str], spin_ids, threads: int) -> dict:
    """vLLM on the same prompts and threads as the other sides, then 2 one-core engines
    against 1 on VLLM_SCALING_PROMPTS prompts."""
    from spin_core.prompts import encode_prompts

    max_prompt = cfg.training.max_prompt_length
    ids = encode_prompts(tokenizer, prompts, max_prompt)
    (one,) = vllm_engines(cfg, model_dir, [ids], [list(range(threads))])
    many = _common.chat_sample(VLLM_SCALING_PROMPTS, seed=7)["prompt"].tolist()
    many_ids = encode_prompts(tokenizer, many, max_prompt)
    half = len(many_ids) // 2
    (single,) = vllm_engines(cfg, model_dir, [many_ids], [[0]])
    pair = vllm_engines(cfg, model_dir, [many_ids[:half], many_ids[half:]], [[0], [1]])
    pair_rate = sum(r["tokens"] for r in pair) / max(r["seconds"] for r in pair)
    single_rate = single["tokens"] / single["seconds"]
    return {
        "vllm_tokens_per_s": round(one["tokens"] / one["seconds"], 1),
        "vllm_s": round(one["seconds"], 3),
        "vllm_rows_identical_to_spin": sum(
            a == b for a, b in zip(one["ids"], spin_ids, strict=True)
        ),
        "vllm_one_core_tokens_per_s": round(single_rate, 1),
        "vllm_two_workers_tokens_per_s": round(pair_rate, 1),
        "vllm_two_workers_speedup": round(pair_rate / single_rate, 2),
        "vllm_two_workers_identical_to_one": [*pair[0]["ids"], *pair[1]["ids"]] == single["ids"],
        "vllm_scaling_prompts": len(many_ids),
    }


def main() -> None:
    _common.offline()
    args = _common.parser(__doc__.splitlines()[0])
    _common.add_model_argument(args)
    args.add_argument(
        "--rounds", type=int, help="alternating timed rounds (median; default 3 toy, 1 smollm2)"
    )
    args.add_argument(
        "--hf-batch", type=int, default=64, help="prompts per HF batched `generate` call"
    )
    args.add_argument(
        "--no-vllm", action="store_true", help="leave out the vLLM side (smollm2 only)"
    )
    args = args.parse_args()
    _common.setup(args.threads)
    from spin_core.storage.models import load_policy

    cfg, prompts, rounds = _inputs(args)
    model, tokenizer = load_policy(str(cfg.model.name_or_path), cfg.model)
    parameters = sum(p.numel() for p in model.parameters())  # tied weights counted once
    peak_before = _common.matmul_peak(model.config)
    measured = _timed_rounds(model, tokenizer, prompts, cfg, rounds, args.hf_batch)
    vllm = {}
    if args.model == "smollm2" and VLLM_PYTHON.exists() and not args.no_vllm:
        vllm = vllm_side(
            cfg, str(cfg.model.name_or_path), tokenizer, prompts, measured["ids"], args.threads
        )
    peak_after = _common.matmul_peak(model.config)
    peak = max(peak_before, peak_after)

    wall, cpu, tokens = measured["wall"], measured["cpu"], measured["tokens"]
    speedup = wall["loop"] / wall["spin"]
    fraction = tokens / wall["spin"] * 2 * parameters / peak
    target = TARGET_SPEEDUP[args.model]
    best = fraction
    if vllm:
        vllm_fraction = vllm["vllm_tokens_per_s"] * 2 * parameters / peak
        vllm |= {
            "vllm_fraction_of_matmul_peak": round(vllm_fraction, 3),
            "vllm_speedup_vs_spin_hf": round(vllm["vllm_tokens_per_s"] * wall["spin"] / tokens, 2),
            "vllm_speedup_vs_per_prompt": round(
                vllm["vllm_tokens_per_s"] * wall["loop"] / tokens, 2
            ),
        }
        best = max(fraction, vllm_fraction)
        vllm["best_backend_fraction_of_matmul_peak"] = round(best, 3)
    met = speedup >= target and (args.model == "toy" or best >= TARGET_FRACTION)
    if vllm:
        met = met and vllm["vllm_two_workers_speedup"] >= TARGET_PAIR
    _common.emit(
        "generate" if args.model == "toy" else f"generate_{args.model}",
        {
            "model": f"{args.model}: {Path(str(cfg.model.name_or_path)).name}, "
            f"{parameters / 1e6:.2f}M parameters",
            "prompts": len(prompts),
            "max_new_tokens": cfg.generation.max_new_tokens,
            "generated_tokens": tokens,
            "outputs_identical": True,
            "rounds": rounds,
            "per_prompt_s": round(wall["loop"], 3),
            "spin_s": round(wall["spin"], 3),
            "per_prompt_tokens_per_s": round(tokens / wall["loop"], 1),
            "spin_tokens_per_s": round(tokens / wall["spin"], 1),
            "speedup": round(speedup, 2),
            "speedup_cpu_time": round(cpu["loop"] / cpu["spin"], 2),
            "hf_batch": args.hf_batch,
            "hf_batched_s": round(wall["hf"], 3),
            "hf_batched_tokens_per_s": round(tokens / wall["hf"], 1),
            "speedup_vs_hf_batched": round(wall["hf"] / wall["spin"], 2),
            "hf_batched_outputs_differ": measured["hf_differs"],
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "matmul_peak_before_after_gflops": [
                round(peak_before / 1e9, 1),
                round(peak_after / 1e9, 1),
            ],
            "tokens_per_s_bound": round(peak / (2 * parameters), 1),
            "fraction_of_matmul_peak": round(fraction, 3),
            "hf_batched_fraction_of_matmul_peak": round(
                tokens / wall["hf"] * 2 * parameters / peak, 3
            ),
            "threads": args.threads,
            **vllm,
        },
        target=f"spin >= {target:g}x the per-prompt loop"
        + ("" if args.model == "toy" else f" and >= {TARGET_FRACTION} of the fp32 matmul peak")
        + (f" (best backend); 2 one-core vLLM workers >= {TARGET_PAIR}x one" if vllm else ""),
        met=met,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
