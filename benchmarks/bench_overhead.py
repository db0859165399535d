"""Orchestration overhead: the Prefect pipeline versus the same spin_core calls in a plain loop.

Prefect side: `flows.pipeline.spin_pipeline` exactly as `spin run` calls it, on
Prefect's local ephemeral server (started by the run, as for a user). Plain side:
the steps the tasks perform (held-out split, θ0 evaluation, then per iteration
sample and tokenize, generate, build, train (which scores the pairs with θt
before its first step), evaluate; finally the report), called
directly on `spin_core` with the same paths and files, no Prefect imported. Both
run the same small toy config in a fresh process each; the figure is the ratio
of their wall times, interpreter start to exit.

    python -m benchmarks.bench_overhead     # target: Prefect ≤ 1.05× the plain loop
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from benchmarks import _common

TARGET_RATIO = 1.05
OVERRIDES = [
    "run.iterations=2",
    "run.baseline=none",
    "data.num_prompts=512",
    "data.eval_size=200",
    "training.eval_steps=0",
]
QUICK_OVERRIDES = [
    "run.iterations=1",
    "run.baseline=none",
    "data.num_prompts=64",
    "data.eval_size=40",
    "training.eval_steps=0",
]


# ---------------------------------------------------------------- plain loop


def plain_loop(cfg, run_dir: str) -> Path:
    """spin_pipeline's steps as direct spin_core calls (mirrors flows/ and tasks/)."""
    import pandas as pd

    from spin_core import data, generate, report, toy, train
    from spin_core.checkpoint import check_causal_lm, load_policy, load_tokenizer
    from spin_core.config import schedule_at
    from spin_core.evaluate import evaluate_model
    from spin_core.prompts import drop_overlong_prompts, encode_pairs
    from spin_core.rundir import RunDir, check_or_save_config, write_json_atomic

    run = RunDir(run_dir)
    check_or_save_config(run, cfg)
    data_cfg = run.data_config(cfg)
    check_causal_lm(run.base_model(cfg), trust_remote_code=cfg.model.trust_remote_code)
    generate.check_backend_available(cfg)
    train_pairs, heldout, _ = data.load_sft_data(data_cfg)
    data.sample_prompts(train_pairs, cfg.data.num_prompts, seed=cfg.data.seed)
    columns = [c for c in [*data.PAIR_COLUMNS, *data.OPTIONAL_COLUMNS] if c in heldout]
    data.write_parquet_atomic(heldout[columns], run.heldout)

    def evaluate(model_dir: str, out_dir: Path, opponent_dir=None, iteration=None) -> dict:
        heldout = pd.read_parquet(run.heldout)
        opponent_eval = (
            pd.read_parquet(Path(opponent_dir) / "eval.parquet") if opponent_dir else None
        )
        policy, tokenizer = load_policy(model_dir, cfg.model)
        frame, metrics = evaluate_model(
            policy,
            tokenizer,
            heldout,
            cfg,
            opponent_eval=opponent_eval,
            beta=schedule_at(cfg.training.beta, iteration or 0),
            group_of=toy.task_of,
        )
        data.write_parquet_atomic(frame, out_dir / "eval.parquet")
        metrics["model"] = model_dir
        if iteration is not None:
            pairs_stats = json.loads((run.iteration(iteration) / "pairs.json").read_text())
            metrics |= pairs_stats
            drop = metrics["opponent_real_loglik_per_token"] - metrics["real_loglik_per_token"]
            metrics["collapsed"] = bool(drop > cfg.run.collapse_tolerance)
        write_json_atomic(metrics, out_dir / "metrics.json")
        return metrics

    opponent, opponent_eval = run.base_model(cfg), run.base_eval()
    evaluate(opponent, opponent_eval)
    for t in range(cfg.run.iterations):
        # 1. sample, tokenized once with θ0's tokenizer (prompt_ids, real_ids)
        pairs, _, _ = data.load_sft_data(data_cfg)
        tokenizer = load_tokenizer(
            run.base_model(cfg), trust_remote_code=cfg.model.trust_remote_code
        )
        if cfg.data.overlong_prompts == "drop":
            pairs, _ = drop_overlong_prompts(pairs, tokenizer, cfg.training.max_prompt_length)
        prompts = data.sample_prompts(
            pairs,
            cfg.data.num_prompts,
            seed=cfg.data.seed,
            iteration=t,
            resample=cfg.data.resample_each_iteration,
        )
        prompt_ids, real_ids = encode_pairs(tokenizer, prompts, cfg.training.max_prompt_length)
        prompts = prompts.assign(prompt_ids=prompt_ids, real_ids=real_ids)
        data.write_parquet_atomic(prompts, run.prompts(t))
        # 2. generate (from the stored prompt ids, as the task reads them back)
        prompts = pd.read_parquet(run.prompts(t))
        generate.generate_from_model(
            opponent, cfg, prompts, run.generated_shards(t), show_progress=False
        )
        generate.merge_shards(
            run.generated_shards(t), len(prompts), cfg.generation.shard_size, run.generated(t)
        )
        # 3. build
        sources = range(max(0, t - cfg.data.history), t + 1)
        generated = {s: pd.read_parquet(run.generated(s)) for s in sources}
        pairs, stats = data.build_training_set(generated, drop_identical=cfg.data.drop_identical)
        data.write_parquet_atomic(pairs, run.pairs(t))
        write_json_atomic(
            {
                "train_pairs": stats.rows,
                "identical_dropped": stats.identical_dropped,
                "identical_fraction": stats.identical_fraction,
            },
            run.iteration(t) / "pairs.json",
        )
        # 4. train: the engine scores pairs.parquet with θt first, into train.parquet
        train.train_iteration(
            init_model=opponent,
            train_path=run.pairs(t),
            scored_path=run.train(t),
            state_dir=run.train_state(t),
            model_out=run.model(t),
            cfg=cfg,
            iteration=t,
        )
        # 5. evaluate against the opponent
        metrics = evaluate(str(run.model(t)), run.iteration(t), opponent_eval, t)
        if metrics["collapsed"] and not cfg.run.promote_collapsed:
            break
        opponent, opponent_eval = str(run.model(t)), run.iteration(t)
    path, _ = report.write_report(run.root)
    return path


# ------------------------------------------------------------------- sides


def run_side(args) -> None:
    _common.setup(args.threads)
    cfg = _common.toy_config(QUICK_OVERRIDES if args.quick else OVERRIDES)
    if args.side == "prefect":
        from flows.pipeline import spin_pipeline

        report = spin_pipeline(cfg, str(args.run_dir))
    else:
        report = plain_loop(cfg, str(args.run_dir))
    metrics = json.loads((Path(args.run_dir) / "iter_0" / "metrics.json").read_text())
    print(json.dumps({"report": str(report), "exact_match_1": metrics["exact_match"]}))


def timed_side(side: str, args, round_: int, api_url: str | None) -> tuple[float, dict]:
    """Wall time of one side in a fresh process, from interpreter start to exit."""
    run_dir = _common.CACHE / "overhead" / f"{side}-{'server-' if api_url else ''}{round_}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = prefect_env()
    if api_url:
        env["PREFECT_API_URL"] = api_url
    command = [sys.executable, "-m", "benchmarks.bench_overhead", f"--side={side}"]
    command += [f"--run-dir={run_dir}", f"--threads={args.threads}"]
    command += ["--quick"] if args.quick else []
    started = time.perf_counter()
    done = subprocess.run(command, cwd=_common.ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-8000:])
        raise RuntimeError(f"{side} side exited {done.returncode}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    shutil.rmtree(run_dir, ignore_errors=True)
    return seconds, result


def prefect_env() -> dict:
    """A Prefect home of our own (its database migrated once), no API URL: `spin run`'s default."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(_common.CACHE / "prefect")
    env.pop("PREFECT_API_URL", None)
    return env


@contextmanager
def prefect_server():
    """A long-lived Prefect server, as a deployment has (`prefect server start`)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("prefect")), "server", "start"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        command, env=prefect_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("prefect server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0])
    args.add_argument("--side", choices=["prefect", "plain"], help=argparse.SUPPRESS)
    args.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args.add_argument("--rounds", type=int, default=1, help="alternating rounds (median)")
    args = args.parse_args()
    if args.side:
        run_side(args)
        return
    _common.toy()  # built once, outside the timings
    _common.warm_up_deepspeed()
    sides = ("plain", "prefect", "prefect_server")
    times: dict[str, list[float]] = {side: [] for side in sides}
    results = {}
    with prefect_server() as api_url:
        for round_ in range(1 if args.quick else args.rounds):
            # Alternating order, so a change in the machine's load hits every side alike.
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                seconds, results[side] = timed_side(
                    side.removesuffix("_server"),
                    args,
                    round_,
                    api_url if side == "prefect_server" else None,
                )
                times[side].append(seconds)
    # Same config, same seeds: both must have trained the same θ1.
    assert len({r["exact_match_1"] for r in results.values()}) == 1, results
    plain, prefect = statistics.median(times["plain"]), statistics.median(times["prefect"])
    served = statistics.median(times["prefect_server"])
    ratio = prefect / plain
    _common.emit(
        "overhead",
        {
            "config": " ".join(QUICK_OVERRIDES if args.quick else OVERRIDES),
            "rounds": len(times["plain"]),
            "plain_s": round(plain, 2),
            "prefect_s": round(prefect, 2),
            "plain_runs_s": [round(t, 2) for t in times["plain"]],
            "prefect_runs_s": [round(t, 2) for t in times["prefect"]],
            "overhead_s": round(prefect - plain, 2),
            "ratio": round(ratio, 3),
            "prefect_server_s": round(served, 2),
            "prefect_server_runs_s": [round(t, 2) for t in times["prefect_server"]],
            "server_overhead_s": round(served - plain, 2),
            "server_ratio": round(served / plain, 3),
            "threads": args.threads,
        },
        target=f"Prefect <= {TARGET_RATIO}x the plain loop (ephemeral server, as `spin run`)",
        met=ratio <= TARGET_RATIO,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
