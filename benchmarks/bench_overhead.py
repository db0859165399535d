"""Orchestration overhead: the Prefect pipeline versus the same steps run without Prefect.

Prefect side: exactly a user's `spin run CONFIG --run-dir DIR` (`python -m flows.cli`), with
its temporary Prefect server started in the background while the inputs are checked; and
the same against a running server (PREFECT_API_URL); and reruns of a finished run, every step
cached, against a server on SQLite and one on PostgreSQL. Plain side: the same config file
loaded and run by `spin_core.driver.run`, the same step definitions (spin_core/steps.py)
in the same order with the same policy, in plain Python, no Prefect imported. Each run is
a fresh process; the figures are the differences and ratios of their wall times,
interpreter start to exit.

    python -m benchmarks.bench_overhead     # target: at most 5 s more than the plain loop
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _common

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


def run_plain(args) -> None:
    """The plain side: the config file loaded and its steps run by `spin_core.driver`."""
    from spin_core import driver
    from spin_core.config import load_config

    _common.setup(args.threads)
    driver.run(load_config(args.config), str(args.run_dir))


def timed_side(
    side: str, config_path: Path, args, round_: int, api_url: str | None
) -> tuple[float, float]:
    """Wall time of one side in a fresh process, from interpreter start to exit; θ1's
    held-out exact match (both sides must train the same θ1)."""
    run_dir = _common.CACHE / "overhead" / f"{side}-{'server-' if api_url else ''}{round_}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = prefect_env() | {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if side == "prefect":  # exactly the user's `spin run CONFIG --run-dir DIR`
        command = [sys.executable, "-m", "flows.cli", "run", str(config_path)]
        command += ["--run-dir", str(run_dir)]
    else:
        command = [sys.executable, "-m", "benchmarks.bench_overhead", "--side=plain"]
        command += [f"--config={config_path}", f"--run-dir={run_dir}"]
        command += [f"--threads={args.threads}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=_common.ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-8000:])
        raise RuntimeError(f"{side} side exited {done.returncode}")
    metrics = json.loads((run_dir / "iter_0" / "metrics.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return seconds, metrics["exact_match"]


def prefect_env() -> dict:
    """A Prefect home of our own (its database migrated once), no API URL: `spin run`'s default."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(_common.CACHE / "prefect")
    env.pop("PREFECT_API_URL", None)
    return env


def alternate(
    config_path: Path, args, rounds: int, api_url: str | None
) -> tuple[dict[str, list[float]], set[float]]:
    """({side: wall seconds per round}, the θ1 exact matches seen), plain and `spin run`
    alternating round by round."""
    sides = ("plain", "prefect")
    times: dict[str, list[float]] = {side: [] for side in sides}
    exact: set[float] = set()
    for round_ in range(rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            seconds, exact_match = timed_side(side, config_path, args, round_, api_url)
            times[side].append(seconds)
            exact.add(exact_match)
    return times, exact


def cached_reruns(config_path: Path, args, rounds: int, api_url: str, name: str) -> list[float]:
    """Wall seconds of `spin run` reruns of a finished run, every step cached, against the
    server at `api_url`: what a resume of a run with nothing left to do costs."""
    run_dir = _common.CACHE / "overhead" / f"cached-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = prefect_env() | {"PREFECT_API_URL": api_url, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "flows.cli", "run", str(config_path), "--run-dir"]
    command.append(str(run_dir))
    seconds = []
    for _ in range(1 + rounds):  # the first run does the work
        started = time.perf_counter()
        done = subprocess.run(command, cwd=_common.ROOT, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-8000:])
            raise RuntimeError(f"spin run against the {name} server exited {done.returncode}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return seconds[1:]


def database_phase(config_path: Path, args, rounds: int) -> dict:
    """Cached reruns against a server on SQLite and one on PostgreSQL (when one can be started
    here: tests/postgres.py), each server alone on the machine while it is measured."""
    from flows.server import prefect_server
    from spin_core.runtime.processes import free_port
    from tests.postgres import postgres_database, unavailable

    out: dict = {}
    with prefect_server(free_port(), env=prefect_env()) as api_url:
        out["sqlite"] = cached_reruns(config_path, args, rounds, api_url, "sqlite")
    if unavailable():
        out["postgresql"] = None
        out["postgresql_unavailable"] = unavailable()
        return out
    with postgres_database() as url:
        env = prefect_env() | {
            "PREFECT_API_DATABASE_CONNECTION_URL": url,
            "PREFECT_HOME": str(_common.CACHE / "prefect-postgres"),
        }
        with prefect_server(free_port(), env=env) as api_url:
            out["postgresql"] = cached_reruns(config_path, args, rounds, api_url, "postgresql")
    return out


def main() -> None:
    _common.offline()
    args = _common.parser(__doc__.splitlines()[0])
    args.add_argument("--side", choices=["plain"], help=argparse.SUPPRESS)
    args.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args.add_argument("--rounds", type=int, default=1, help="alternating rounds (median)")
    args = args.parse_args()
    if args.side:
        run_plain(args)
        return
    from flows.server import prefect_server  # after _common.offline(): Prefect reads it
    from spin_core.runtime.processes import free_port

    _common.toy()  # built once, outside the timings
    _common.warm_up_deepspeed()
    rounds = 1 if args.quick else args.rounds
    config_path = _common.CACHE / "overhead" / "config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(
        _common.toy_config(QUICK_OVERRIDES if args.quick else OVERRIDES).dump_yaml()
    )
    # Two phases, each alternating its two sides round by round (a change in the machine's
    # load hits both alike): the temporary server against plain, with no other server
    # alive; then a running server against plain, with that server (and its background
    # services, which take CPU from everything) alive through the phase.
    times, exact = alternate(config_path, args, rounds, api_url=None)
    with prefect_server(free_port(), env=prefect_env()) as api_url:
        served_times, served_exact = alternate(config_path, args, rounds, api_url=api_url)
    assert len(exact | served_exact) == 1, exact | served_exact  # same config, seeds: same θ1
    databases = database_phase(config_path, args, max(rounds, 2))
    plain, prefect = statistics.median(times["plain"]), statistics.median(times["prefect"])
    plain_b = statistics.median(served_times["plain"])
    served = statistics.median(served_times["prefect"])
    ratio = prefect / plain
    _common.emit(
        "overhead",
        {
            "config": " ".join(QUICK_OVERRIDES if args.quick else OVERRIDES),
            "rounds": rounds,
            "plain_s": round(plain, 2),
            "prefect_s": round(prefect, 2),
            "plain_runs_s": [round(t, 2) for t in times["plain"]],
            "prefect_runs_s": [round(t, 2) for t in times["prefect"]],
            "overhead_s": round(prefect - plain, 2),
            "ratio": round(ratio, 3),
            "plain_beside_server_s": round(plain_b, 2),
            "prefect_server_s": round(served, 2),
            "plain_beside_server_runs_s": [round(t, 2) for t in served_times["plain"]],
            "prefect_server_runs_s": [round(t, 2) for t in served_times["prefect"]],
            "server_overhead_s": round(served - plain_b, 2),
            "server_ratio": round(served / plain_b, 3),
            "cached_rerun_sqlite_runs_s": [round(t, 2) for t in databases["sqlite"]],
            "cached_rerun_postgresql_runs_s": (
                [round(t, 2) for t in databases["postgresql"]] if databases["postgresql"] else None
            ),
            "cached_rerun_sqlite_s": round(statistics.median(databases["sqlite"]), 2),
            "cached_rerun_postgresql_s": (
                round(statistics.median(databases["postgresql"]), 2)
                if databases["postgresql"]
                else databases.get("postgresql_unavailable")
            ),
            "threads": args.threads,
        },
        target=f"`spin run` <= {TARGET_SECONDS:.0f} s more than the plain loop (temporary server)",
        met=prefect - plain <= TARGET_SECONDS,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
