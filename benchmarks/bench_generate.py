"""Generation: one `model.generate` call per prompt versus spin's generation step.

The per-prompt loop is how public SPIN write-ups generate y': format the prompt
with the chat template, call `model.generate` on it alone, decode. spin's step is
`spin_core.generation` as the pipeline runs it: the prompts' ids from
`spin_core.prompts.encode_prompts` (what the sample step stores as `prompt_ids`),
`make_backend` (batched, length-sorted, left-padded greedy decoding), `generate_shards`
writing the Parquet shards with the generated ids. Same toy θ0, same prompts, same
greedy settings; the outputs must be identical, token for token (the loop's new ids
against the shards' `generated_ids`).

    python -m benchmarks.bench_generate            # 512 prompts; target spin ≥ 20× faster
"""

from __future__ import annotations

import statistics
import tempfile

import pandas as pd
import torch

from benchmarks import _common

TARGET_SPEEDUP = 20.0


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
        prompt_ids,
        out_dir,
        shard_size=cfg.generation.shard_size,
        opponent=str(cfg.model.name_or_path),
        decoding=decoding,
        show_progress=False,
    )
    shards = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    return shards["generated"].tolist(), [ids.tolist() for ids in shards["generated_ids"]]


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (median)")
    args = args.parse_args()
    _common.setup(args.threads)
    from spin_core.checkpoint import load_policy

    num_prompts = 64 if args.quick else 512
    rounds = 1 if args.quick else args.rounds
    cfg = _common.toy_config()  # greedy, max_new_tokens 32
    prompts = _common.toy_prompts(num_prompts)
    model, tokenizer = load_policy(str(cfg.model.name_or_path), cfg.model)
    max_new_tokens = cfg.generation.max_new_tokens

    loop_times, spin_times = [], []
    with tempfile.TemporaryDirectory(dir=_common.CACHE) as tmp:
        # Warm-up: first calls pay one-off costs (allocator, kernels) on both sides.
        per_prompt_loop(model, tokenizer, prompts[:4], max_new_tokens)
        spin_generation(model, tokenizer, prompts[:4], cfg, f"{tmp}/warmup")
        # Alternating rounds, so a change in the machine's load hits both sides alike.
        for round_ in range(rounds):
            with _common.Timer() as loop_time:
                loop_texts, loop_ids = per_prompt_loop(model, tokenizer, prompts, max_new_tokens)
            with _common.Timer() as spin_time:
                spin_texts, spin_ids = spin_generation(
                    model, tokenizer, prompts, cfg, f"{tmp}/round-{round_}"
                )
            loop_times.append(loop_time)
            spin_times.append(spin_time)
            mismatches = [
                i for i, (a, b) in enumerate(zip(loop_ids, spin_ids, strict=True)) if a != b
            ]
            assert not mismatches, (
                f"{len(mismatches)} of {num_prompts} outputs differ, e.g. prompt "
                f"{prompts[mismatches[0]]!r}: {loop_texts[mismatches[0]]!r} (per prompt) vs "
                f"{spin_texts[mismatches[0]]!r} (spin)"
            )
            assert loop_texts == spin_texts, "same ids, different decoded texts"

    loop_wall = statistics.median(t.wall for t in loop_times)
    spin_wall = statistics.median(t.wall for t in spin_times)
    loop_cpu = statistics.median(t.cpu for t in loop_times)
    spin_cpu = statistics.median(t.cpu for t in spin_times)
    speedup = loop_wall / spin_wall
    tokens = sum(len(ids) for ids in spin_ids)
    _common.emit(
        "generate",
        {
            "prompts": num_prompts,
            "max_new_tokens": max_new_tokens,
            "generated_tokens": tokens,
            "outputs_identical": True,
            "rounds": rounds,
            "per_prompt_s": round(loop_wall, 3),
            "spin_s": round(spin_wall, 3),
            "per_prompt_tokens_per_s": round(tokens / loop_wall, 1),
            "spin_tokens_per_s": round(tokens / spin_wall, 1),
            "speedup": round(speedup, 2),
            "speedup_cpu_time": round(loop_cpu / spin_cpu, 2),
            "threads": args.threads,
        },
        target=f"spin >= {TARGET_SPEEDUP:g}x the per-prompt loop",
        met=speedup >= TARGET_SPEEDUP,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
