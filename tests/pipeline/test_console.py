"""What a user sees on the console: one line per step, bad input in one line, a full spin.log.

Every case runs the real `spin` command in a subprocess, as a user runs it (Prefect's
temporary server included), and reads its stderr.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from spin_core.reports.status import ITERATION_STEPS
from tests.overrides import overrides, set_args

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BAR = re.compile(r"^(generate|score|train \d+):\s")  # spin's own progress bars
STEP_LINE = re.compile(
    r"^\d\d:\d\d:\d\d (run|θ0|iteration \d+): [a-z0-9-]+( \(SFT baseline\))? "
    r"(\.\.\.|done in [\d.]+ s|done in \d+ min \d\d s|already done)$"
)
BAD_INPUT_SECONDS = 90  # 11–68 s measured on 2 cores shared at load 3–13; no server, no toy built


def spin(*args: str, home: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # the temporary server, as for a new user
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, time.monotonic() - started


def console_lines(stderr: str) -> list[str]:
    """The lines a terminal shows at the end (a progress bar's updates are one line)."""
    lines = []
    for raw in stderr.splitlines():
        shown = raw.split("\r")[-1].strip() or raw.strip()
        if shown:
            lines.append(shown)
    return lines


@pytest.fixture(scope="module")
def toy_run(toy_build, tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    run_dir = base / "run"
    sets = set_args(overrides(toy_build, {"run.iterations": 1, "run.baseline": "none"}))
    result, _ = spin("run", "configs/demo.yaml", "--run-dir", str(run_dir), *sets, home=base / "h")
    return run_dir, sets, base / "h", result


def test_a_run_prints_one_line_per_step_and_no_http_requests(toy_run):
    run_dir, _, _, result = toy_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HTTP Request" not in result.stderr
    assert "Traceback" not in result.stderr
    lines = console_lines(result.stderr)
    others = [line for line in lines if not STEP_LINE.match(line) and not BAR.match(line)]
    assert not others, others  # nothing but step lines and spin's progress bars
    for step in ITERATION_STEPS:
        assert sum(f"iteration 0: {step} " in line for line in lines) == 2, step
        assert any(re.search(rf"iteration 0: {step} done in [\d.]+ s$", x) for x in lines), step
    assert any(BAR.match(line) and line.startswith("train 0") for line in lines)
    assert any(BAR.match(line) and line.startswith("generate") for line in lines)
    assert "| θ1 |" in result.stdout  # the report still goes to stdout


def test_the_run_directory_keeps_the_full_log(toy_run):
    run_dir, _, _, result = toy_run
    log = (run_dir / "spin.log").read_text()
    assert " DEBUG " in log  # spin's own debug lines
    assert "prefect.flow_runs" in log and "prefect.task_runs" in log  # what the UI shows
    assert re.search(r"iter 0 step \d+/\d+ loss", log)  # each optimizer step
    assert "HTTP Request" not in log


def test_verbose_rerun_resumes_and_shows_the_info_lines(toy_run):
    run_dir, sets, home, first = toy_run
    assert first.returncode == 0
    result, _ = spin("run", "configs/demo.yaml", "--run-dir", str(run_dir), *sets, "-v", home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = console_lines(result.stderr)
    for step in ITERATION_STEPS:
        assert f"iteration 0: {step} already done" in "\n".join(lines)
    assert any(" INFO prefect.flow_runs: " in line for line in lines)  # -v: Prefect's lines
    assert "HTTP Request" not in result.stderr


# ------------------------------------------------------------------- bad input


def snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def refused(run_dir: Path, sets: list[str], home: Path, *expected: str) -> None:
    """Exit 2 with exactly one line on the console, in seconds, the run directory untouched."""
    before = snapshot(run_dir)
    result, seconds = spin("run", "configs/demo.yaml", "--run-dir", str(run_dir), *sets, home=home)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spin: error: "), result.stderr[-3000:]
    for fragment in expected:
        assert fragment in lines[0]
    assert seconds < BAD_INPUT_SECONDS
    assert snapshot(run_dir) == before


def _parquet(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path)
    return path


def test_missing_dataset_is_one_line(toy_build, tmp_path):
    sets = set_args(overrides(toy_build) + [f"data.dataset={tmp_path / 'nope.parquet'}"])
    refused(tmp_path / "run", sets, tmp_path / "h", "nope.parquet: file not found")
    assert not (tmp_path / "run").exists()


def test_wrong_columns_with_the_embedded_model_is_one_line(tmp_path):
    path = _parquet(tmp_path, pd.DataFrame({"question": ["a"] * 50, "answer": ["b"] * 50}))
    sets = set_args([f"data.dataset={path}", "data.num_prompts=8"])
    refused(tmp_path / "run", sets, tmp_path / "h", "bad.parquet", "messages")
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_empty_dataset_in_an_existing_run_directory_changes_nothing(toy_build, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "iter_0").mkdir(parents=True)
    (run_dir / "iter_0" / "notes.txt").write_text("finished work")
    (run_dir / "spin.log").write_text("an earlier run's log\n")
    blank = [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}]
    path = _parquet(tmp_path, pd.DataFrame({"messages": [blank] * 5}))
    sets = set_args(overrides(toy_build) + [f"data.dataset={path}"])
    refused(run_dir, sets, tmp_path / "h", "bad.parquet", "usable")


def test_a_deployment_run_fails_with_the_message_and_no_traceback(toy_build, tmp_path, caplog):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import spin_pipeline
    from spin_core.config import load_config

    config = load_config(
        "configs/demo.yaml", overrides(toy_build) + [f"data.dataset={tmp_path / 'nope.parquet'}"]
    )
    with prefect_test_harness():
        state = spin_pipeline(config, str(tmp_path / "run"), return_state=True)
    assert state.is_failed()
    assert "nope.parquet: file not found" in state.message
    assert "Traceback" not in caplog.text
    assert not (tmp_path / "run").exists()
