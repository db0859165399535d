"""Ranks act on rank 0's view of the shared filesystem, not each on its own.

Two nodes on NFS can see different states of `train_state/` for up to a minute after a
restart. Each test starts 2 gloo ranks whose "filesystems" differ: rank 1's is the lagging
view (an older checkpoint, no scored pairs yet). Acting on its own view, rank 1 would load
another checkpoint than rank 0, or score while rank 0 trains, and the collectives would hang.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from spin_core.storage.files import write_parquet_atomic
from spin_core.training.state import COMPLETE_MARKER, _wait_visible, resume_point
from spin_core.training.train import _score_opponent


def _in_group(rank: int, init_file: str, body, views: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = body(Path(views[rank]))
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, body, views: list[Path]) -> list:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(
        _in_group,
        args=(str(tmp_path / "init"), body, [str(v) for v in views], str(out)),
        nprocs=2,
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _checkpoints(state_dir: Path, steps: list[int]) -> Path:
    for step in steps:
        tag = state_dir / f"step_{step:06d}"
        tag.mkdir(parents=True)
        (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    return state_dir


def _resume_point(state_dir: Path):
    return list(resume_point(state_dir))


def test_every_rank_resumes_from_the_checkpoint_rank_0_sees(tmp_path):
    views = [
        _checkpoints(tmp_path / "node0", [2, 4]),
        _checkpoints(tmp_path / "node1", [2]),  # the lagging view: step 4 not seen yet
    ]
    assert _run_two_ranks(tmp_path, _resume_point, views) == [[4, "step_000004"]] * 2


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt": ["a", "b", "c"], "generated_ids": [[1], [2], [3]]})


def _scored(view: Path):
    # Without a decision from rank 0, rank 1 (no file in its view) would score with the
    # engine, which is None here: it would fail instead of returning.
    scored = _score_opponent(None, _frame(), None, 0, view / "train.parquet", world_size=2)
    return scored[["opponent_real_logps", "opponent_generated_logps"]].values.tolist()


def test_every_rank_takes_the_scored_pairs_rank_0_sees(tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    scores = {"opponent_real_logps": [-1.0, -2.0, -3.0], "opponent_generated_logps": [-4.0] * 3}
    write_parquet_atomic(_frame().assign(**scores), node0 / "train.parquet")
    expected = [[-1.0, -4.0], [-2.0, -4.0], [-3.0, -4.0]]
    assert _run_two_ranks(tmp_path, _scored, [node0, node1]) == [expected, expected]


def test_a_checkpoint_this_rank_never_sees_is_named_after_the_wait(tmp_path):
    missing = tmp_path / "step_000004" / COMPLETE_MARKER
    with pytest.raises(FileNotFoundError, match="step_000004.*shares"):
        _wait_visible(missing, within=0.2)
