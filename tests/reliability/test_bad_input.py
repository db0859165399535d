"""Every bad-input case (docs/DESIGN.md §8): exit 2, one line naming the field or file, nothing lost.

Each case runs the real `spin run` entry point (in-process, on one Prefect test
server) against a run directory, and checks that the run directory is exactly
as it was before (or, for a new run directory, that nothing was written).
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flows.cli import main
from spin_core.config import load_config
from spin_core.storage.rundir import RunDir, save_config
from tests.overrides import overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(autouse=True)
def prefect_console_to_this_test():
    """Prefect's console handler keeps the stream it was made with; give it this test's."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for handler in (h for lg in loggers for h in lg.handlers):
        if isinstance(handler, PrefectConsoleHandler):
            handler.console.file = sys.stderr


@pytest.fixture
def base(toy_build) -> list[str]:
    return overrides(toy_build)


@pytest.fixture
def existing_run(tmp_path, base) -> Path:
    """A run directory with a saved config and finished work that must survive."""
    run = RunDir(tmp_path / "existing")
    save_config(run, load_config("configs/demo.yaml", base))
    run.iteration(0).mkdir()
    pd.DataFrame({"id": ["a"], "prompt": ["p"], "real": ["r"]}).to_parquet(run.prompts(0))
    (run.iteration(0) / "notes.txt").write_text("finished work")
    return run.root


def snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_spin(capfd, run_dir: Path, overrides: list[str], config: str = "configs/demo.yaml"):
    argv = ["run", config, "--run-dir", str(run_dir)]
    for item in overrides:
        argv += ["--set", item]
    code = main(argv)
    errors = [
        line for line in capfd.readouterr().err.splitlines() if line.startswith("spin: error:")
    ]
    return code, errors


def assert_refused(capfd, run_dir: Path, overrides: list[str], *expected: str, **kwargs) -> None:
    before = snapshot(run_dir)
    code, errors = run_spin(capfd, run_dir, overrides, **kwargs)
    assert code == 2
    assert len(errors) == 1, errors  # one line
    for fragment in expected:
        assert fragment in errors[0], errors[0]
    assert snapshot(run_dir) == before  # nothing written, overwritten or deleted


# ------------------------------------------------------------------------ config

CONFIG_CASES = {
    "unknown key": (["training.betta=0.2"], ["training.betta"]),
    "wrong type": (["training.num_epochs=two"], ["training.num_epochs"]),
    "beta <= 0": (["training.beta=0"], ["training.beta", "> 0"]),
    "lr <= 0": (["training.learning_rate=-1e-5"], ["training.learning_rate", "> 0"]),
    "iterations < 1": (["run.iterations=0"], ["run.iterations"]),
    "num_prompts < 1": (["data.num_prompts=0"], ["data.num_prompts"]),
    "max_prompt_length >= max_length": (
        ["training.max_length=64", "training.max_prompt_length=64"],
        ["max_prompt_length", "max_length"],
    ),
    "global batch not divisible": (["training.global_batch_size=30"], ["global_batch_size"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_refused(case, capfd, existing_run, base):
    overrides, expected = CONFIG_CASES[case]
    assert_refused(capfd, existing_run, base + overrides, *expected)


def test_unknown_key_in_the_yaml_file_is_refused(capfd, tmp_path, existing_run, base):
    config = tmp_path / "typo.yaml"
    config.write_text(Path("configs/demo.yaml").read_text() + "\nrun:\n  iteratons: 2\n")
    assert_refused(capfd, existing_run, base, "typo.yaml", config=str(config))


# ------------------------------------------------------------------------ data and model


def _bad_parquet(tmp_path: Path, frame: pd.DataFrame) -> str:
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path)
    return str(path)


def test_missing_dataset_file(capfd, prefect_server, tmp_path, base):
    missing = tmp_path / "nowhere.parquet"
    assert_refused(capfd, tmp_path / "run", base + [f"data.dataset={missing}"], "nowhere.parquet")


def test_unreadable_dataset_file(capfd, prefect_server, tmp_path, base):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet" * 10)
    assert_refused(capfd, tmp_path / "run", base + [f"data.dataset={garbage}"], "garbage.parquet")


def test_dataset_without_the_expected_columns(capfd, prefect_server, tmp_path, base):
    path = _bad_parquet(tmp_path, pd.DataFrame({"question": ["a"] * 50, "answer": ["b"] * 50}))
    assert_refused(capfd, tmp_path / "run", base + [f"data.dataset={path}"], "bad.parquet")


def test_dataset_with_no_usable_rows(capfd, prefect_server, tmp_path, base):
    path = _bad_parquet(tmp_path, pd.DataFrame({"prompt": [""] * 50, "response": [" "] * 50}))
    overrides = base + [
        f"data.dataset={path}",
        "data.prompt_column=prompt",
        "data.response_column=response",
    ]
    assert_refused(capfd, tmp_path / "run", overrides, "bad.parquet", "usable")


def test_fewer_rows_than_num_prompts(capfd, prefect_server, tmp_path, base):
    assert_refused(capfd, tmp_path / "run", base + ["data.num_prompts=100000"], "data.num_prompts")


def test_missing_model_path(capfd, prefect_server, tmp_path, base):
    overrides = base + [f"model.name_or_path={tmp_path / 'no-model'}"]
    assert_refused(capfd, tmp_path / "run", overrides, "model.name_or_path", "no-model")


def test_model_that_is_not_a_causal_lm(capfd, prefect_server, tmp_path, base):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "distilbert"}))
    overrides = base + [f"model.name_or_path={encoder}"]
    assert_refused(capfd, tmp_path / "run", overrides, "model.name_or_path", "not a causal")


def test_vllm_backend_without_vllm_installed(capfd, prefect_server, tmp_path, base):
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    overrides = base + ["generation.backend=vllm"]
    assert_refused(capfd, tmp_path / "run", overrides, "generation.backend", "generation.python")


# ------------------------------------------------------------------------ run directory


def test_run_directory_held_by_a_live_run(capfd, prefect_server, existing_run, base):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        RunDir(existing_run).lock.write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "t0"})
        )
        assert_refused(capfd, existing_run, base, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_run_directory_started_with_a_different_config(capfd, prefect_server, existing_run, base):
    overrides = base + ["training.beta=0.5"]
    assert_refused(capfd, existing_run, overrides, "training.beta", "--run-dir")


# ------------------------------------------------ the embedded default with the user's input

SMALL = ["data.num_prompts=32", "data.eval_size=16", "training.global_batch_size=8"]


def _mixed_refused(capfd, run_dir: Path, overrides: list[str], *expected: str) -> None:
    """Refused in seconds: the user's input is checked before the embedded θ0 is built."""
    import time

    started = time.monotonic()
    assert_refused(capfd, run_dir, [*SMALL, "training.micro_batch_size=4", *overrides], *expected)
    assert not (run_dir / "toy").exists()
    assert time.monotonic() - started < 60  # building θ0 alone takes minutes


def test_toy_model_with_a_missing_dataset(capfd, prefect_server, tmp_path):
    missing = tmp_path / "missing.parquet"
    _mixed_refused(capfd, tmp_path / "run", [f"data.dataset={missing}"], "missing.parquet")


def test_toy_model_with_a_dataset_of_the_wrong_columns(capfd, prefect_server, tmp_path):
    path = _bad_parquet(tmp_path, pd.DataFrame({"question": ["a"] * 50, "answer": ["b"] * 50}))
    _mixed_refused(capfd, tmp_path / "run", [f"data.dataset={path}"], "bad.parquet", "messages")


def test_toy_model_with_an_empty_dataset(capfd, prefect_server, tmp_path):
    blank = [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}]
    path = _bad_parquet(tmp_path, pd.DataFrame({"messages": [blank] * 5}))
    _mixed_refused(capfd, tmp_path / "run", [f"data.dataset={path}"], "bad.parquet", "usable")


def test_toy_data_with_a_missing_model(capfd, prefect_server, tmp_path):
    overrides = [f"model.name_or_path={tmp_path / 'no-model'}"]
    _mixed_refused(capfd, tmp_path / "run", overrides, "model.name_or_path", "no-model")
