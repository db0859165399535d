"""A promoted iteration's DeepSpeed checkpoints are removed; its step log and curves stay."""

from __future__ import annotations

from spin_core.config import SpinConfig
from spin_core.storage.rundir import RunDir


def _fake_state(state) -> None:
    for tag in ("step_000002", "step_000004"):
        (state / tag).mkdir(parents=True)
        (state / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    (state / "latest").write_text("step_000004")
    (state / "metrics.jsonl").write_text('{"step": 1}\n')
    (state / "tensorboard").mkdir()


def test_remove_checkpoints_keeps_the_step_log_and_tensorboard(tmp_path):
    run = RunDir(tmp_path / "run")
    _fake_state(run.train_state(0))
    _fake_state(run.baseline(0) / "train_state")
    removed = run.remove_checkpoints(0)
    assert len(removed) == 6
    for state in (run.train_state(0), run.baseline(0) / "train_state"):
        assert sorted(p.name for p in state.iterdir()) == ["metrics.jsonl", "tensorboard"]
    assert run.remove_checkpoints(0) == []  # nothing left to remove: a rerun is a no-op


def test_checkpoints_are_removed_by_default():
    assert SpinConfig().training.keep_finished_state is False
