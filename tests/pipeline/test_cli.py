"""The `spin` command as a user runs it: a subprocess, exit codes, printed output."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPIN = [sys.executable, "-m", "flows.cli"]
TINY = [
    "toy.num_train=300",
    "toy.num_eval=40",
    "toy.sft_steps=30",
    "data.num_prompts=32",
    "data.eval_size=24",
    "run.iterations=1",
    "training.global_batch_size=16",
    "training.micro_batch_size=16",
    "training.num_epochs=1",
    "generation.max_new_tokens=16",
]


def spin(*args, timeout=600):
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run(
        [*SPIN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "demo"
    sets = [a for s in TINY for a in ("--set", s)]
    result = spin("demo", "--run-dir", str(run_dir), *sets)
    return run_dir, result


@pytest.mark.slow  # runs the real pipeline
def test_demo_runs_end_to_end_and_prints_the_metrics_table(demo_run):
    run_dir, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "## Held-out metrics per model" in result.stdout
    assert "| θ0 |" in result.stdout and "| θ1 |" in result.stdout
    assert (run_dir / "iter_0" / "model" / "model.safetensors").exists()
    assert (run_dir / "metrics.parquet").exists()


@pytest.mark.slow  # runs the real pipeline
def test_report_rebuilds_from_an_existing_run(demo_run):
    run_dir, _ = demo_run
    (run_dir / "report.md").unlink()
    result = spin("report", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "report.md").exists()
    assert "| θ1 |" in result.stdout


@pytest.mark.slow  # runs the real pipeline
def test_rerun_with_a_result_changing_config_is_refused(demo_run):
    run_dir, _ = demo_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    sets = [a for s in [*TINY, "training.beta=0.7"] for a in ("--set", s)]
    result = spin("demo", "--run-dir", str(run_dir), *sets)
    assert result.returncode == 2
    assert "training.beta differ" in result.stderr and "new --run-dir" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_bad_config_exits_2_naming_the_field(tmp_path):
    config = tmp_path / "bad.yaml"
    shutil.copy(ROOT / "configs" / "demo.yaml", config)
    result = spin(
        "run", str(config), "--run-dir", str(tmp_path / "run"), "--set", "training.beta=-1"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("spin: error:")
    assert "training.beta" in result.stderr and "must be > 0" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_config_file_exits_2(tmp_path):
    result = spin("run", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml: config file not found" in result.stderr


def test_missing_model_directory_exits_2(tmp_path):
    result = spin(
        "run",
        str(ROOT / "configs" / "demo.yaml"),
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        "data.dataset=" + str(tmp_path / "nodata.parquet"),
        "--set",
        "model.name_or_path=" + str(tmp_path / "no-model"),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no-model does not exist" in result.stderr


def test_a_run_time_failure_ends_with_one_line_naming_step_iteration_and_log(tmp_path, monkeypatch):
    """Exit 1's last line: the step that failed, its iteration, the error and spin.log."""
    import pytest

    from flows import cli
    from spin_core import console

    monkeypatch.setattr(cli, "_RUN_DIRS", [str(tmp_path)])
    monkeypatch.setattr(console, "_failure", [])
    with pytest.raises(RuntimeError) as error:
        with console.announce("train-policy", {"iteration": 1}):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    line = cli._failure_line(error.value)
    assert line == (
        "spin: failed: iteration 1: train-policy failed: RuntimeError: CUDA error: an illegal "
        "memory access was encountered; "
        f"full log: {tmp_path.resolve() / 'spin.log'}"
    )
