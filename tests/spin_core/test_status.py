"""`spin status DIR`: what the journal (steps.jsonl) and the lock say, as a user reads it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from spin_core.errors import InputError
from spin_core.reports.status import render, run_status

HOST = socket.gethostname()


def journal(run_dir: Path, *records: tuple) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "steps.jsonl").open("a") as handle:
        for time, step, iteration, event, pid, *error in records:
            line = {"time": time, "step": step, "iteration": iteration, "event": event, "pid": pid}
            if error:
                line["error"] = error[0]
            handle.write(json.dumps(line) + "\n")


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_running_run_shows_its_pid_its_step_and_since_when(tmp_path, sleeper):
    run = tmp_path / "run"
    journal(
        run,
        ("2026-12-03T10:00:00", "evaluate-model", None, "started", sleeper),
        ("2026-12-03T10:00:07", "evaluate-model", None, "finished", sleeper),
        ("2026-12-03T10:00:08", "sample-prompts", 0, "started", sleeper),
        ("2026-12-03T10:00:09", "sample-prompts", 0, "finished", sleeper),
        ("2026-12-03T10:00:10", "generate-responses", 0, "started", sleeper),
    )
    lock = {"pid": sleeper, "host": HOST, "started": "2026-12-03T09:59:58"}
    (run / ".lock").write_text(json.dumps(lock))
    status = run_status(run)
    assert status.state == "running"
    text = render(status)
    assert f"held by pid {sleeper}" in text and "since 2026-12-03T09:59:58" in text
    assert "generate-responses" in text and f"(pid {sleeper})" in text
    assert "7.0 s" in text  # θ0's evaluation took 7 s
    assert "now: generate-responses of iteration 0" in text


def test_a_failed_step_shows_its_error_line_and_where_a_rerun_resumes(tmp_path, dead_pid):
    run = tmp_path / "run"
    error = "RuntimeError('CUDA out of memory.\\nTried to allocate 2.00 GiB')"
    journal(
        run,
        ("2026-12-03T10:00:00", "build-training-set", 0, "finished", dead_pid),
        ("2026-12-03T10:00:01", "train-policy", 0, "started", dead_pid),
        ("2026-12-03T10:05:01", "train-policy", 0, "failed", dead_pid, error),
    )
    status = run_status(run)
    assert status.state == "failed"
    text = render(status)
    assert "iteration 0" in text and "train-policy" in text and "failed" in text
    assert "error: RuntimeError('CUDA out of memory.\\nTried to allocate 2.00 GiB')" in text
    assert "5 min 00 s" in text
    assert "next: train-policy of iteration 0 (run the same command again to resume)" in text


def test_a_killed_run_shows_its_step_as_stale_and_its_lock_as_stale(tmp_path, dead_pid):
    run = tmp_path / "run"
    journal(run, ("2026-12-03T10:00:01", "train-policy", 1, "started", dead_pid))
    lock = {"pid": dead_pid, "host": HOST, "started": "2026-12-03T09:00:00"}
    (run / ".lock").write_text(json.dumps(lock))
    status = run_status(run)
    assert status.state == "stale"
    text = render(status)
    assert f"stale lock of pid {dead_pid}" in text
    assert f"(pid {dead_pid} died without finishing it)" in text
    assert "next: train-policy of iteration 1" in text


def test_a_finished_iteration_points_at_the_next(tmp_path, dead_pid):
    run = tmp_path / "run"
    (tmp_path / "run").mkdir()
    (run / "spin.yaml").write_text("run:\n  iterations: 3\n")
    journal(
        run,
        ("2026-12-03T10:00:00", "evaluate-model", 0, "started", dead_pid),
        ("2026-12-03T10:00:05", "evaluate-model", 0, "finished", dead_pid),
    )
    status = run_status(run)
    assert status.state == "stopped"
    assert status.next_step() == "sample-prompts of iteration 1"


def test_spin_status_on_the_command_line(tmp_path, dead_pid, capsys):
    run = tmp_path / "run"
    journal(run, ("2026-12-03T10:00:00", "sample-prompts", 0, "finished", dead_pid))
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run}: stopped")
    assert "next: generate-responses of iteration 0" in out
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_a_missing_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="run directory not found"):
        run_status(tmp_path / "nope")


def test_spin_status_imports_neither_torch_nor_transformers(tmp_path, dead_pid):
    """`spin status` on a login node or in a watch loop: seconds of imports for nothing."""
    run = tmp_path / "run"
    (run).mkdir()
    (run / "spin.yaml").write_text("run:\n  iterations: 2\n")
    journal(run, ("2026-12-03T10:00:00", "sample-prompts", 0, "finished", dead_pid))
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        f"assert main(['status', {str(run)!r}]) == 0\n"
        "print('imported:', [m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported: []" in done.stdout


@pytest.mark.parametrize("baseline", ["none", "sft"])
def test_the_next_step_follows_the_order_run_iteration_runs_the_steps(baseline, tmp_path):
    """`spin status` cannot import the pipeline (it would load torch): its list of an
    iteration's steps is checked against what `run_iteration` calls, in order."""
    import logging

    from spin_core.config import load_config
    from spin_core.pipeline import run_iteration
    from spin_core.reports.status import ITERATION_STEPS

    class Recorder:
        log = logging.getLogger("test")

        def __init__(self):
            self.names = []

        def step(self, step, *args, **kwargs):
            self.names.append(step.name)
            return {} if step.name == "evaluate-model" else "x"

    config = load_config("configs/demo.yaml", [f"run.baseline={baseline}"])
    recorder = Recorder()
    run_iteration(recorder, config, str(tmp_path / "run"), 0, "opponent", "opponent-eval")
    spin_steps = recorder.names[: len(ITERATION_STEPS)]
    assert tuple(spin_steps) == ITERATION_STEPS
    # the SFT baseline comes after SPIN's steps: not what a rerun starts with
    assert recorder.names[len(ITERATION_STEPS) :] == (
        ["train-sft-baseline", "evaluate-model"] if baseline == "sft" else []
    )
