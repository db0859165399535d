"""Orchestration overhead: the Prefect pipeline versus the same steps run without Prefect.

Prefect side: `spin run CONFIG --run-dir DIR` (`flows.cli.main`), with its temporary
Prefect server started in the background while the inputs are checked, as for a user. Plain side:
`spin_core.driver.run`, the same step definitions (spin_core/steps.py) in the
same order with the same policy, in plain Python, no Prefect imported. Both run
the same small toy config in a fresh process each; the figure is the ratio of
their wall times, interpreter start to exit.

    python -m benchmarks.bench_overhead     # target: at most 5 s more than the plain loop
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _common
from flows.server import prefect_server
from spin_core.launch import free_port

TARGET_SECONDS = 5.0  # the fixed cost of orchestrating a run (the goal)
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


# ------------------------------------------------------------------- sides


def run_side(args) -> None:
    if args.side == "prefect":
        # Exactly `spin run CONFIG --run-dir DIR`: the temporary server (or PREFECT_API_URL),
        # started while the inputs are checked; torch's threads from OMP_NUM_THREADS.
        from flows.cli import main as spin

        cfg = _common.toy_config(QUICK_OVERRIDES if args.quick else OVERRIDES)
        config_path = Path(args.run_dir).parent / f"{Path(args.run_dir).name}.yaml"
        config_path.write_text(cfg.dump_yaml())
        with contextlib.redirect_stdout(io.StringIO()):  # the report
            code = spin(["run", str(config_path), "--run-dir", str(args.run_dir)])
        assert code == 0, f"spin run exited {code}"
        report = Path(args.run_dir) / "report.md"
    else:
        from spin_core import driver

        _common.setup(args.threads)
        cfg = _common.toy_config(QUICK_OVERRIDES if args.quick else OVERRIDES)
        report = driver.run(cfg, str(args.run_dir))
    metrics = json.loads((Path(args.run_dir) / "iter_0" / "metrics.json").read_text())
    print(json.dumps({"report": str(report), "exact_match_1": metrics["exact_match"]}))


def timed_side(side: str, args, round_: int, api_url: str | None) -> tuple[float, dict]:
    """Wall time of one side in a fresh process, from interpreter start to exit."""
    run_dir = _common.CACHE / "overhead" / f"{side}-{'server-' if api_url else ''}{round_}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = prefect_env() | {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
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
    with prefect_server(free_port(), env=prefect_env()) as api_url:
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
        target=f"`spin run` <= {TARGET_SECONDS:.0f} s more than the plain loop (temporary server)",
        met=prefect - plain <= TARGET_SECONDS,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
