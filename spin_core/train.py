"""Training θ(t+1) from θt: an explicit loop over a DeepSpeed engine.

One optimizer step covers `global_batch_size` pairs: every rank runs
`accumulation_steps` micro-batches of `micro_batch_size` pairs, each one forward
pass over the real and generated responses together. Opponent log-probs come
from `train.parquet` (scored once by `spin_core.score`), so no second model is
in memory. A DeepSpeed checkpoint every `save_steps` holds the optimizer,
scheduler, RNG and data position; a rerun resumes from the newest complete one.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from spin_core.checkpoint import (
    all_reduce_sum,
    compute_dtype,
    device,
    load_policy,
    save_model_dir,
)
from spin_core.config import (
    LoraConfig,
    ModelConfig,
    SpinConfig,
    TrainingConfig,
    deepspeed_config,
    schedule_at,
)
from spin_core.data import read_parquet_checked, write_parquet_atomic
from spin_core.evaluate import collapsed
from spin_core.files import write_json_atomic
from spin_core.launch import free_port
from spin_core.logprobs import pad_batch, sequence_logps
from spin_core.loss import sft_loss, spin_sft_loss
from spin_core.score import Examples, frame_examples, score_with_opponent, tokenize_responses

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "complete.json"
STEP_LOG = "metrics.jsonl"
EXPORT_SUMMARY = "export.json"  # in train_state/: the export's dtype and weights_changed
# Below this fraction of weights changed vs θt, the export is warned about: the update
# was (mostly) rounded away, e.g. a bf16 export at a small learning rate.
MIN_WEIGHTS_CHANGED = 0.01
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class HealthProbe:
    """The in-training health check (docs/DESIGN.md §5 "Health") on a held-out slice.

    Every `every` optimizer steps the policy scores the real responses of
    `examples`; when their mean per-token log-likelihood falls more than
    `tolerance` below the opponent's (`opponent_loglik`), a warning is logged and
    the step's record says `healthy: false`. Reward accuracy is never used here.
    """

    examples: Examples
    opponent_loglik: float  # nats/token of the real responses under θt
    tolerance: float
    every: int
    batch_tokens: int = 16_384


def health_probe(cfg: SpinConfig, opponent: str, opponent_eval_file: str | Path) -> HealthProbe:
    """The first `eval.health_size` held-out pairs of θt's evaluation, with θt's log-likelihood."""
    from spin_core.checkpoint import load_tokenizer

    scored = pd.read_parquet(opponent_eval_file).head(cfg.eval.health_size)
    tokenizer = load_tokenizer(opponent, trust_remote_code=cfg.model.trust_remote_code)
    examples = tokenize_responses(
        tokenizer,
        scored["prompt"].tolist(),
        scored["real"].tolist(),
        max_length=cfg.training.max_length,
        max_prompt_length=cfg.training.max_prompt_length,
        contexts=scored["context"].tolist() if "context" in scored else None,
    )
    return HealthProbe(
        examples=examples,
        opponent_loglik=float(scored["real_logps"].sum() / max(scored["real_tokens"].sum(), 1)),
        tolerance=cfg.run.collapse_tolerance,
        every=cfg.training.eval_steps,
        batch_tokens=cfg.training.score_batch_tokens,
    )


@dataclass
class TrainResult:
    steps: int  # optimizer steps of the iteration
    resumed_from: int  # step of the checkpoint resumed from (0 = fresh start)
    log_path: Path
    model_dir: Path | None  # None when stopped early by `stop_after_steps`


def init_distributed() -> None:
    """Join the launcher's process group, or make a one-rank group in-process."""
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
        dist_backend=get_accelerator().communication_backend_name(), verbose=False
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The generators this rank draws from; of the GPUs only its own (`device()`), so a
    resume on a worker that sees fewer GPUs than the one that saved still works."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device()) if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # saved by an older version: one state per visible GPU
        index = device().index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, device())


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


def complete_checkpoints(state_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints whose save finished, oldest first."""
    found = []
    for marker in state_dir.glob(f"step_*/{COMPLETE_MARKER}"):
        found.append((int(marker.parent.name.removeprefix("step_")), marker.parent))
    return sorted(found)


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
        margin = (real_reward - generated_reward).cpu()
        differ = ~data.tie[batch]  # a tie (y' = y token for token) is neither won nor lost
        sums = {
            "loss": loss.item() * n,
            "real_reward": real_reward.sum().item(),
            "generated_reward": generated_reward.sum().item(),
            "margin": margin[differ].sum().item(),
            "correct": (margin[differ] > 0).sum().item(),
            "differing": differ.sum().item(),
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
    """Named step metrics from the summed micro-batch values of all ranks.

    Reward accuracy and margin are over the pairs whose responses differ; ties are
    their share.
    """
    pairs = sums["pairs"]
    metrics: dict[str, float | None] = {"loss": sums["loss"] / pairs, "tokens": sums["tokens"]}
    if "margin" in sums:
        differing = sums["differing"]
        metrics |= {
            "real_reward": sums["real_reward"] / pairs,
            "generated_reward": sums["generated_reward"] / pairs,
            "margin": sums["margin"] / differing if differing else 0.0,
            "reward_accuracy": sums["correct"] / differing if differing else None,
            "ties": 1 - differing / pairs,
        }
    else:  # the SFT baseline: no pairs to compare
        metrics |= dict.fromkeys(
            ("real_reward", "generated_reward", "margin", "reward_accuracy"), 0.0
        )
    if "sft_nll" in sums:
        metrics["sft_nll"] = sums["sft_nll"] / pairs
    return metrics


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Drop logged steps after the checkpoint we resume from (they will be redone)."""
    if not log_path.exists():
        return
    kept = [
        line
        for line in log_path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= last_step
    ]
    log_path.write_text("".join(line + "\n" for line in kept))


def run_rank(
    cfg: SpinConfig,
    *,
    on_step: Callable[[dict], None] | None = None,
    opponent_eval_file: str | None = None,
    **kwargs,
) -> TrainResult:
    """`train_iteration` as the pipeline runs it, in process or on each launched rank.

    opponent_eval_file: θt's eval.parquet; with `training.eval_steps` set, the held-out
    real log-likelihood is checked against it during training (`health_probe`).
    kwargs: train_iteration's other arguments.
    """
    health = None
    if cfg.training.eval_steps and opponent_eval_file:
        health = health_probe(cfg, kwargs["init_model"], opponent_eval_file)
    return train_iteration(cfg=cfg, on_step=on_step, health=health, **kwargs)


def train_iteration(
    *,
    init_model: str,
    train_path: str | Path,
    state_dir: str | Path,
    model_out: str | Path,
    cfg: SpinConfig,
    iteration: int,
    objective: str = "spin",
    on_step: Callable[[dict], None] | None = None,
    stop_after_steps: int | None = None,
    num_steps: int | None = None,
    health: HealthProbe | None = None,
    lr_scale: float = 1.0,
    scored_path: str | Path | None = None,
) -> TrainResult:
    """Train one iteration from `init_model` (θt) on `train_path`; export θ(t+1) to `model_out`.

    objective: "spin" (the SPIN loss against the opponent's stored log-probs) or
    "sft" (continued SFT on the real responses, the baseline).
    `stop_after_steps` ends the call after that step's checkpoint, as a crash would.
    `num_steps` fixes the number of optimizer steps (the baseline matches SPIN's);
    by default it is num_epochs × ceil(pairs / global_batch_size).
    `health` adds the held-out real log-likelihood to the step records every
    `health.every` steps and warns when it falls below the opponent's.
    `lr_scale` multiplies the iteration's learning rate (a retry after a collapse).
    When `train_path` has no opponent log-probs yet (the pairs of step 3), the
    engine scores them before its first step, every rank a share, and rank 0
    writes the scored set to `scored_path` (train.parquet), which a rerun reuses.
    """
    training = cfg.training
    state_dir, model_out = Path(state_dir), Path(model_out)
    state_dir.mkdir(parents=True, exist_ok=True)
    use_deterministic(cfg.run.deterministic)
    init_distributed()
    seed_everything(training.seed + iteration)
    frame = pd.read_parquet(train_path)
    if objective == "spin" and "generated_ids" not in frame:
        raise ValueError(f"{train_path}: no generated_ids column to train SPIN on")
    total_steps = num_steps or training.num_epochs * steps_per_epoch(
        len(frame), training.global_batch_size
    )
    # Set-up: θt under DeepSpeed, with the iteration's optimizer and schedule.
    lr = schedule_at(training.learning_rate, iteration) * lr_scale
    trainer = _Trainer.build(init_model, cfg, lr, total_steps)
    try:
        if objective == "spin" and "opponent_real_logps" not in frame:
            # Before any checkpoint is loaded: the engine's weights are still θt's.
            frame = _score_opponent(
                trainer.engine, frame, training, trainer.pad_id, scored_path, trainer.world_size
            )
        data = PairData(frame, training)
        sft_weight = training.sft_weight if objective == "spin" else 0.0
        objective_loss = make_objective(
            objective, data, beta=schedule_at(training.beta, iteration), sft_weight=sft_weight
        )
        start_step = _resume(trainer.engine, state_dir, iteration)
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
                    record |= _check_health(
                        trainer.engine,
                        health,
                        trainer.pad_id,
                        training.logprob_chunk_size,
                        step + 1,
                    )
                sink.write(record)
                last = step + 1 == total_steps
                if (step + 1) % training.save_steps == 0 or last or step + 1 == stop_after_steps:
                    _save_checkpoint(
                        trainer.engine, state_dir, step + 1, training.keep_checkpoints, trainer.rank
                    )
                if stop_after_steps is not None and step + 1 >= stop_after_steps and not last:
                    return TrainResult(total_steps, start_step, sink.log_path, None)
        export_model(
            trainer.engine,
            trainer.tokenizer,
            model_out,
            trainer.rank,
            training.zero_stage,
            EXPORT_DTYPES[training.export_dtype],
            lora=training.lora,
            base=(init_model, cfg.model),
            summary_path=state_dir / EXPORT_SUMMARY,
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
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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


def _resume(engine, state_dir: Path, iteration: int) -> int:
    """Load the last complete checkpoint (weights, optimizer, schedule, RNG); its step, or 0."""
    checkpoints = complete_checkpoints(state_dir)
    if not checkpoints:
        return 0
    step, path = checkpoints[-1]
    _, client_state = engine.load_checkpoint(str(state_dir), tag=path.name)
    set_rng_state(client_state["rng"])
    logger.info("resuming iteration %d from %s (step %d)", iteration, path, step)
    return step


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
            _truncate_log(self.log_path, start_step)  # steps after the checkpoint are redone
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
    if out is not None:
        done = read_parquet_checked(out, expected_rows=len(frame))
        if done is not None:
            return done
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


def _check_health(engine, health: HealthProbe, pad_id: int, chunk: int, step: int) -> dict:
    """Held-out real log-likelihood per token now, and whether it is within tolerance."""
    from spin_core.score import score_examples

    policy = engine.module.policy
    policy.eval()
    logps, counts = score_examples(
        policy,
        health.examples,
        pad_id,
        batch_tokens=health.batch_tokens,
        chunk_size=chunk,
        check=False,
        world_size=dist.get_world_size(),
    )
    policy.train()
    loglik = float(logps.sum() / max(counts.sum(), 1))
    healthy = not collapsed(loglik, health.opponent_loglik, health.tolerance)
    if not healthy:
        logger.warning(
            "step %d: held-out real log-likelihood %.4f nats/token is %.4f below the opponent's "
            "%.4f (collapse_tolerance %.2f): training may be collapsing",
            step,
            loglik,
            health.opponent_loglik - loglik,
            health.opponent_loglik,
            health.tolerance,
        )
    return {"heldout_real_loglik": loglik, "healthy": healthy}


def _float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def _tensorboard(state_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(state_dir / "tensorboard"))


def _save_checkpoint(engine, state_dir: Path, step: int, keep: int, rank: int) -> None:
    """Save, then mark complete; a checkpoint without the marker is ignored on resume."""
    tag = f"step_{step:06d}"
    engine.save_checkpoint(str(state_dir), tag=tag, client_state={"step": step, "rng": rng_state()})
    if dist.get_world_size() > 1:
        dist.barrier()
    if rank == 0:
        (state_dir / tag / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
        for _, old in complete_checkpoints(state_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def with_adapter(model, lora: LoraConfig):
    """`model` with a fresh LoRA adapter on `lora.target_modules`; only the adapter trains."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_adapter(state_dict: dict, base: tuple[str, ModelConfig], lora: LoraConfig, adapter_dir):
    """θt + adapter as a plain model: the trained adapter (the fp32 master copies of its
    weights, `trained_state_dict`) is loaded onto a fresh fp32 copy of θt, saved to
    `adapter_dir`, and merged into the weights in fp32 (in bf16, a ΔW of ~1e-4 on weights
    of ~0.02 would be partly rounded away)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    init_model, model_cfg = base
    unset_hf_deepspeed_config()  # training is over: a whole θt, not a ZeRO-3 partition
    fresh, _ = load_policy(init_model, model_cfg, for_training=True)  # fp32, on the CPU
    peft_model = with_adapter(fresh, lora)
    missing, unexpected = peft_model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lora_" in k]:
        raise RuntimeError(f"adapter state does not match: {unexpected[:3]} {missing[:3]}")
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    return peft_model.merge_and_unload()


def export_model(
    engine,
    tokenizer,
    out_dir: Path,
    rank: int,
    zero_stage: int,
    dtype: torch.dtype,
    *,
    lora: LoraConfig | None = None,
    base: tuple[str, ModelConfig] | None = None,
    summary_path: Path | None = None,
) -> dict | None:
    """Write θ(t+1) as one HF directory in `dtype`, from the optimizer's fp32 master weights.

    With bf16 compute the module holds bf16 copies; an update smaller than half of bf16's
    spacing (lr 5e-7 on weights of 0.02, whose spacing is 1.2e-4) is in the fp32 master
    only, so exporting the module would drop it. With LoRA the adapter (fp32 master) is
    merged into θt's weights in fp32, so the next iteration, evaluation and vLLM see an
    ordinary model; the adapter alone is saved beside it, in `adapter/`.
    Returns on rank 0 (None elsewhere) the export summary, also written to
    `summary_path`: the dtype and `weights_changed`, the fraction of weight elements that
    differ from θt's as stored; a warning says when it is below MIN_WEIGHTS_CHANGED.
    """
    module = engine.module.policy
    state_dict = trained_state_dict(engine, rank, zero_stage, trainable_only=lora is not None)
    summary = None
    if rank == 0:
        init_model = base[0] if base is not None else None
        if lora is not None:  # the adapter onto a fresh fp32 θt, merged there
            module = merge_adapter(state_dict, base, lora, Path(out_dir).parent / "adapter")
            state_dict = module.state_dict()
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        summary = export_summary(init_model, state_dict, dtype)
        if summary_path is not None:
            write_json_atomic(summary, summary_path)  # before the model: a model has one
        module.config.use_cache = True
        module.config.dtype = dtype
        save_model_dir(module, tokenizer, out_dir, state_dict=state_dict)
    if dist.get_world_size() > 1:
        dist.barrier()
    return summary


def trained_state_dict(
    engine, rank: int, zero_stage: int, *, trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """θ(t+1)'s tensors on rank 0's host (an empty dict on the other ranks).

    A trained parameter comes from the optimizer's fp32 master copy
    (`safe_get_full_fp32_param`), anything else as the module holds it. Called on every
    rank in the same order: under ZeRO each assembly is a collective. One tensor at a
    time, so a GPU holds one whole parameter at once, and only rank 0 copies to the host
    (8 ranks would otherwise each hold the whole model in host memory).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module.policy
    copies: dict[int, torch.Tensor | None] = {}  # tied weights are assembled once
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        trained = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
        if trainable_only and not trained:
            continue
        if id(tensor) not in copies:
            master = safe_get_full_fp32_param(tensor) if trained else None
            if master is not None:
                copies[id(tensor)] = host_copy(master, rank)
            elif zero_stage == 3 and hasattr(tensor, "ds_id"):
                with deepspeed.zero.GatheredParameters([tensor]):
                    copies[id(tensor)] = host_copy(tensor, rank)
            else:
                copies[id(tensor)] = host_copy(tensor, rank)
        if rank == 0:
            out[name] = copies[id(tensor)]
    return out


def host_copy(tensor: torch.Tensor, rank: int) -> torch.Tensor | None:
    """A host copy of `tensor` on rank 0; None (no copy) on the others."""
    if rank != 0:
        return None
    return tensor.detach().to("cpu", copy=True)


def export_summary(init_model: str | None, state_dict: dict, dtype: torch.dtype) -> dict:
    """The export's dtype and the fraction of its weights that differ from θt's (warned
    about when below MIN_WEIGHTS_CHANGED); None when θt's weights cannot be read."""
    changed = weights_changed(init_model, state_dict) if init_model else None
    if changed is not None and changed < MIN_WEIGHTS_CHANGED:
        logger.warning(
            "the exported model equals θt in %.2f%% of its weights: the update was mostly lost%s",
            100 * (1 - changed),
            " to bf16 rounding; set training.export_dtype=fp32 to keep it"
            if dtype == torch.bfloat16
            else " (learning rate too small for these steps?)",
        )
    return {"export_dtype": str(dtype).removeprefix("torch."), "weights_changed": changed}


def _safetensors_files(init_model: str) -> list[Path]:
    path = Path(init_model).expanduser()
    if not path.is_dir():  # a hub name: the snapshot from_pretrained loaded
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(init_model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the fraction is then unknown
            return []
    return sorted(path.glob("*.safetensors"))


def weights_changed(init_model: str, state_dict: dict) -> float | None:
    """Fraction of the elements of `state_dict`'s floating tensors that differ from θt's
    tensors of the same name in `init_model`'s safetensors files, read one at a time."""
    from safetensors import safe_open

    changed = total = 0
    for path in _safetensors_files(init_model):
        with safe_open(str(path), framework="pt") as stored:
            for key in stored.keys():  # noqa: SIM118 - safe_open is not a dict
                new = state_dict.get(key)
                if new is None or not new.is_floating_point():
                    continue
                old = stored.get_tensor(key)
                if old.shape == new.shape:
                    changed += int((new.float() != old.float()).sum())
                    total += old.numel()
    return changed / total if total else None
