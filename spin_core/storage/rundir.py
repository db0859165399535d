"""The run directory (docs/DESIGN.md §7): where every stage's output lives, and who holds it.

    runs/<name>/spin.yaml, .lock, heldout.parquet, theta0/, iter_<t>/..., metrics.parquet, report.md

Paths are pure functions of the run directory and the iteration, so any stage
can be rerun alone from its inputs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from spin_core.config import TOY, SpinConfig, result_changing_differences, validate_config
from spin_core.errors import InputError
from spin_core.storage.files import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

# In a training state directory (train_state/): the step log and the export's summary.
STEP_LOG = "metrics.jsonl"
EXPORT_SUMMARY = "export.json"


@dataclass(frozen=True)
class EvalDir:
    """Where one model's held-out evaluation lives: eval.parquet (one row per prompt) and
    metrics.json (its summary). θ0's is theta0/, θ(t+1)'s iter_t/, SFT baseline t's
    iter_t/baseline/."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def eval(self) -> Path:
        return self.root / "eval.parquet"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def done(self) -> bool:
        """Whether both files are there (eval.parquet complete)."""
        from spin_core.storage.files import parquet_complete

        return self.metrics.exists() and parquet_complete(self.eval)


@dataclass
class ToyArtifacts:
    """Where the embedded default (`spin_core.toy.build_toy`) puts its dataset and θ0."""

    data_dir: Path
    train_path: Path
    eval_path: Path
    model_dir: Path

    def config_overrides(self) -> list[str]:
        """`--set` overrides that point a config at this build's data and θ0."""
        return [
            f"data.dataset={self.train_path}",
            f"data.eval_dataset={self.eval_path}",
            f"model.name_or_path={self.model_dir}",
        ]


def toy_artifacts(out_dir: str | os.PathLike) -> ToyArtifacts:
    """The embedded default's layout in `out_dir` (RUN/toy/): data/train.parquet,
    data/eval.parquet and theta0/."""
    data_dir = Path(out_dir) / "data"
    return ToyArtifacts(
        data_dir=data_dir,
        train_path=data_dir / "train.parquet",
        eval_path=data_dir / "eval.parquet",
        model_dir=Path(out_dir) / "theta0",
    )


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    # run level
    @property
    def config(self) -> Path:
        return self.root / "spin.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.parquet"

    @property
    def toy(self) -> Path:
        return self.root / "toy"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def launch_request(self) -> Path:
        """A multi-node torchrun launch that nodes 1 … N−1 join (spin_core/training/launch.py)."""
        return self.root / ".train-launch.json"

    @property
    def prefect_results(self) -> Path:
        """Prefect's task results for this run (tasks/caching.py)."""
        return self.root / ".prefect" / "results"

    @property
    def prefect_cache_keys(self) -> Path:
        return self.root / ".prefect" / "cache-keys"

    @property
    def mlflow_state(self) -> Path:
        """What run.tracking: mlflow has logged, and its run ids (spin_core/reports/tracking.py)."""
        return self.root / "tracking.json"

    @property
    def mlflow_artifacts(self) -> Path:
        """MLflow's local artifact store, without MLFLOW_TRACKING_URI."""
        return self.root / "mlartifacts"

    @property
    def wandb_state(self) -> Path:
        return self.root / "tracking-wandb.json"

    def theta0(self) -> Path:
        """The directory of θ0's held-out evaluation (eval.parquet, metrics.json) and lm-eval."""
        return self.root / "theta0"

    def base_evaluation(self) -> EvalDir:
        return EvalDir(self.theta0())

    def finished_iterations(self) -> list[int]:
        """0, 1, … up to the last iteration whose model is evaluated (iter_t/metrics.json),
        with no gap: what the report, the trackers and the schedule read."""
        finished = []
        while self.iteration_metrics(len(finished)).exists():
            finished.append(len(finished))
        return finished

    # iteration level
    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def prompts(self, t: int) -> Path:
        return self.iteration(t) / "prompts.parquet"

    def generated_shards(self, t: int) -> Path:
        return self.iteration(t) / "generated"

    def generated(self, t: int) -> Path:
        return self.iteration(t) / "generated.parquet"

    def pairs(self, t: int) -> Path:
        return self.iteration(t) / "pairs.parquet"

    def pairs_counts(self, t: int) -> Path:
        """The training set's counts (pairs, ties dropped, history) beside pairs.parquet."""
        return self.iteration(t) / "pairs.json"

    def train(self, t: int) -> Path:
        return self.iteration(t) / "train.parquet"

    def train_state(self, t: int) -> Path:
        return self.iteration(t) / "train_state"

    def step_log(self, t: int) -> Path:
        return self.train_state(t) / STEP_LOG

    def export_summary(self, t: int) -> Path:
        return self.train_state(t) / EXPORT_SUMMARY

    def model(self, t: int) -> Path:
        return self.iteration(t) / "model"

    def evaluation(self, t: int) -> EvalDir:
        """θ(t+1)'s held-out evaluation (against θt), in iter_t/."""
        return EvalDir(self.iteration(t))

    def eval_file(self, t: int) -> Path:
        """θ(t+1)'s held-out eval.parquet."""
        return self.evaluation(t).eval

    def iteration_metrics(self, t: int) -> Path:
        return self.evaluation(t).metrics

    def baseline(self, t: int) -> Path:
        return self.iteration(t) / "baseline"

    def baseline_model(self, t: int) -> Path:
        return self.baseline(t) / "model"

    def baseline_state(self, t: int) -> Path:
        return self.baseline(t) / "train_state"

    def baseline_evaluation(self, t: int) -> EvalDir:
        return EvalDir(self.baseline(t))

    def retry(self, t: int) -> Path:
        """Written when iteration t is retried at a lower learning rate after collapsing."""
        return self.iteration(t) / "retry.json"

    def collapsed_attempt(self, t: int) -> Path:
        """Where the collapsed attempt's model, checkpoints and metrics are kept."""
        return self.iteration(t) / "collapsed_attempt"

    def lr_scale(self, t: int) -> float:
        """1.0, or the learning-rate factor of a retry of iteration t."""
        if not self.retry(t).exists():
            return 1.0
        return float(json.loads(self.retry(t).read_text())["lr_scale"])

    def archive_collapsed(self, t: int, lr_scale: float) -> None:
        """Move a collapsed attempt's outputs aside (nothing is deleted) and record the retry."""
        aside = self.collapsed_attempt(t)
        aside.mkdir(parents=True, exist_ok=True)
        for path in (
            self.model(t),
            self.train_state(t),
            self.eval_file(t),
            self.iteration_metrics(t),
        ):
            if path.exists():
                os.replace(path, aside / path.name)
        write_json_atomic({"lr_scale": lr_scale, "collapsed_attempt": str(aside)}, self.retry(t))

    def remove_checkpoints(self, t: int) -> list[Path]:
        """Delete iteration t's DeepSpeed checkpoints (train_state/step_*, `latest`, and the
        SFT baseline's), keeping metrics.jsonl and tensorboard/; returns what was removed.
        Called once θ(t+1) is exported and promoted: resuming it is no longer needed."""
        import shutil

        removed = []
        for state in (self.train_state(t), self.baseline_state(t)):
            for path in [*state.glob("step_*"), state / "latest"]:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                else:
                    continue
                removed.append(path)
        return removed

    # inputs, with the embedded default resolved
    def dataset(self, cfg: SpinConfig) -> str:
        if cfg.data.dataset == TOY:
            return str(toy_artifacts(self.toy).train_path)
        return cfg.data.dataset

    def eval_dataset(self, cfg: SpinConfig) -> str | None:
        if cfg.data.dataset == TOY and cfg.data.eval_dataset in (None, TOY):
            return str(toy_artifacts(self.toy).eval_path)
        return cfg.data.eval_dataset

    def data_config(self, cfg: SpinConfig):
        """The data section with the embedded default's files filled in."""
        if cfg.data.dataset != TOY:
            return cfg.data
        return cfg.data.model_copy(
            update={"dataset": self.dataset(cfg), "eval_dataset": self.eval_dataset(cfg)}
        )

    def base_model(self, cfg: SpinConfig) -> str:
        if cfg.model.name_or_path == TOY:
            return str(toy_artifacts(self.toy).model_dir)
        from spin_core.storage.models import pinned_model  # torch: not for `spin status`

        return pinned_model(cfg.model.name_or_path, cfg.model.revision)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory held by one live process.

    The lock file records pid, host and start time. A lock whose process is gone
    (same host) is stale and taken over with a warning; a live holder is refused.
    """

    def __init__(self, run: RunDir):
        self.path = run.lock
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                    self.held = True  # re-entrant within one process (e.g. a retried flow)
                    return self
                if holder and not self.alive(holder):
                    logger.warning(
                        "taking over stale lock of dead process %s (started %s)",
                        holder.get("pid"),
                        holder.get("started"),
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._held_by(holder) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise InputError(f"{self.path}: could not take the run directory lock")

    def check(self) -> None:
        """Refuse (InputError) when a live run holds the directory; writes nothing."""
        holder = self.holder()
        if not holder or holder.get("host") != socket.gethostname():
            return
        if int(holder.get("pid", 0)) != os.getpid() and self.alive(holder):
            raise self._held_by(holder)

    def _held_by(self, holder: dict) -> InputError:
        return InputError(
            f"{self.path.parent}: run directory is held by a live run (pid {holder.get('pid')} "
            f"on {holder.get('host')}, started {holder.get('started')}); "
            "wait for it or use another --run-dir"
        )

    def holder(self) -> dict:
        """What the lock file says (pid, host, started); {} when there is none."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) and "pid" in holder else {}

    @staticmethod
    def alive(holder: dict) -> bool:
        """Whether the process of a lock's `holder` still runs; True when it ran on another
        host (its pid cannot be checked from here)."""
        if holder.get("host", socket.gethostname()) != socket.gethostname():
            return True
        return pid_alive(int(holder["pid"]))

    def release(self) -> None:
        if self.held and self.holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_config(run: RunDir, cfg: SpinConfig) -> None:
    """Refuse a rerun whose config would change the results of the run's finished steps."""
    if run.config.exists():
        try:
            old = validate_config(yaml.safe_load(run.config.read_text()) or {}, str(run.config))
        except InputError:
            raise
        differences = result_changing_differences(old, cfg)
        if differences:
            raise InputError(
                f"{run.config}: this run was started with a different config "
                f"({', '.join(differences)} differ); use a new --run-dir to start a new run"
            )


def save_config(run: RunDir, cfg: SpinConfig) -> None:
    """Write spin.yaml (the resolved config); on a rerun, the neutral fields are updated."""
    run.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg.dump_yaml(), run.config)


def check_or_save_config(run: RunDir, cfg: SpinConfig) -> None:
    """Save the run's config, or refuse a rerun whose config would change results."""
    check_config(run, cfg)
    save_config(run, cfg)
