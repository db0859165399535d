"""Where does SFT plateau on the embedded default? θ0's held-out exact match per SFT budget.

The paper's claim is that SPIN keeps improving a model whose SFT has plateaued on
its data. This builds the toy's θ0 with growing SFT budgets on one fixed SFT set
D (`toy.num_train` pairs) and prints one JSON line per budget: held-out exact
match (500 prompts, greedy) with its 95% bootstrap interval, real-response
log-likelihood, and the share of D's own prompts that θ0 answers exactly (how
much of D it has memorised, i.e. how many SPIN pairs would be identical).

    python -m experiments.sft_plateau --out runs/plateau --steps 300 600 1200 2400
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from spin_core import toy
from spin_core.config import load_config
from spin_core.evaluate import evaluate_model
from spin_core.reports.significance import bootstrap_mean_ci
from spin_core.storage.models import load_policy


def _pairs(path: Path, n: int | None = None) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    frame = frame.head(n) if n else frame
    return pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(len(frame))],
            "prompt": frame["messages"].map(lambda m: m[0]["content"]),
            "real": frame["messages"].map(lambda m: m[1]["content"]),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plateau")
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 600, 1200, 2400])
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config("configs/demo.yaml")
    for steps in args.steps:
        built = toy.build_toy(
            Path(args.out) / f"sft-{steps}",
            num_train=args.num_train,
            num_eval=500,
            sft_steps=steps,
            sft_lr=cfg.toy.sft_lr,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
        )
        model, tokenizer = load_policy(str(built.model_dir), cfg.model)
        result = {
            "sft_steps": steps,
            "num_train": args.num_train,
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "parameters": model.num_parameters(),
        }
        for name, path, n in (("heldout", built.eval_path, None), ("train", built.train_path, 500)):
            frame, metrics = evaluate_model(model, tokenizer, _pairs(path, n), cfg)
            mean, low, high = bootstrap_mean_ci(frame["exact_match"].to_numpy(dtype=float))
            result[f"{name}_exact_match"] = [round(mean, 4), round(low, 4), round(high, 4)]
            result[f"{name}_real_loglik"] = round(metrics["real_loglik_per_token"], 4)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
