"""Every benchmark starts: its command line parses (`--help`), so `make bench` cannot break
unnoticed between the runs that produce docs/PERFORMANCE.md. The real-model benchmarks
also parse `--model smollm2` (parsed only: `--help` after it, nothing is measured)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "_common")
BENCHMARKS = [name for name in BENCHMARKS if name != "__init__"]
REAL_MODEL_BENCHMARKS = ["bench_generate", "bench_train"]


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_command_line_parses(name):
    done = _run(name, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


@pytest.mark.parametrize("name", REAL_MODEL_BENCHMARKS)
def test_real_model_benchmarks_take_model_smollm2(name):
    done = _run(name, "--model", "smollm2", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--model {toy,smollm2}" in done.stdout
    # An unknown model is refused by the parser (exit 2), naming the choices.
    refused = _run(name, "--model", "gpt2", "--help")
    assert refused.returncode == 2
    assert "invalid choice: 'gpt2'" in refused.stderr and "smollm2" in refused.stderr


def test_missing_real_model_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Without the imported model directory, `smollm2_dir` exits 2 naming it and the fix."""
    from benchmarks import _common

    monkeypatch.setattr(_common, "ROOT", tmp_path)
    with pytest.raises(SystemExit) as exited:
        _common.smollm2_dir()
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "models" / "SmolLM2-135M-Instruct") in error
    assert "spin import-gguf smollm2" in error


def test_model_shapes_of_smollm2():
    """The timed matmuls are SmolLM2's: 30 layers of 576-wide attention (3 KV heads of 64) and
    a 1536-wide MLP, plus the 49152-token head; their FLOPs a token are 2 × its parameters
    less the embedding lookup and the norms."""
    from transformers import LlamaConfig

    from benchmarks import _common

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
    )
    shapes = _common.model_shapes(config)
    assert (576, 192, 30) in shapes and (1536, 576, 30) in shapes and (576, 49152, 1) in shapes
    weights = sum(i * o * n for i, o, n in shapes)
    assert weights == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152


def test_report_keeps_rows_that_have_no_new_result():
    """Rewriting the table from results.jsonl keeps the earlier rows of benchmarks not rerun
    (here the overhead row), and replaces the rows of those that were (generate)."""
    from benchmarks import report

    old = "\n".join(
        [
            *report.HEADER,
            "| generate | working tree | old figures | 9.66× faster | t | **no** | m | d | `c` |",
            "| overhead | working tree | plain loop 30 s | 1.573× | t | **no** | m | d | `c` |",
        ]
    )
    new = {"benchmark": "generate", "code": "working tree"}
    assert report.kept_rows(old, [new]) == [old.splitlines()[-1]]
