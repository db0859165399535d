"""`spin check`'s disk estimate: what an iteration writes, against the free space there."""

from __future__ import annotations

import shutil
from collections import namedtuple

from spin_core.config import load_config
from spin_core.reports.preflight import estimate_disk
from spin_core.training.memory import GIB, ModelShape

PAPER = "configs/zephyr-7b-ultrachat.yaml"
MISTRAL_7B = ModelShape(
    name_or_path="m",
    model_type="mistral",
    parameters=7_241_732_096,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    intermediate_size=14336,
    vocab_size=32000,
    gated_mlp=True,
    largest_module=32000 * 4096,
)


def test_a_7b_iteration_writes_its_model_and_bf16_rmsprop_checkpoints(tmp_path):
    disk = estimate_disk(load_config(PAPER), MISTRAL_7B, tmp_path / "run")
    assert round(disk.model / GIB, 1) == 27.0  # fp32 weights (training.export_dtype)
    bf16_export = load_config(PAPER, ["training.export_dtype=bf16"])
    assert round(estimate_disk(bf16_export, MISTRAL_7B, tmp_path).model / GIB, 1) == 13.5
    # bf16 weights + fp32 master + RMSprop's square_avg: 10 bytes a parameter
    assert disk.checkpoint == 7_241_732_096 * 10
    assert disk.kept_checkpoints == 3  # keep_checkpoints 2 + the one being written


def test_the_checkpoints_an_iteration_writes_are_counted_in_bytes_and_minutes(tmp_path):
    """The recipe: 1,563 steps in iteration 0 (50k pairs, 2 epochs, batch 64), 3,125 in each
    later one (100k pairs); one checkpoint every save_steps and one at the end."""
    from spin_core.reports.preflight import checkpoint_write_lines, optimizer_steps

    def line(save_steps: int) -> str:
        cfg = load_config(PAPER, [f"training.save_steps={save_steps}"])
        checkpoint = estimate_disk(cfg, MISTRAL_7B, tmp_path).checkpoint
        return checkpoint_write_lines(checkpoint, cfg, optimizer_steps(cfg))[0]

    assert "iteration 0: 4 × 67.44 GiB = 269.8 GiB, 5 min at 1 GB/s" in line(500)
    assert "iteration 1–3: 7 × 67.44 GiB = 472.1 GiB, 8 min at 1 GB/s" in line(500)
    # What the official code's 100 writes: 1.1 TB (16 saves) and 2.1 TB (32) per iteration.
    assert "iteration 1–3: 32 × 67.44 GiB = 2158.2 GiB, 39 min at 1 GB/s" in line(100)


def test_finished_checkpoints_are_not_counted_unless_kept(tmp_path):
    cfg = load_config(PAPER, ["run.iterations=3"])
    removed = estimate_disk(cfg, MISTRAL_7B, tmp_path)
    kept = estimate_disk(
        load_config(PAPER, ["run.iterations=3", "training.keep_finished_state=true"]),
        MISTRAL_7B,
        tmp_path,
    )
    assert kept.needed() - removed.needed() == 2 * 3 * removed.checkpoint


def test_spin_check_exits_2_when_the_run_cannot_fit(monkeypatch, capsys, toy_build, tmp_path):
    from flows.cli import main
    from tests.overrides import overrides

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    argv = ["check", "configs/demo.yaml", "--run-dir", str(tmp_path / "run")]
    argv += [a for s in overrides(toy_build) for a in ("--set", s)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Disk (estimate)" in out
    assert "spin: error: disk: the run needs about" in err and "0.0 GiB free" in err
    monkeypatch.undo()
    assert main(argv) == 0  # the same check with this machine's free space


def test_a_generation_worker_of_the_7b_recipe_fits_on_an_80_gib_gpu():
    """bf16 weights 13.5 GiB, the KV cache of the recipe's 131,072 tokens (32 layers × 8 kv
    heads × 128 × 2 × 2 B = 128 KiB a token: 16 GiB), and a prefill layer's MLP (10.5 GiB)."""
    from spin_core.training.memory import generation_memory

    memory = generation_memory(load_config(PAPER), MISTRAL_7B, 80 * GIB)
    kv = next(r for r in memory.rows if r.name.startswith("KV cache"))
    assert kv.bytes == 131_072 * 128 * 1024
    assert 42 < memory.peak / GIB < 43 and memory.fits()


def test_generation_that_cannot_fit_is_refused_with_the_field_to_change(tmp_path):
    from spin_core.training.memory import generation_memory, generation_memory_problem

    big = load_config(PAPER, ["generation.batch_tokens=1000000"])
    memory = generation_memory(big, MISTRAL_7B, 80 * GIB)
    assert not memory.fits()
    problem = generation_memory_problem(memory, big, 80 * GIB)
    fitting = int(problem.split("generation.batch_tokens ≤ about ")[1].split()[0])
    resized = load_config(PAPER, [f"generation.batch_tokens={fitting}"])
    assert generation_memory(resized, MISTRAL_7B, 80 * GIB).fits()
    assert not generation_memory(
        load_config(PAPER, [f"generation.batch_tokens={int(fitting * 1.1)}"]), MISTRAL_7B, 80 * GIB
    ).fits()
    # vLLM on a 24 GiB GPU at 0.6 of it: 14.4 GiB holds the weights and no KV cache
    small = load_config(PAPER, ["generation.backend=vllm", "generation.gpu_memory_utilization=0.6"])
    memory = generation_memory(small, MISTRAL_7B, 24 * GIB)
    assert not memory.fits()
    assert "generation.gpu_memory_utilization" in generation_memory_problem(memory, small, 24 * GIB)
    tp2 = load_config(
        PAPER,
        [
            "generation.backend=vllm",
            "generation.gpu_memory_utilization=0.6",
            "generation.tensor_parallel_size=2",
            "generation.num_workers=1",
        ],
    )
    assert generation_memory(tp2, MISTRAL_7B, 24 * GIB).fits()  # half the weights per GPU
