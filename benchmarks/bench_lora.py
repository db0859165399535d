"""LoRA vs full fine-tuning: peak memory and time of one SPIN iteration, side by side.

The same unscored pairs and the same ~57M-parameter Llama (bench_train's "wide"
model), one `train_iteration` each, in fresh processes so that one side's peak
does not leak into the other's. LoRA keeps θt frozen and trains only the
adapters, so it holds no full-size gradients or optimizer state. The pairs are
scored once beforehand, so the peak is the training steps', not the scoring pass's
(glibc keeps freed memory resident, so an earlier peak would hide the steps'). Claim
(docs/PERFORMANCE.md): a LoRA step's peak memory is below a full fine-tuning
step's. Prints one JSON line; on CPU the peak is the process's max RSS, on a GPU
also CUDA's max allocated memory.

    python -m benchmarks.bench_lora [--quick]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks import _common
from benchmarks.bench_train import QUICK_SETUPS, SETUPS, peak_memory, prepare_model, prepare_pairs
from benchmarks.bench_train import spin_config as base_config
from spin_core.training.job import TrainJob

LORA = ["training.lora.r=16", "training.lora.alpha=32"]


def _vm_hwm_mib() -> float:
    """This process's peak resident memory since the last reset (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def score_once(pairs: Path, model_dir: Path, cfg) -> Path:
    """The pairs with θt's log-probs, so neither side's peak is the scoring pass's."""
    from spin_core import score
    from spin_core.storage.files import read_parquet_checked, write_parquet_atomic
    from spin_core.storage.models import load_policy

    out = pairs.with_name(f"scored-{model_dir.name}-{pairs.name}")
    if read_parquet_checked(out) is None:
        import pandas as pd

        model, tokenizer = load_policy(str(model_dir), cfg.model)
        frame = pd.read_parquet(pairs)
        scored, _ = score.score_with_opponent(model, tokenizer.pad_token_id, frame, cfg.training)
        write_parquet_atomic(scored, out)
    return out


def run_side(args) -> None:
    from spin_core.training import train

    _common.setup(args.threads)
    cfg = base_config(args.model_dir, args.batch, args.epochs)
    if args.side == "lora":
        from spin_core.config import apply_overrides, validate_config

        cfg = validate_config(apply_overrides(cfg.model_dump(mode="json"), LORA))
    rss_before = _common.current_rss_mib()
    steps_peak = {}

    def on_step(record: dict) -> None:
        # Peak RSS of the optimizer steps alone: the kernel's high-water mark is reset after
        # step 1 (`5 > /proc/self/clear_refs`), so loading, scoring and export do not count.
        if record["step"] == 1:
            Path("/proc/self/clear_refs").write_text("5")
        else:
            steps_peak["mib"] = round(_vm_hwm_mib(), 1)

    with tempfile.TemporaryDirectory(dir=_common.CACHE) as tmp, _common.Timer() as timer:
        train.train_iteration(
            cfg,
            TrainJob(
                init_model=str(args.model_dir),
                train_path=args.pairs,
                scored_path=Path(tmp) / "train.parquet",
                state_dir=Path(tmp) / "train_state",
                model_out=Path(tmp) / "model",
                iteration=0,
            ),
            on_step=on_step,
        )
    figures = {"side": args.side, "seconds": round(timer.wall, 2), **peak_memory()}
    figures["peak_rss_steps_mib"] = steps_peak.get("mib")  # steps 2…N
    print(json.dumps(figures | {"rss_before_mib": round(rss_before, 1)}), flush=True)


def main() -> None:
    _common.offline()
    args = _common.training_parser(__doc__.splitlines()[0], ["full", "lora"]).parse_args()
    if args.side:
        run_side(args)
        return
    _common.setup(args.threads)
    _common.warm_up_deepspeed()
    num_pairs, batch, epochs, architecture = (QUICK_SETUPS if args.quick else SETUPS)["wide"]
    model_dir = prepare_model("wide", architecture)
    pairs = score_once(prepare_pairs(num_pairs), model_dir, base_config(model_dir, batch, epochs))
    common = ["--pairs", str(pairs), "--model-dir", str(model_dir), "--batch", str(batch)]
    common += ["--epochs", str(epochs), "--threads", str(args.threads)]
    sides = {
        side: _common.run_json("benchmarks.bench_lora", "--side", side, *common)
        for side in ("full", "lora")
    }
    key = "peak_cuda_mib" if "peak_cuda_mib" in sides["full"] else "peak_rss_steps_mib"
    ratio = sides["lora"][key] / sides["full"][key]
    whole = sides["lora"]["peak_rss_mib"] / sides["full"]["peak_rss_mib"]
    _common.emit(
        "lora_memory",
        {
            "model": model_dir.name,
            "pairs": num_pairs,
            "full": sides["full"],
            "lora": sides["lora"],
            "peak_ratio_lora_over_full": round(ratio, 3),  # training steps
            "whole_iteration_peak_ratio": round(whole, 3),  # export included
        },
        target="LoRA peak memory < full fine-tuning's",
        met=ratio < 1,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
