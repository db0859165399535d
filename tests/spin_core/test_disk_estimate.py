"""`spin check`'s disk estimate: what an iteration writes, against the free space there."""

from __future__ import annotations

import shutil
from collections import namedtuple

from spin_core.config import load_config
from spin_core.memory import GIB, ModelShape
from spin_core.preflight import estimate_disk

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
    assert round(disk.model / GIB, 1) == 13.5  # bf16 weights
    # bf16 weights + fp32 master + RMSprop's square_avg: 10 bytes a parameter
    assert disk.checkpoint == 7_241_732_096 * 10
    assert disk.kept_checkpoints == 3  # keep_checkpoints 2 + the one being written


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
