"""Ctrl-C in a terminal and a service manager's SIGTERM: the signal goes to the whole process
group (spin, Prefect's temporary server, the training ranks), not to spin alone.

Each case starts `spin run` in a session of its own, as a shell does, signals the group
(os.killpg) in the middle of a step, and checks what the user sees: the command ends
within 20 s with 130 (SIGINT) or 143 (SIGTERM), no process it started lives on, the lock
is released, and the same command run again resumes and finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from spin_core.storage.journal import read_journal
from tests.overrides import MID_GENERATION, overrides, set_args

pytestmark = pytest.mark.slow

STOP_SECONDS = 20


def start(run_dir: Path, sets: list[str], home: Path, command: list[str] | None = None):
    """`spin run` of the demo config into `run_dir` (or `spin <command>`), in a session of
    its own as a shell starts it; its output goes to RUN_DIR.log beside the run."""
    command = command or ["run", "configs/demo.yaml", "--run-dir", str(run_dir)]
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # Prefect's temporary server, in the group as for a user
    log = (run_dir.parent / f"{run_dir.name}.log").open("a")
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *command, *sets],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def started(run_dir: Path, step: str) -> bool:
    return any(r["step"] == step and r["event"] == "started" for r in read_journal(run_dir))


def signal_group_when(proc: subprocess.Popen, ready, signum: int, log: Path) -> list:
    """Send `signum` to the process group once `ready()` holds; the processes it had."""
    deadline = time.monotonic() + 400
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.05)
    processes = psutil.Process(proc.pid).children(recursive=True)
    _COMMANDS.clear()  # of another test's processes, whose pids may be reused
    for process in processes:  # read now: a signalled rank can be gone before it is asked
        _cmd(process)
    os.killpg(proc.pid, signum)
    return processes


def assert_stopped(proc: subprocess.Popen, processes: list, code: int, run_dir: Path) -> None:
    log = run_dir.parent / f"{run_dir.name}.log"
    signalled = time.monotonic()
    try:
        assert proc.wait(timeout=STOP_SECONDS) == code, log.read_text()[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"spin still running {STOP_SECONDS} s after the signal\n{log.read_text()[-3000:]}"
        )
    _, alive = psutil.wait_procs(
        processes, timeout=max(1, STOP_SECONDS - (time.monotonic() - signalled))
    )
    alive = [p for p in alive if _alive(p)]
    assert not alive, [" ".join(_cmd(p))[:160] for p in alive]
    assert not (run_dir / ".lock").exists()
    assert "run the same command again to resume" in log.read_text()


_COMMANDS: dict[int, list[str]] = {}


def _cmd(process: psutil.Process) -> list[str]:
    """The process's command line, as first read (signal_group_when reads it before the
    signal: a rank that exits at once has none to read after it)."""
    if process.pid not in _COMMANDS:
        try:
            _COMMANDS[process.pid] = process.cmdline()
        except psutil.Error:
            return []
    return _COMMANDS[process.pid]


def _is_rank(command: list[str]) -> bool:
    """A training rank, not the launcher (torchrun) whose arguments also name the module."""
    line = " ".join(command)
    return (
        "spin_core.training.rank" in line
        and "torch.distributed.run" not in line
        and ("torchrun" not in line and "-c" not in command[:2])
    )


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_ctrl_c_during_generation_stops_the_group_and_a_rerun_resumes(toy_build, tmp_path):
    """Generation ran in a task runner's worker thread: SIGINT reached the main thread, which
    then waited for the whole generation step to finish before it could stop (16 of 16
    shards were written after the signal). One worker now runs in the step's own thread."""
    run_dir = tmp_path / "run"
    changes = MID_GENERATION
    sets = set_args(overrides(toy_build, changes))
    proc = start(run_dir, sets, tmp_path / "home")
    try:
        log = tmp_path / "run.log"
        processes = signal_group_when(
            proc, lambda: started(run_dir, "generate-responses"), signal.SIGINT, log
        )
        assert_stopped(proc, processes, 130, run_dir)
        assert not (run_dir / "iter_0" / "generated.parquet").exists()  # stopped mid-step
        shards = list((run_dir / "iter_0" / "generated").glob("part-*.parquet"))
        assert len(shards) < 16  # 256 prompts in shards of 16: generation did not go on
    finally:
        _reap(proc)
    rerun = start(run_dir, sets, tmp_path / "home")
    try:
        assert rerun.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        _reap(rerun)
    executed = [
        r["step"] for r in read_journal(run_dir) if r["event"] == "started" and r["iteration"] == 0
    ]
    assert executed.count("sample-prompts") == 1  # finished before the signal: not redone
    assert executed.count("generate-responses") == 2
    assert (run_dir / "iter_0" / "model" / "config.json").exists()


def test_sigterm_to_the_group_during_training_on_two_ranks(toy_build, tmp_path):
    run_dir = tmp_path / "run"
    changes = {
        "data.num_prompts": 64,
        "run.iterations": 1,
        "run.baseline": "none",
        "generation.max_new_tokens": 16,
        "training.num_processes": 2,
        "training.zero_stage": 2,
        "training.num_epochs": 50,  # long enough to be stopped mid-training
    }
    proc = start(run_dir, set_args(overrides(toy_build, changes)), tmp_path / "home")
    try:
        metrics = run_dir / "iter_0" / "train_state" / "metrics.jsonl"
        processes = signal_group_when(proc, metrics.exists, signal.SIGTERM, tmp_path / "run.log")
        ranks = [p for p in processes if _is_rank(_cmd(p))]
        assert len(ranks) == 2, [" ".join(_cmd(p))[:160] for p in processes]
        assert_stopped(proc, processes, 143, run_dir)
    finally:
        _reap(proc)


def test_ctrl_c_to_the_group_stops_spin_compare_during_training(toy_build, tmp_path):
    out = tmp_path / "out"
    run_dir = out / "demo" / "seed-0"
    run_dir.parent.mkdir(parents=True)
    changes = {
        "data.num_prompts": 64,
        "run.iterations": 1,
        "run.baseline": "none",
        "generation.max_new_tokens": 16,
        "training.num_epochs": 50,  # long enough to be stopped mid-training
    }
    command = ["compare", "configs/demo.yaml", "--seeds", "1", "--out", str(out)]
    proc = start(run_dir, set_args(overrides(toy_build, changes)), tmp_path / "home", command)
    try:
        metrics = run_dir / "iter_0" / "train_state" / "metrics.jsonl"
        log = run_dir.parent / f"{run_dir.name}.log"
        processes = signal_group_when(proc, metrics.exists, signal.SIGINT, log)
        assert_stopped(proc, processes, 130, run_dir)
        assert not (out / "compare.md").exists()
    finally:
        _reap(proc)


def test_spin_status_of_a_run_killed_mid_training(toy_build, tmp_path):
    """SIGKILL (the OOM killer) leaves no chance to journal: status says where it died."""
    run_dir = tmp_path / "run"
    changes = {"run.iterations": 1, "run.baseline": "none", "training.num_epochs": 50}
    proc = start(run_dir, set_args(overrides(toy_build, changes)), tmp_path / "home")
    try:
        metrics = run_dir / "iter_0" / "train_state" / "metrics.jsonl"
        deadline = time.monotonic() + 400
        while not metrics.exists():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        _reap(proc)
    shown = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"{run_dir}: stale"
    assert f"stale lock of pid {proc.pid}" in shown.stdout
    died = [line for line in lines if "train-policy" in line and not line.startswith("  next")]
    assert len(died) == 1 and "iteration 0" in died[0] and "stale" in died[0], lines
    assert f"(pid {proc.pid} died without finishing it)" in died[0]
    assert any("generate-responses" in line and "finished" in line for line in lines)
    assert lines[-1].startswith("  next: train-policy of iteration 0")
