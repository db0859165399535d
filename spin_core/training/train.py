"""Training θ(t+1) from θt: an explicit loop over a DeepSpeed engine.

One optimizer step covers `global_batch_size` pairs: every rank runs
`accumulation_steps` micro-batches of `micro_batch_size` pairs, each one forward
pass over the real and generated responses together. Opponent log-probs come
from `train.parquet` (scored once by `spin_core.score`), so no second model is
in memory. A DeepSpeed checkpoint every `save_steps` holds the optimizer,
scheduler, RNG and data position; a rerun resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from spin_core.config import SpinConfig, TrainingConfig, deepspeed_config, schedule_at
from spin_core.logprobs import pad_batch, sequence_logps
from spin_core.loss import reward_metrics, reward_sums, sft_loss, spin_sft_loss
from spin_core.runtime.devices import (
    all_reduce_sum,
    compute_dtype,
    device,
    rank0_decides,
    release_memory,
)
from spin_core.score import SCORED_COLUMNS, Examples, frame_examples, score_with_opponent
from spin_core.storage.files import read_parquet_checked, write_parquet_atomic
from spin_core.storage.models import load_policy
from spin_core.storage.rundir import EXPORT_SUMMARY, STEP_LOG
from spin_core.training.export import EXPORT_DTYPES, carry_fp32_masters, export_model, with_adapter
from spin_core.training.health import HealthProbe, check_health, health_probe
from spin_core.training.job import TrainJob
from spin_core.training.launch import free_port
from spin_core.training.state import (
    resume,
    save_checkpoint,
    seed_everything,
    truncate_log,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int  # optimizer steps of the iteration
    resumed_from: int  # step of the checkpoint resumed from (0 = fresh start)
    log_path: Path
    model_dir: Path | None  # None when stopped early by `stop_after_steps`


def init_distributed(timeout_minutes: float = 60) -> None:
    """Join the launcher's process group, or make a one-rank group in-process.

    `timeout_minutes` (training.collective_timeout_minutes) bounds each collective; DeepSpeed's
    default, 10 minutes, is shorter than a 7B checkpoint save can take on shared storage.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_available() and dist.is_initialized():
        return
    launched = "MASTER_PORT" in os.environ
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        verbose=False,
        timeout=timedelta(minutes=timeout_minutes),
    )
    if not launched:
        # The one-rank group's store now holds this port; a process started from here
        # (another `spin run`, a launcher) must not inherit it and try to bind it again.
        del os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"]


def use_deterministic(enabled: bool) -> None:
    """`run.deterministic`: deterministic kernels where PyTorch has them, warnings where not.

    On CUDA, index_add (the summed log-probs), scatter and SDPA backward use atomics and
    cuBLAS picks split-K reductions by workspace; without this, repeated or resumed runs
    agree within bf16 noise, not bit for bit. CUBLAS_WORKSPACE_CONFIG is read when cuBLAS
    starts, so this runs before any GPU work of the process (flow process and each rank).
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    logger.info(
        "rank %s: deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG=%s)",
        os.environ.get("RANK", "0"),
        os.environ["CUBLAS_WORKSPACE_CONFIG"],
    )


def steps_per_epoch(num_pairs: int, global_batch_size: int) -> int:
    return math.ceil(num_pairs / global_batch_size)


def step_indices(num_pairs: int, step: int, global_batch_size: int, seed: int) -> list[int]:
    """Pair indices of optimizer step `step` (a pure function: resume needs no sampler state).

    Each epoch is a seeded permutation; the last batch of an epoch wraps around to
    its start so every step has a full global batch.
    """
    per_epoch = steps_per_epoch(num_pairs, global_batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
    order = np.concatenate([order, order[: per_epoch * global_batch_size - num_pairs]])
    return order[position * global_batch_size : (position + 1) * global_batch_size].tolist()


def micro_batches(
    indices: list[int], lengths: list[int], micro_batch_size: int, rank: int, world_size: int
) -> list[list[int]]:
    """This rank's micro-batches of one step, grouped by length.

    Micro-batches are equal-sized and the loss is a mean, so how the step's pairs
    are grouped does not change the gradient; sorting by length cuts padding.
    """
    ordered = sorted(indices, key=lambda i: lengths[i])
    batches = [ordered[s : s + micro_batch_size] for s in range(0, len(ordered), micro_batch_size)]
    return batches[rank::world_size]


class PairData:
    """Training pairs as token ids (never re-encoded) with the opponent's log-probs."""

    def __init__(self, frame: pd.DataFrame, training: TrainingConfig):
        self.real: Examples = frame_examples(frame, "real_ids", training)
        self.generated: Examples | None = None
        if "generated_ids" in frame:
            self.generated = frame_examples(frame, "generated_ids", training)
        self.opponent_real = torch.tensor(
            frame.get("opponent_real_logps", pd.Series(dtype=float)).to_numpy()
        )
        self.opponent_generated = torch.tensor(
            frame.get("opponent_generated_logps", pd.Series(dtype=float)).to_numpy()
        )
        self.tie = torch.zeros(len(frame), dtype=torch.bool)  # y' = y token for token
        if "generated_ids" in frame:
            self.tie = torch.tensor(
                [
                    list(g) == list(r)
                    for g, r in zip(frame["generated_ids"], frame["real_ids"], strict=True)
                ],
                dtype=torch.bool,
            )
        self.lengths = [
            len(r) + (len(g) if self.generated else 0)
            for r, g in zip(
                self.real.input_ids,
                self.generated.input_ids if self.generated else self.real.input_ids,
                strict=True,
            )
        ]

    def __len__(self) -> int:
        return len(self.real.input_ids)


class SequenceLogps(torch.nn.Module):
    """The policy as the DeepSpeed engine runs it: forward gives summed response log-probs.

    The training loop calls `engine(...)`, never `engine.module(...)`: the engine's
    own forward is what advances ZeRO-3's micro-step counter (without it each
    micro-batch's gradient overwrites the previous one under accumulation) and
    registers the bf16 optimizer's backward hooks.
    """

    def __init__(self, policy, chunk_size: int):
        super().__init__()
        self.policy = policy
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, labels):  # each (batch, seq)
        return sequence_logps(
            self.policy, input_ids, attention_mask, labels, chunk_size=self.chunk_size
        )


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off, as the opponent's log-probs were computed without it.

    With dropout the policy's log-probs at step 1 would be noisy copies of the
    opponent's and the first loss would not be ln 2 (the official SPIN code and
    TRL do the same). Attention dropout is a float read in forward, not a module.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for name, value in vars(model.config).items():
        if "dropout" in name and isinstance(value, float):
            setattr(model.config, name, 0.0)


def _policy_logps(engine, data: PairData, batch: list[int], pad_id: int, objective: str):
    """Summed log-probs of the batch's real (and generated) responses in one forward pass."""
    ids = [data.real.input_ids[i] for i in batch]
    labels = [data.real.labels[i] for i in batch]
    if objective == "spin":
        ids += [data.generated.input_ids[i] for i in batch]
        labels += [data.generated.labels[i] for i in batch]
    input_ids, mask, targets = pad_batch(ids, labels, pad_id)  # (2·micro, seq)
    dev = device()
    logps, counts = engine(input_ids.to(dev), mask.to(dev), targets.to(dev))
    return logps, counts, int(mask.sum())


def _build_optimizer(model, training: TrainingConfig, lr: float):
    """RMSprop or AdamW, one parameter at a time (foreach=False): the multi-tensor path
    builds sqrt(state) for all parameters at once, a full fp32 temporary of 4 B/param
    (29 GB on a 7B model) at the step's memory peak; per parameter it is the largest one's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=training.weight_decay, foreach=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=training.weight_decay, foreach=False)


def step_lines(record: dict) -> list[str]:
    """A step record as the log lines the pipeline writes (spin.log; the console with -v)."""
    accuracy = record["reward_accuracy"]
    lines = [
        f"iter {record['iteration']} step {record['step']}/{record['total_steps']} "
        f"loss {record['loss']:.4f} margin {record['margin']:.3f} "
        f"acc {'–' if accuracy is None else f'{accuracy:.2f}'} "
        f"lr {record['learning_rate']:.2e} {record['tokens_per_s']:.0f} tok/s"
    ]
    if "heldout_real_loglik" in record:
        health = "healthy" if record["healthy"] else "BELOW the opponent's by more than tolerance"
        lines.append(
            f"iter {record['iteration']} step {record['step']}: held-out real log-lik "
            f"{record['heldout_real_loglik']:.4f} nats/token ({health})"
        )
    return lines


def _reduce_sums(sums: dict[str, float], world_size: int) -> dict[str, float]:
    """Per-step sums of every rank added up (same keys on every rank)."""
    if world_size == 1:
        return sums
    keys = sorted(sums)
    values = all_reduce_sum(
        torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device())
    )
    return dict(zip(keys, values.tolist(), strict=True))


def make_objective(kind: str, data: PairData, *, beta: float, sft_weight: float = 0.0):
    """The loss of one micro-batch and the sums its step metrics are made of, chosen once.

    kind "spin": the SPIN loss against the opponent's stored log-probs, plus
    `sft_weight` · the real responses' per-token NLL when > 0 (SFT-anchored SPIN);
    kind "sft": continued SFT on the real responses (the baseline).
    Returns f(logps, counts, batch) -> (loss, sums); logps and counts hold the
    batch's real responses, then (spin) its generated ones.
    """

    def spin(logps: torch.Tensor, counts: torch.Tensor, batch: list[int]):
        n = len(batch)
        loss, nll, real_reward, generated_reward = spin_sft_loss(
            logps[:n],
            logps[n:],
            data.opponent_real[batch].to(logps),
            data.opponent_generated[batch].to(logps),
            counts[:n],
            beta=beta,
            sft_weight=sft_weight,
        )
        sums = {
            "loss": loss.item() * n,
            **reward_sums(real_reward.cpu(), generated_reward.cpu(), data.tie[batch]),
            "pairs": n,
        }
        if sft_weight:
            sums["sft_nll"] = nll.item() * n
        return loss, sums

    def sft(logps: torch.Tensor, counts: torch.Tensor, batch: list[int]):
        loss = sft_loss(logps, counts)
        return loss, {"loss": loss.item() * len(batch), "pairs": len(batch)}

    return {"spin": spin, "sft": sft}[kind]


def step_metrics(sums: dict[str, float]) -> dict[str, float | None]:
    """Named step metrics from the summed micro-batch values of all ranks (the reward
    metrics by `loss.reward_metrics`)."""
    pairs = sums["pairs"]
    metrics: dict[str, float | None] = {"loss": sums["loss"] / pairs, "tokens": sums["tokens"]}
    if "margin" in sums:
        metrics |= reward_metrics(sums)
    else:  # the SFT baseline: no pairs to compare
        metrics |= dict.fromkeys(
            ("real_reward", "generated_reward", "margin", "reward_accuracy"), 0.0
        )
    if "sft_nll" in sums:
        metrics["sft_nll"] = sums["sft_nll"] / pairs
    return metrics


def run_rank(
    cfg: SpinConfig,
    job: TrainJob,
    on_step: Callable[[dict], None] | None = None,
    on_phase: Callable[[str, str], None] | None = None,
) -> TrainResult:
    """`train_iteration` as the pipeline runs it, in process or on each launched rank: with
    `training.eval_steps` and `job.opponent_eval_file` set, the held-out real
    log-likelihood is checked during training (`health_probe`)."""
    health = None
    if cfg.training.eval_steps and job.opponent_eval_file:
        health = health_probe(cfg, job.init_model, job.opponent_eval_file)
    return train_iteration(cfg, job, on_step=on_step, on_phase=on_phase, health=health)


@contextmanager
def _phase(on_phase: Callable[[str, str], None] | None, name: str) -> Iterator[None]:
    if on_phase is not None:
        on_phase(name, "start")
    try:
        yield
    finally:
        if on_phase is not None:
            on_phase(name, "end")


def train_iteration(
    cfg: SpinConfig,
    job: TrainJob,
    *,
    on_step: Callable[[dict], None] | None = None,
    on_phase: Callable[[str, str], None] | None = None,
    health: HealthProbe | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train one iteration as `job` says (spin_core/training/job.py); export θ(t+1).

    `on_step` gets every step record on rank 0. `on_phase(name, "start" | "end")` brackets
    the phases between the steps: "scoring" (θt's log-probs of the pairs), each
    "checkpoint" and the "export" (the benchmarks time them). `health` adds the held-out real
    log-likelihood to the step records every `health.every` steps and warns when it
    falls below the opponent's. `stop_after_steps` ends the call after that step's
    checkpoint, as a crash would.
    When `job.train_path` has no opponent log-probs yet (the pairs of step 3), the
    engine scores them before its first step, every rank a share, and rank 0 writes
    the scored set to `job.scored_path` (train.parquet), which a rerun reuses.
    """
    training, iteration, objective = cfg.training, job.iteration, job.objective
    state_dir, model_out = Path(job.state_dir), Path(job.model_out)
    state_dir.mkdir(parents=True, exist_ok=True)
    use_deterministic(cfg.run.deterministic)
    init_distributed(training.collective_timeout_minutes)
    seed_everything(training.seed + iteration)
    frame = pd.read_parquet(job.train_path)
    if objective == "spin" and "generated_ids" not in frame:
        raise ValueError(f"{job.train_path}: no generated_ids column to train SPIN on")
    total_steps = job.num_steps or training.num_epochs * steps_per_epoch(
        len(frame), training.global_batch_size
    )
    # Set-up: θt under DeepSpeed, with the iteration's optimizer and schedule.
    lr = schedule_at(training.learning_rate, iteration) * job.lr_scale
    trainer = _Trainer.build(job.init_model, cfg, lr, total_steps)
    try:
        if objective == "spin" and "opponent_real_logps" not in frame:
            # Before any checkpoint is loaded: the engine's weights are still θt's.
            with _phase(on_phase, "scoring"):
                frame = _score_opponent(
                    trainer.engine,
                    frame,
                    training,
                    trainer.pad_id,
                    job.scored_path,
                    trainer.world_size,
                )
        data = PairData(frame, training)
        sft_weight = training.sft_weight if objective == "spin" else 0.0
        objective_loss = make_objective(
            objective, data, beta=schedule_at(training.beta, iteration), sft_weight=sft_weight
        )
        start_step = resume(trainer.engine, state_dir, iteration)
        # The loop: one optimizer step, its record to every sink, a checkpoint when due.
        trainer.engine.train()
        with StepSinks(
            state_dir, iteration, total_steps, start_step, trainer.rank, on_step
        ) as sink:
            for step in range(start_step, total_steps):
                record = trainer.optimizer_step(data, step, objective_loss, objective, iteration)
                if health is not None and (
                    (step + 1) % health.every == 0 or step + 1 == total_steps
                ):
                    record |= check_health(
                        trainer.engine,
                        health,
                        trainer.pad_id,
                        training.logprob_chunk_size,
                        step + 1,
                    )
                sink.write(record)
                last = step + 1 == total_steps
                if (step + 1) % training.save_steps == 0 or last or step + 1 == stop_after_steps:
                    with _phase(on_phase, "checkpoint"):
                        save_checkpoint(
                            trainer.engine,
                            state_dir,
                            step + 1,
                            training.keep_checkpoints,
                            trainer.rank,
                        )
                if stop_after_steps is not None and step + 1 >= stop_after_steps and not last:
                    return TrainResult(total_steps, start_step, sink.log_path, None)
        with _phase(on_phase, "export"):
            export_model(
                trainer.engine,
                trainer.tokenizer,
                model_out,
                trainer.rank,
                training.zero_stage,
                EXPORT_DTYPES[training.export_dtype],
                lora=training.lora,
                base=(job.init_model, cfg.model),
                summary_path=state_dir / EXPORT_SUMMARY,
                compute=compute_dtype(cfg.model.precision),
            )
    finally:
        trainer.close()
    return TrainResult(total_steps, start_step, state_dir / STEP_LOG, model_out)


@dataclass
class _Trainer:
    """θ(t+1) being trained: the DeepSpeed engine and what its steps need."""

    engine: Any
    tokenizer: Any
    training: TrainingConfig
    rank: int
    world_size: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @classmethod
    def build(cls, init_model: str, cfg: SpinConfig, lr: float, total_steps: int) -> _Trainer:
        """θt loaded for training (dropout off, LoRA when set) under DeepSpeed."""
        import deepspeed
        from transformers import get_scheduler

        training = cfg.training
        ds_config = deepspeed_config(
            training, bf16=compute_dtype(cfg.model.precision) == torch.bfloat16
        )
        if training.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Kept alive so from_pretrained partitions weights across ranks as it loads.
            zero3_init = HfDeepSpeedConfig(ds_config)  # noqa: F841
        model, tokenizer = load_policy(init_model, cfg.model, for_training=True)
        disable_dropout(model)
        if training.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.config.use_cache = False
        if training.lora is not None:
            # θ(t+1) = θt + a fresh adapter; the opponent's log-probs are precomputed, so
            # no adapter toggling is needed to score the reference.
            model = with_adapter(model, training.lora)
        optimizer = _build_optimizer(model, training, lr)
        scheduler = get_scheduler(
            "linear",
            optimizer,
            num_warmup_steps=math.ceil(training.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        engine, _, _, _ = deepspeed.initialize(
            model=SequenceLogps(model, training.logprob_chunk_size),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
        )
        if training.lora is None and ds_config.get("bf16", {}).get("enabled"):
            carried = carry_fp32_masters(engine, init_model)
            if carried:
                logger.info(
                    "fp32 master weights of %d tensors carried from %s", carried, init_model
                )
        rank, world_size = dist.get_rank(), dist.get_world_size()
        alone = type(engine.optimizer).__name__ == "BF16_Optimizer" or training.zero_stage == 0
        if world_size == 1 and alone:
            # Alone, DeepSpeed would still flatten every gradient into a bucket, all-reduce
            # it with itself and copy it back: a gradient-sized buffer and ~15% of each step.
            # (BF16_Optimizer adds each micro-batch into its fp32 buffer before this point.)
            engine.enable_backward_allreduce = False
        return cls(engine, tokenizer, training, rank, world_size)

    def close(self) -> None:
        """Free the engine now, not when the cyclic GC gets to it: engine and optimizer refer
        to each other, and on one GPU evaluation and generation load models next, in this
        process (a 7B full fine-tune holds ~90 GB of states)."""
        if self.engine is None:
            return
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None
        release_memory()

    def optimizer_step(
        self, data: PairData, step: int, objective_loss, objective: str, iteration: int
    ) -> dict:
        """One optimizer step over this rank's micro-batches; returns the step's record."""
        training, engine = self.training, self.engine
        started = time.perf_counter()
        indices = step_indices(
            len(data), step, training.global_batch_size, training.seed + iteration
        )
        learning_rate = engine.lr_scheduler.get_last_lr()[0]
        sums: dict[str, float] = {}
        for batch in micro_batches(
            indices, data.lengths, training.micro_batch_size, self.rank, self.world_size
        ):
            logps, counts, batch_tokens = _policy_logps(engine, data, batch, self.pad_id, objective)
            loss, batch_sums = objective_loss(logps, counts, batch)
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + value
            sums["tokens"] = sums.get("tokens", 0.0) + batch_tokens
            engine.backward(loss)
            engine.step()
        seconds = time.perf_counter() - started
        record = {
            "iteration": iteration,
            "step": step + 1,
            "epoch": step / steps_per_epoch(len(data), training.global_batch_size),
            **step_metrics(_reduce_sums(sums, self.world_size)),
            "learning_rate": learning_rate,
            "grad_norm": _float(engine.get_global_grad_norm()),
        }
        record["tokens_per_s"] = record.pop("tokens") / max(seconds, 1e-9)
        return record


class StepSinks:
    """Where step records go on rank 0: metrics.jsonl, TensorBoard, a progress bar and
    `on_step`. A context manager, so every exit path closes them."""

    def __init__(
        self,
        state_dir: Path,
        iteration: int,
        total_steps: int,
        start_step: int,
        rank: int,
        on_step: Callable[[dict], None] | None,
    ):
        self.log_path = state_dir / STEP_LOG
        self.total_steps, self.on_step, self.main = total_steps, on_step, rank == 0
        if self.main:
            truncate_log(self.log_path, start_step)  # steps after the checkpoint are redone
        self.writer = _tensorboard(state_dir) if self.main else None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=f"train {iteration}",
            unit="step",
            disable=not self.main,
        )

    def write(self, record: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['margin']:.3f}")
        if not self.main:
            return
        with self.log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("iteration", "step", "healthy") and value is not None:
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        if self.on_step is not None:
            self.on_step(record | {"total_steps": self.total_steps})

    def __enter__(self) -> StepSinks:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _score_opponent(
    engine,
    frame: pd.DataFrame,
    training: TrainingConfig,
    pad_id: int,
    out: str | Path | None,
    world_size: int,
) -> pd.DataFrame:
    """The training set with θt's log-probs, scored by the engine before its first step.

    θ(t+1) starts as θt, so the engine about to train is the opponent: no second
    load of the model, ZeRO-3 sharded like training, every rank a share of the
    batches. A complete `out` from an earlier attempt is reused.
    """
    done = rank0_decides(lambda: _scored_logps(out, len(frame)))  # one view of the files
    if done is not None:
        return frame.assign(**done)
    policy = engine.module.policy
    policy.eval()  # dropout is off anyway; eval() also stops gradient checkpointing's work
    with torch.no_grad():
        scored, truncation = score_with_opponent(
            policy,
            pad_id,
            frame,
            training,
            show_progress=dist.get_rank() == 0,
            world_size=world_size,
            forward=engine,  # through the engine's hooks: ZeRO-3 prefetches (score_examples)
        )
    policy.train()
    logger.info(
        "scored %d pairs with the opponent on %d rank(s) (%d prompts, %d responses truncated)",
        len(scored),
        world_size,
        truncation.prompts,
        truncation.responses,
    )
    if out is not None and dist.get_rank() == 0:
        write_parquet_atomic(scored, out)
    if world_size > 1:
        dist.barrier()
    return scored


def _scored_logps(out: str | Path | None, rows: int) -> dict | None:
    """The opponent log-probs of a complete `out` (lists of floats), or None."""
    done = read_parquet_checked(out, expected_rows=rows) if out is not None else None
    if done is None:
        return None
    return {column: done[column].tolist() for column in SCORED_COLUMNS}


def _float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def _tensorboard(state_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(state_dir / "tensorboard"))
