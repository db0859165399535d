"""`spin check`: the pre-flight report and its exit codes, in seconds, without training."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from spin_core.config import load_config
from spin_core.reports.preflight import optimizer_steps, preflight
from spin_core.training.memory import GIB, ModelShape, estimate_memory

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
PAPER = str(ROOT / "configs" / "zephyr-7b-ultrachat.yaml")
SMALL = ["data.num_prompts=50", "data.eval_size=10"]
# Mistral-7B-v0.1's shapes (its config.json on the hub).
MISTRAL_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=32000,
    max_position_embeddings=32768,
    sliding_window=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
MISTRAL_7B_PARAMETERS = 7_241_732_096


@pytest.fixture
def roomy_disk(monkeypatch):
    """A run directory with 10 TB free: the GPU-memory checks below, not this machine's disk
    (the disk estimate has its own tests, tests/spin_core/test_disk_estimate.py)."""
    usage = shutil.disk_usage(".")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10**13))


def check(capsys, config: str, *sets: str, gib: float | None = None, run_dir=None):
    argv = ["check", config, *(a for s in sets for a in ("--set", s))]
    argv += ["--gpu-memory-gib", str(gib)] if gib is not None else []
    argv += ["--run-dir", str(run_dir)] if run_dir is not None else []
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _tokenizer_only_dir(source: Path, out: Path) -> Path:
    """The tokenizer files of `source` in `out`, without weights or model config."""
    out.mkdir(parents=True)
    for path in source.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def mistral_7b_dir(mistral_build, tmp_path_factory):
    """Mistral-7B's config.json (no weights) next to its real tokenizer."""
    from transformers import MistralConfig

    out = _tokenizer_only_dir(mistral_build.model_dir, tmp_path_factory.mktemp("m7b") / "model")
    MistralConfig(bos_token_id=1, eos_token_id=2, **MISTRAL_7B).save_pretrained(out)
    assert not list(out.glob("*.safetensors"))
    return out


def _paper(mistral_build, model_dir, *extra):
    return [*mistral_build.config_overrides(), *SMALL, f"model.name_or_path={model_dir}", *extra]


# ------------------------------------------------------------------------- CLI


def test_demo_config_on_the_toy_prints_steps_and_memory(capsys, toy_build):
    sets = [*toy_build.config_overrides(), "data.num_prompts=64", "data.eval_size=40"]
    code, out, err = check(capsys, DEMO, *sets)
    assert code == 0, err
    assert "## Optimizer steps" in out and "| iteration | training pairs (at most)" in out
    # demo.yaml: history 0, 64 prompts / global batch 32 × 2 epochs = 4 steps, 3 iterations.
    assert "| 0–2 | 64 | 2 | 4 |" in out and "12 optimizer steps" in out
    assert "## GPU memory per rank (estimate)" in out and "| **peak** |" in out
    assert "ZeRO-0, fp32 throughout, AdamW (2 fp32 states)" in out
    assert "Result: ok" in out


def test_tiny_max_prompt_length_with_drop_exits_2(capsys, toy_build):
    sets = [
        *toy_build.config_overrides(),
        "data.num_prompts=64",
        "data.eval_size=40",
        "training.max_prompt_length=4",
        "data.overlong_prompts=drop",
    ]
    code, out, err = check(capsys, DEMO, *sets)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spin: error: training.max_prompt_length (4)")
    assert "would be dropped" in lines[0]
    assert "prompts longer than training.max_prompt_length (4): 600 of 600 (100.0 %)" in out


def test_paper_recipe_with_a_mistral_stand_in_shows_the_tokens(capsys, mistral_build):
    code, out, err = check(capsys, PAPER, *mistral_build.config_overrides(), *SMALL)
    assert code == 0, err
    tokens = out.split("tokens: ")[1].split("```")[0]
    # BOS first, zephyr's "<|assistant|>\n" ends the prompt (\n is byte 13), then `|`.
    assert tokens.split("\n", 1)[1].strip().startswith("1:<s> ")
    assert re.search(r"13:<0x0A>\s+\|\s+\d+:\S", tokens), tokens
    assert tokens.rstrip().endswith("2:</s>")
    assert "| prompt | " in out and "| response (real) | " in out
    # iteration 0: 50 pairs; iterations 1–3 mix in one earlier iteration (history 1).
    assert "| 0 | 50 | 1 | 2 |" in out and "| 1–3 | 100 | 2 | 4 |" in out
    assert "8 ranks, ZeRO-3, bf16 compute, fp32 master weights" in out


def test_mistral_7b_on_8_ranks_zero3_fits_80_gib(capsys, mistral_build, mistral_7b_dir, roomy_disk):
    cfg = load_config(PAPER, _paper(mistral_build, mistral_7b_dir))
    report = preflight(cfg, gpu_memory_gib=80)
    assert report.shape.parameters == MISTRAL_7B_PARAMETERS
    memory = report.memory
    # (2 + 2 + 4 + 4) B × 7.24e9 / 8 ranks: bf16 weights and gradients, fp32 master, RMSprop.
    assert 10 < memory.states / GIB < 12
    assert memory.states == pytest.approx(12 * MISTRAL_7B_PARAMETERS / 8)
    assert 12 < memory.peak / GIB < 40 and memory.fits(80 * GIB)
    assert memory.activations_full > 10 * memory.activations_checkpointed
    code, out, err = check(capsys, PAPER, *_paper(mistral_build, mistral_7b_dir))
    assert code == 0, err
    assert "7.24B parameters (exact)" in out
    generation = out.split("GPU memory per generation worker (estimate)")[1]
    assert (
        "backend hf, 8 worker(s)" in generation and "Peak 42.0 GiB of 80 GiB: fits." in generation
    )


def test_mistral_7b_on_1_rank_zero0_exceeds_80_gib(
    capsys, mistral_build, mistral_7b_dir, roomy_disk
):
    sets = _paper(
        mistral_build, mistral_7b_dir, "training.num_processes=1", "training.zero_stage=0"
    )
    code, out, err = check(capsys, PAPER, *sets)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("spin: error: GPU memory: the estimate of")
    # On one GPU it says what can be done there, with the estimate: "ZeRO-3 over 2 ranks"
    # cannot be acted on, and no micro-batch fits beside 81 GiB of model states.
    lora = re.search(r"training\.lora: \{\} \(LoRA r=16 on 7 projections\) \(([\d.]+) GiB\)", line)
    assert lora and float(lora.group(1)) < 80
    assert "ZeRO-3" not in line and "micro_batch_size" not in line
    assert "does NOT fit" in out
    peak = float(re.search(r"estimate of ([\d.]+) GiB", line).group(1))
    assert peak > 80  # 12 B × 7.24e9 = 81 GiB of model states alone


def test_when_nothing_fits_on_these_gpus_it_says_how_many_would_do(
    capsys, mistral_build, mistral_7b_dir, roomy_disk
):
    """LoRA on one 16 GiB GPU: the bf16 weights alone (14.5 GB) leave no room to train."""
    sets = _paper(
        mistral_build,
        mistral_7b_dir,
        "training.num_processes=1",
        "training.zero_stage=0",
        "training.lora={}",
    )
    code, _, err = check(capsys, PAPER, *sets, gib=16)
    assert code == 2
    line = next(x for x in err.splitlines() if "GPU memory: the estimate" in x)
    assert "it fits with" not in line
    assert re.search(r"ZeRO-3 over at least \d+ GPUs \(training.num_processes\)", line)


def test_template_that_cannot_split_exits_2(capsys, mistral_build, tmp_path):
    # No chat template: the plain "### Response: " ends with a space that SentencePiece
    # merges into the response's first word, so no prompt/response split is right.
    model = _tokenizer_only_dir(mistral_build.model_dir, tmp_path / "plain")
    shutil.copy(mistral_build.model_dir / "config.json", model / "config.json")
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    code, out, err = check(capsys, PAPER, *_paper(mistral_build, model))
    assert code == 2
    assert "not a prefix of the conversation's" in err and "template 'plain'" in err


def test_toy_not_built_yet_is_said_and_skipped(capsys, tmp_path):
    code, out, err = check(capsys, DEMO, run_dir=tmp_path / "demo")
    assert code == 0, err
    assert "is not built yet" in out and "are skipped" in out
    assert "| 0–2 | 1500 | 47 | 94 |" in out  # steps need only the config
    assert "GPU memory" not in out


def test_bad_config_exits_2_naming_the_field(capsys):
    code, _, err = check(capsys, DEMO, "training.micro_batch_size=0")
    assert code == 2 and "training.micro_batch_size" in err


# --------------------------------------------------------------------- library


def _shape(**changes) -> ModelShape:
    dims = dict(
        name_or_path="m",
        model_type="mistral",
        parameters=MISTRAL_7B_PARAMETERS,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        gated_mlp=True,
        largest_module=32000 * 4096,
    )
    return ModelShape(**(dims | changes))


def _memory(**changes):
    settings = dict(
        num_processes=8,
        zero_stage=3,
        bf16=True,
        optimizer="rmsprop",
        micro_batch_size=8,
        max_length=1024,
        gradient_checkpointing=True,
    )
    return estimate_memory(_shape(), **(settings | changes))


def test_zero_stages_partition_the_model_states():
    psi = MISTRAL_7B_PARAMETERS
    assert _memory(zero_stage=0).states == pytest.approx(12 * psi)
    assert _memory(zero_stage=1).states == pytest.approx((2 + 2 + 8 / 8) * psi)
    assert _memory(zero_stage=2).states == pytest.approx((2 + 10 / 8) * psi)
    assert _memory(zero_stage=3).states == pytest.approx(12 * psi / 8)
    assert _memory(optimizer="adamw").states == pytest.approx(16 * psi / 8)  # the ZeRO paper's 16Ψ
    assert _memory(bf16=False).states == pytest.approx(12 * psi / 8)  # fp32: 4 + 4 + 4, no master


def test_activation_formulas():
    s, b, h, layers = 1024, 16, 4096, 32
    on, off = _memory(), _memory(gradient_checkpointing=False)
    # Gated MLP at i = 3.5h: (7 + 4·8/32) + (3 + 8·3.5) + 4 = 43 s·b·h bytes per layer.
    assert off.activations_full == pytest.approx(layers * 43 * s * b * h)
    assert on.activations_checkpointed == pytest.approx(2 * s * b * h * layers + 43 * s * b * h)
    assert on.peak < off.peak
    eager = _memory(attn_implementation="eager", gradient_checkpointing=False)
    assert eager.activations_full - off.activations_full == pytest.approx(
        layers * 5 * 32 * s * s * b
    )
    # Korthikanti et al.'s 34 for multi-head attention and a 4h MLP without gating.
    plain = estimate_memory(
        _shape(num_kv_heads=32, intermediate_size=4 * 4096, gated_mlp=False),
        num_processes=1,
        zero_stage=0,
        bf16=True,
        optimizer="rmsprop",
        micro_batch_size=1,
        max_length=s,
        gradient_checkpointing=False,
    )
    assert plain.activations_full == pytest.approx(layers * 34 * s * 2 * h)


def test_optimizer_steps_of_the_paper_recipe():
    rows = optimizer_steps(load_config(PAPER))
    # 50k prompts, global batch 64, 2 epochs; iterations 1-3 also train on t-1's 50k pairs.
    assert [(r.iterations, r.pairs, r.steps) for r in rows] == [
        ("0", 50_000, 2 * 782),
        ("1–3", 100_000, 2 * 1563),
    ]


def test_lora_trains_only_the_adapter(mistral_7b_dir):
    from spin_core.training.memory import lora_parameters, model_shape

    shape = model_shape(str(mistral_7b_dir))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # r·(in + out) per projection: (2·8192 + 2·5120 + 3·18432)·16 per layer, 32 layers.
    adapter = lora_parameters(shape, 16, targets)
    assert adapter == 41_943_040
    one_gpu = dict(num_processes=1, zero_stage=0, bf16=True, optimizer="rmsprop")
    lora = estimate_memory(
        shape,
        **one_gpu,
        micro_batch_size=8,
        max_length=1024,
        gradient_checkpointing=True,
        trainable=adapter,
        adapter="LoRA r=16",
    )
    psi = MISTRAL_7B_PARAMETERS
    assert lora.states == pytest.approx(2 * (psi + adapter) + (2 + 4 + 4) * adapter)
    assert lora.fits(80 * GIB) and "41.94M trainable parameters" in lora.settings
    full = estimate_memory(
        shape, **one_gpu, micro_batch_size=8, max_length=1024, gradient_checkpointing=True
    )
    assert not full.fits(80 * GIB)
