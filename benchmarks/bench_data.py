"""Data stage: 200k UltraChat-shaped chats through load, clean, sample 50k, build D_t with history.

The input is a generated Parquet file shaped like HuggingFaceH4/ultrachat_200k
`train_sft` (columns prompt, prompt_id, messages; 1–8 user/assistant exchanges per
chat, ~3.2 on average; user turns ~300 characters, assistant turns ~1,200, long
tails), so ~1.2 GB of text, as the real split holds. The timed run, in its own
process for an honest peak RSS, is what the pipeline does before generation and
after it: `load_sft_data` (read, first exchange, drop empty and duplicate pairs,
hold out `eval_size`, remove held-out prompts), `sample_prompts` (50k) and their
one tokenization (`encode_pairs` with zephyr-7b-sft-full's tokenizer, Mistral-7B's
SentencePiece model from tests/realtok.py, into prompt_ids and real_ids; written
as prompts.parquet), then `build_training_set` from the generations of iterations
1 and 0 (history 1, so 100k pairs less the identical ones, decided on the ids),
written to Parquet.

    python -m benchmarks.bench_data     # targets: < 10 s and < 1 GiB peak RSS
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import _common

TARGET_SECONDS = 10.0
TARGET_RSS_MIB = 1024.0
ROWS, QUICK_ROWS = 200_000, 20_000
SAMPLE, QUICK_SAMPLE = 50_000, 5_000
ROW_GROUP = 10_000
SEED = 42
WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an which "
    "can model data you your will more not have these we use has also but how one about "
    "when their they each there what into other such may some time first most like been "
    "water energy language history system people design learning example important "
    "different process information research development provide however result"
).split()


# ------------------------------------------------------------------- inputs


def _corpus(rng: np.random.Generator, chars: int) -> str:
    """Random English-looking text to cut the messages from."""
    words = rng.choice(np.array(WORDS), size=chars // 5)
    return " ".join(words.tolist())[:chars]


def _texts(rng, corpus: str, count: int, median: float, sigma: float) -> list[str]:
    lengths = np.clip(rng.lognormal(np.log(median), sigma, count), 8, 20_000).astype(int)
    starts = rng.integers(0, len(corpus) - 20_000, count)
    return [corpus[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]


def write_ultrachat_like(path: Path, rows: int) -> Path:
    """`rows` chats in UltraChat's schema, written row group by row group (seeded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    rng = np.random.default_rng(SEED)
    corpus = _corpus(rng, 4_000_000)
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema(
        [("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", pa.list_(message))]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with pq.ParquetWriter(partial, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            exchanges = np.minimum(rng.geometric(1 / 3.2, n), 8)  # (n,) 1..8, mean ~3
            users = _texts(rng, corpus, int(exchanges.sum()), 300, 0.8)
            answers = _texts(rng, corpus, int(exchanges.sum()), 1_200, 0.6)
            chats, first_prompts, k = [], [], 0
            for turns in exchanges.tolist():
                chat = []
                for _ in range(turns):
                    chat += [
                        {"content": users[k], "role": "user"},
                        {"content": answers[k], "role": "assistant"},
                    ]
                    k += 1
                chats.append(chat)
                first_prompts.append(chat[0]["content"])
            ids = [f"{start + i:064x}" for i in range(n)]
            table = pa.table(
                {
                    "prompt": first_prompts,
                    "prompt_id": ids,
                    "messages": pa.array(chats, type=pa.list_(message)),
                },
                schema=schema,
            )
            writer.write_table(table)
    partial.rename(path)
    return path


def tokenizer_dir() -> Path:
    """A model directory with zephyr-7b-sft-full's tokenizer (tests/realtok.py: Mistral-7B
    v0.1's, offline; the tiny model beside it is not used)."""
    from tests.realtok import build_realtok

    return build_realtok(_common.CACHE / "data" / "realtok").model_dir


def write_generations(
    dataset: Path, sample_size: int, out_dir: Path, tokenizer: Path
) -> list[Path]:
    """generated.parquet of iterations 0 and 1 for the sample the timed run will draw.

    About 40% of the generated responses equal the real ones (as on the toy task);
    the others are the real response cut short, as a weak opponent's would be (text
    cut by characters, ids by 1-50 tokens: the build step only compares ids).
    """
    from spin_core import data
    from spin_core.prompts import encode_pairs
    from spin_core.storage.files import write_parquet_atomic
    from spin_core.storage.models import load_tokenizer

    paths = [out_dir / f"generated-{t}.parquet" for t in (0, 1)]
    if all(p.exists() for p in paths):
        return paths
    train, _, _ = data.load_sft_data(_data_config(dataset))
    sample = data.sample_prompts(train, sample_size, seed=SEED)
    prompt_ids, real_ids = encode_pairs(
        load_tokenizer(str(tokenizer)), sample, _training_config().max_prompt_length
    )
    sample = sample.assign(
        prompt_ids=[np.asarray(ids, dtype=np.int32) for ids in prompt_ids],
        real_ids=[np.asarray(ids, dtype=np.int32) for ids in real_ids],
    )
    rng = np.random.default_rng(SEED + 1)
    for t, path in enumerate(paths):
        identical = rng.random(len(sample)) < 0.4
        cut = rng.integers(1, 200, len(sample))
        cut_ids = rng.integers(1, 50, len(sample))
        generated = [
            real if same else real[: max(1, len(real) - c)]
            for real, same, c in zip(sample["real"], identical, cut.tolist(), strict=True)
        ]
        generated_ids = [
            ids if same else ids[: max(1, len(ids) - c)]
            for ids, same, c in zip(sample["real_ids"], identical, cut_ids.tolist(), strict=True)
        ]
        frame = sample.assign(
            generated=generated,
            generated_ids=generated_ids,
            finish_reason="stop",
            generated_tokens=[len(ids) for ids in generated_ids],
            opponent=f"iter_{t - 1}/model" if t else "theta0",
            decoding='{"do_sample": false}',
        )
        write_parquet_atomic(frame, path)
    return paths


def _data_config(dataset: Path):
    from spin_core.config import DataConfig

    return DataConfig(dataset=str(dataset), eval_size=500, seed=SEED, history=1)


def _training_config():
    from spin_core.config import TrainingConfig

    return TrainingConfig()  # the paper's limits: max_prompt_length 512, max_length 1024


# ---------------------------------------------------------------- timed run


def run_stage(args) -> None:
    """The timed data stage, alone in this process; wall, CPU and peak RSS after each step."""
    import pandas as pd

    from spin_core import data
    from spin_core.prompts import encode_pairs
    from spin_core.storage.files import write_parquet_atomic
    from spin_core.storage.models import load_tokenizer

    cfg = _data_config(args.dataset)
    record = {"rss_before_mib": round(_common.current_rss_mib(), 1)}

    def step(name: str, timer: _common.Timer) -> None:
        record[f"{name}_s"] = round(timer.wall, 3)
        record[f"{name}_cpu_s"] = round(timer.cpu, 3)
        record[f"{name}_peak_rss_mib"] = round(_common.peak_rss_mib(), 1)

    with _common.Timer() as total, tempfile.TemporaryDirectory(dir=_common.CACHE) as tmp:
        with _common.Timer() as timer:
            train, heldout, stats = data.load_sft_data(cfg)
        step("load_clean", timer)
        with _common.Timer() as timer:
            sample = data.sample_prompts(train, args.sample, seed=cfg.seed)
            # The sample step's one tokenization of every pair (spin_core/steps.py: sample_prompts).
            with _common.Timer() as encoding:
                tokenizer = load_tokenizer(str(args.tokenizer))
                prompt_ids, real_ids = encode_pairs(
                    tokenizer, sample, _training_config().max_prompt_length
                )
            sample = sample.assign(prompt_ids=prompt_ids, real_ids=real_ids)
            del prompt_ids, real_ids
            write_parquet_atomic(sample, Path(tmp) / "prompts.parquet")
        step("sample", timer)
        step("encode", encoding)
        record |= {"rows_read": stats["dataset"]["rows_read"], "train_rows": len(train)}
        record |= {"heldout_rows": len(heldout), "sampled": len(sample)}
        # The pipeline builds D_t in a later task, from files: the SFT frames are gone by then.
        del train, heldout, sample
        with _common.Timer() as timer:
            generated = {t: pd.read_parquet(p) for t, p in enumerate(args.generated)}
            pairs, build_stats = data.build_training_set(generated)
            write_parquet_atomic(pairs, Path(tmp) / "pairs.parquet")
        step("build", timer)
    record |= {
        "training_pairs": build_stats.rows,
        "identical_dropped": build_stats.identical_dropped,
        "seconds": total.wall,
        "cpu_seconds": total.cpu,
        "peak_rss_mib": round(_common.peak_rss_mib(), 1),
    }
    print(json.dumps(record), flush=True)


def main() -> None:
    _common.offline()
    args = _common.parser(__doc__.splitlines()[0])
    args.add_argument("--stage", action="store_true", help=argparse.SUPPRESS)
    args.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args.add_argument("--sample", type=int, help=argparse.SUPPRESS)
    args.add_argument("--generated", type=Path, nargs=2, help=argparse.SUPPRESS)
    args.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = args.parse_args()
    if args.stage:
        run_stage(args)
        return
    _common.setup(args.threads)
    rows, sample = (QUICK_ROWS, QUICK_SAMPLE) if args.quick else (ROWS, SAMPLE)
    cache = _common.CACHE / "data"
    dataset = write_ultrachat_like(cache / f"ultrachat-like-{rows}.parquet", rows)
    tokenizer = tokenizer_dir()
    # "-ids": generations with prompt_ids, real_ids and generated_ids (the build step's inputs).
    generated = write_generations(
        dataset, sample, cache / f"generated-{rows}-{sample}-ids", tokenizer
    )
    result = _common.run_json(
        "benchmarks.bench_data",
        "--stage",
        f"--dataset={dataset}",
        f"--sample={sample}",
        f"--tokenizer={tokenizer}",
        "--generated",
        *map(str, generated),
    )
    file_mib = dataset.stat().st_size / 2**20
    met = result["seconds"] < TARGET_SECONDS and result["peak_rss_mib"] < TARGET_RSS_MIB
    _common.emit(
        "data",
        {
            "rows": rows,
            "parquet_mib": round(file_mib, 1),
            "text_mib": round(_text_mib(dataset), 1),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
        },
        target=f"< {TARGET_SECONDS:g} s and < {TARGET_RSS_MIB / 1024:g} GiB peak RSS",
        met=met,
        quick=args.quick,
    )


def _text_mib(dataset: Path) -> float:
    """Characters of message text in the file (one row group at a time)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    parquet = pq.ParquetFile(dataset)
    for group in range(parquet.num_row_groups):
        messages = parquet.read_row_group(group, columns=["messages"]).column("messages")
        content = pc.struct_field(pc.list_flatten(messages), "content")
        total += pc.sum(pc.binary_length(content)).as_py()
    return total / 2**20


if __name__ == "__main__":
    main()
