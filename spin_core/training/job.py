"""What one iteration's training is given: a `TrainJob`.

The pipeline's training step, the launched ranks (`python -m spin_core.training.rank
ARGS.json`, where ARGS.json is `{"config": ..., "job": TrainJob.to_json()}`), the benchmarks
and the tests all hand `train.run_rank` / `train.train_iteration` this one object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class TrainJob:
    """Train θ(t+1) from `init_model` (θt) on `train_path`; export it to `model_out`.

    objective: "spin" (the SPIN loss against the opponent's stored log-probs) or "sft"
    (continued SFT on the real responses, the baseline).
    scored_path: where the training ranks write `train_path` with θt's log-probs when it
    has none yet (train.parquet); a rerun reuses it.
    num_steps: the number of optimizer steps (the baseline matches SPIN's); by default
    num_epochs × ceil(pairs / global_batch_size).
    lr_scale: multiplies the iteration's learning rate (a retry after a collapse).
    opponent_eval_file: θt's eval.parquet; with `training.eval_steps` set, the held-out
    real log-likelihood is checked against it during training.
    """

    init_model: str
    train_path: str | Path
    state_dir: str | Path
    model_out: str | Path
    iteration: int
    objective: str = "spin"
    scored_path: str | Path | None = None
    num_steps: int | None = None
    lr_scale: float = 1.0
    opponent_eval_file: str | Path | None = None

    def to_json(self) -> dict:
        """Plain values (paths as strings), for ARGS.json."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, values: dict) -> TrainJob:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainJob: unknown fields {unknown}")
        return cls(**values)
