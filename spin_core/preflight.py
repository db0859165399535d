"""Pre-flight check of a SPIN config: everything short of generating and training, in seconds.

`preflight(cfg)` reads what a run would read and computes what it would need, without
loading weights or touching a GPU:

1. the tokenizer and the model's config (AutoConfig; the parameters are counted on the
   `meta` device, so a 7B model costs no memory);
2. one row of the data rendered and tokenized exactly as training sees it (the one
   tokenization of `spin_core.prompts`), with `|` where the response starts;
3. prompt and response token lengths over a sample of the training data, and what
   `training.max_prompt_length`, `training.max_length` and `generation.max_new_tokens`
   would cut or drop;
4. optimizer steps per iteration;
5. GPU memory per rank for the configured ZeRO stage, precision, optimizer, micro-batch
   and gradient checkpointing.

It returns a `PreflightReport`: `.render()` is the readable report, `.problems` the
reasons the run cannot work (each names the field to change; the command line exits 2
when there are any). The embedded default (`toy`) is built by the first run; until
then its tokenizer, data and model are not there and those parts are skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spin_core.config import TOY, SpinConfig, TrainingConfig, deepspeed_config
from spin_core.errors import InputError
from spin_core.rundir import toy_artifacts

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 80.0
SAMPLE_ROWS = 2000  # training rows tokenized for the length statistics
PERCENTILES = (50, 90, 99)
# CUDA context, NCCL buffers and caching-allocator fragmentation: an assumed allowance,
# not derived from the model (the CUDA context alone is ~0.5 GiB on recent GPUs).
RUNTIME_RESERVE_BYTES = 2 * GIB
# Bytes per element of the log-prob chunk (spin_core.logprobs, fp32 head): the fp32 logits
# and the logsumexp's fp32 temporary (backward rebuilds the logits in place as their gradient).
LOGITS_BYTES_PER_ELEMENT = 4 + 4
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) where training.deepspeed leaves them.
DS_REDUCE_BUCKET_SIZE = 500_000_000
DS_PREFETCH_BUCKET_SIZE = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
DS_SUB_GROUP_SIZE = 1_000_000_000
OPTIMIZER_STATES = {
    "rmsprop": ("RMSprop", 1, "square_avg"),
    "adamw": ("AdamW", 2, "exp_avg, exp_avg_sq"),
}


# ------------------------------------------------------------------------ model


@dataclass
class ModelShape:
    """What the memory estimate needs from a model's config."""

    name_or_path: str
    model_type: str
    parameters: int  # counted on the meta device (tied weights once)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool  # SwiGLU-style gate/up projections (Llama, Mistral, Qwen, Gemma)
    largest_module: int  # parameters of the largest single module (ZeRO-3 gathers per module)
    max_position_embeddings: int | None = None
    counted: str = "exact"  # "exact" (meta model) or "formula" (fallback)
    # (module name, in_features, out_features) of every linear layer: what LoRA adapts.
    linears: tuple[tuple[str, int, int], ...] = ()

    def describe(self) -> str:
        kv = f" ({self.num_kv_heads} kv)" if self.num_kv_heads != self.num_heads else ""
        return (
            f"{self.model_type}, {_count(self.parameters)} parameters ({self.counted}); hidden "
            f"{self.hidden_size}, {self.num_layers} layers, {self.num_heads} heads{kv}, "
            f"intermediate {self.intermediate_size}"
            f"{' (gated)' if self.gated_mlp else ''}, vocab {self.vocab_size}"
        )


def _attr(config, *names: str, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


@functools.lru_cache(maxsize=8)
def _count_on_meta(config_json: str, model_type: str, trust_remote_code: bool, source: str):
    """(parameters, largest module, gated MLP) of a config's causal LM, built on `meta`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    gated = any(n.endswith(("gate_proj", "gate_up_proj")) for n, _ in model.named_modules())
    linears = tuple(
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    return parameters, largest, gated, linears


def model_shape(name_or_path: str, *, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the causal LM at `name_or_path`, from its config only (no weights)."""
    from transformers import AutoConfig

    from spin_core.checkpoint import check_causal_lm

    check_causal_lm(name_or_path, trust_remote_code=trust_remote_code)  # InputError naming it
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_attr(text, "hidden_size", "n_embd", "d_model"))
    layers = int(_attr(text, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_attr(text, "num_attention_heads", "n_head", "num_heads"))
    kv_heads = int(_attr(text, "num_key_value_heads", "num_kv_heads", default=heads))
    intermediate = int(_attr(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    vocab = int(_attr(text, "vocab_size"))
    try:
        parameters, largest, gated, linears = _count_on_meta(
            config.to_json_string(), config.model_type, trust_remote_code, str(name_or_path)
        )
        counted = "exact"
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on meta
        # Kaplan et al. 2020 (Scaling Laws, §2.1): 12·L·h² for the blocks, plus embeddings.
        tied = bool(getattr(config, "tie_word_embeddings", False))
        parameters = 12 * layers * hidden**2 + vocab * hidden * (1 if tied else 2)
        largest, gated, counted = vocab * hidden, False, "estimated: 12·L·h² + embeddings"
        linears = ()
    return ModelShape(
        name_or_path=str(name_or_path),
        model_type=config.model_type,
        parameters=parameters,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        gated_mlp=gated,
        largest_module=largest,
        max_position_embeddings=_attr(text, "max_position_embeddings", "n_positions"),
        counted=counted,
        linears=linears,
    )


def lora_parameters(shape: ModelShape, r: int, target_modules) -> int:
    """Trainable parameters of a LoRA adapter: r·(in + out) per adapted linear layer.

    A linear layer is adapted when its name is a target or ends with "." + a target
    (PEFT's matching of `target_modules` names).
    """
    targets = tuple(target_modules)
    return sum(
        r * (fan_in + fan_out)
        for name, fan_in, fan_out in shape.linears
        if any(name == t or name.endswith("." + t) for t in targets)
    )


# ----------------------------------------------------------------------- memory


@dataclass
class MemoryRow:
    name: str
    bytes: float
    formula: str
    in_peak: bool = True


@dataclass
class MemoryEstimate:
    """GPU memory of one training rank; `peak` = states + max(forward/backward, step) + reserve."""

    settings: str
    rows: list[MemoryRow]
    states: float  # weights + gradients + fp32 master + optimizer state
    forward_backward: float  # activations + logits chunk + ZeRO-3 buffers
    optimizer_step: float  # the fp32 gradient copy made at the step (after backward)
    peak: float
    activations_checkpointed: float
    activations_full: float

    def fits(self, gpu_bytes: float) -> bool:
        return self.peak <= gpu_bytes


def _ds_setting(zero: dict[str, Any], key: str, default: int) -> int:
    value = zero.get(key, default)
    return int(value) if isinstance(value, int | float) else default  # "auto" → default


def estimate_memory(
    shape: ModelShape,
    *,
    num_processes: int,
    zero_stage: int,
    bf16: bool,
    optimizer: str,
    micro_batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    logprob_chunk_size: int = 1024,
    attn_implementation: str | None = None,
    zero_config: dict[str, Any] | None = None,
    trainable: int | None = None,
    adapter: str = "",
    fp32_grad_accum: bool = False,
) -> MemoryEstimate:
    """GPU memory per training rank, from the model's shape and the training settings.

    Model states follow the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory
    Optimizations Toward Training Trillion Parameter Models", §3.1 and Figure 1): with
    mixed precision a parameter costs 2 bytes of 16-bit weight, 2 of 16-bit gradient and
    K of optimizer state, K = 4 for the fp32 master copy + 4 per fp32 optimizer tensor
    (RMSprop 1, AdamW 2); ZeRO-1 partitions the optimizer state over the ranks, ZeRO-2
    also the gradients, ZeRO-3 also the weights. DeepSpeed bf16 keeps exactly this
    layout (the model is loaded in fp32 and cast; the fp32 master lives in the
    optimizer). In fp32 there is no master copy and weights and gradients take 4 bytes.

    Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", §4.1, Eq. 1): one layer stores s·b·h·(34 + 5·a·s/h) bytes
    of 16-bit activations, of which 11·s·b·h are the attention block's (here 7 + 4·kv/a
    with grouped-query attention: K and V are kv/a the size of Q), 19·s·b·h the 4h MLP's
    (3 + 4·i/h for intermediate size i; 3 + 8·i/h for a gated MLP, whose gate, up,
    activation and product outputs are all kept), 4·s·b·h the two norms' and 5·a·s²·b the
    attention scores' — only with eager attention: SDPA and FlashAttention kernels do
    not keep the s×s matrices. With gradient checkpointing (§4, "full recomputation")
    only each layer's input is kept (2·s·b·h bytes per layer) and one layer's
    activations are rebuilt at a time in backward. A micro-batch of `micro_batch_size`
    pairs is 2·micro_batch_size sequences (real and generated) of at most `max_length`.

    `trainable` (default: every parameter) is the count that gets gradients and optimizer
    state, e.g. a LoRA adapter's (`lora_parameters`); the frozen base keeps only its
    weights. `adapter` names it in the settings line.

    `fp32_grad_accum` (bf16 at ZeRO-0/1, which `deepspeed_config` runs as DeepSpeed's
    BF16_Optimizer): the gradients are also summed in a whole fp32 buffer, 4 B per
    trainable parameter held for the whole run, not partitioned, and the step makes no
    further fp32 copy. The optimizer runs one parameter at a time (foreach=False), so its
    temporaries are one parameter's, below this model's resolution.
    """
    h, L, a, kv = shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads
    i, V, P = shape.intermediate_size, shape.vocab_size, num_processes
    T = shape.parameters if trainable is None else trainable  # gradients and optimizer state
    N = shape.parameters + (0 if trainable is None else trainable)  # weights (+ adapter)
    t_sym = "Ψ" if trainable is None else "Ψ_train"
    zero = zero_config or {}
    w = 2 if bf16 else 4  # bytes of a weight / gradient element in compute precision
    name, states_per_param, state_names = OPTIMIZER_STATES[optimizer]
    share = {  # the fraction of each model state one rank holds (ZeRO paper, Figure 1)
        "weights": 1 / P if zero_stage >= 3 else 1.0,
        "gradients": 1 / P if zero_stage >= 2 else 1.0,
        "optimizer": 1 / P if zero_stage >= 1 else 1.0,
    }
    split = {k: (f" / {P}" if v < 1 else "") for k, v in share.items()}
    dtype = "bf16" if bf16 else "fp32"
    rows = [
        MemoryRow(
            f"weights ({dtype})",
            w * N * share["weights"],
            f"{w} B × {'(Ψ + Ψ_train)' if trainable is not None else 'Ψ'}{split['weights']}",
        ),
        MemoryRow(
            f"gradients ({dtype})",
            w * T * share["gradients"],
            f"{w} B × {t_sym}{split['gradients']}",
        ),
    ]
    if bf16:
        rows.append(
            MemoryRow(
                "fp32 master weights",
                4 * T * share["optimizer"],
                f"4 B × {t_sym}{split['optimizer']}",
            )
        )
    rows.append(
        MemoryRow(
            f"optimizer state ({name}: {state_names}, fp32)",
            4 * states_per_param * T * share["optimizer"],
            f"{4 * states_per_param} B × {t_sym}{split['optimizer']}",
        )
    )
    if bf16 and fp32_grad_accum:
        rows.append(
            MemoryRow("fp32 gradient accumulation (BF16_Optimizer)", 4 * T, f"4 B × {t_sym}")
        )
    states = sum(r.bytes for r in rows)

    # Activations (Korthikanti et al. 2022), scaled from 16-bit to the compute precision.
    s, b = max_length, 2 * micro_batch_size
    eager = (attn_implementation or "sdpa") == "eager"
    attention = 7 + 4 * kv / a
    mlp = 3 + (8 if shape.gated_mlp else 4) * i / h
    per_layer = s * b * h * (attention + mlp + 4) + (5 * a * s * s * b if eager else 0)
    per_layer *= w / 2
    full = L * per_layer
    checkpointed = L * 2 * s * b * h * (w / 2) + per_layer
    activations = checkpointed if gradient_checkpointing else full
    coefficient = f"{attention + mlp + 4:.0f}" + (" + 5·a·s/h" if eager else "")
    rows.append(
        MemoryRow(
            f"activations, checkpointing {'on' if gradient_checkpointing else 'off'} "
            f"({b} seqs × {s} tokens)",
            activations,
            ("2·s·b·h·L + one layer" if gradient_checkpointing else f"s·b·h·L·({coefficient})"),
        )
    )
    # Log-probs are taken over `logprob_chunk_size` response positions at a time
    # (spin_core.logprobs), so a (batch, seq, vocab) tensor never exists.
    positions = min(logprob_chunk_size, s * b)
    logits = positions * V * LOGITS_BYTES_PER_ELEMENT
    rows.append(
        MemoryRow(
            f"logits chunk ({positions} positions × vocab {V})",
            logits,
            f"chunk × V × {LOGITS_BYTES_PER_ELEMENT} B",
        )
    )
    # The head matmul is in fp32: an fp32 copy of the head weight in bf16, and in backward
    # the head's gradient summed over the chunks in fp32.
    head = (4 if bf16 else 0) * V * h + 4 * V * h
    rows.append(
        MemoryRow(
            "fp32 LM head copy and its gradient sum",
            head,
            f"({'4 + ' if bf16 else ''}4) B × V × h",
        )
    )
    logits += head
    buffers = 0.0
    if zero_stage >= 3:
        # ZeRO-3 gathers each module's weights before it runs (plus a prefetch bucket) and
        # reduces gradients through a contiguous bucket of reduce_bucket_size elements.
        reduce_bucket = min(_ds_setting(zero, "reduce_bucket_size", DS_REDUCE_BUCKET_SIZE), T)
        prefetch = _ds_setting(zero, "stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET_SIZE)
        live = _ds_setting(zero, "stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS)
        gathered = min(shape.largest_module + prefetch, live)
        buffers = w * (reduce_bucket + gathered)
        rows.append(
            MemoryRow(
                "ZeRO-3 gathered weights and reduce bucket",
                buffers,
                f"{w} B × (largest module + prefetch bucket + reduce bucket)",
            )
        )
    forward_backward = activations + logits + buffers

    # At the optimizer step DeepSpeed casts this rank's gradient partition to fp32 for the
    # master weights (ZeRO-3: one sub-group of sub_group_size elements at a time); the
    # activations are gone by then, so the peak takes the larger of the two phases.
    step = 0.0
    if bf16 and not fp32_grad_accum:
        elements = T * share["optimizer"]
        if zero_stage >= 3:
            elements = min(elements, _ds_setting(zero, "sub_group_size", DS_SUB_GROUP_SIZE))
        step = 4 * elements
    rows.append(
        MemoryRow("CUDA context, NCCL, allocator (allowance)", RUNTIME_RESERVE_BYTES, "fixed")
    )
    peak = states + max(forward_backward, step) + RUNTIME_RESERVE_BYTES
    rows.append(
        MemoryRow(
            "fp32 gradient copy at the optimizer step",
            step,
            "after backward: peak uses max(this, activations + logits + buffers)",
            in_peak=False,
        )
    )
    other = full if gradient_checkpointing else checkpointed
    rows.append(
        MemoryRow(
            f"activations if gradient checkpointing were {'off' if gradient_checkpointing else 'on'}",
            other,
            (f"s·b·h·L·({coefficient})" if gradient_checkpointing else "2·s·b·h·L + one layer"),
            in_peak=False,
        )
    )
    precision = "bf16 compute, fp32 master weights (DeepSpeed bf16)" if bf16 else "fp32 throughout"
    settings = (
        f"{P} rank{'s' if P > 1 else ''}, ZeRO-{zero_stage}, {precision}, {name} "
        f"({states_per_param} fp32 state{'s' if states_per_param > 1 else ''}), micro-batch "
        f"{micro_batch_size} pairs = {b} sequences × {s} tokens, gradient checkpointing "
        f"{'on' if gradient_checkpointing else 'off'}, attention {attn_implementation or 'sdpa'}"
        + (f", {adapter}: {_count(T)} trainable parameters (Ψ_train)" if trainable else "")
    )
    return MemoryEstimate(
        settings=settings,
        rows=rows,
        states=states,
        forward_backward=forward_backward,
        optimizer_step=step,
        peak=peak,
        activations_checkpointed=checkpointed,
        activations_full=full,
    )


def uses_bf16(cfg: SpinConfig) -> bool:
    """Training precision on the GPUs: `compute_dtype` semantics, with 'auto' on a GPU (bf16)."""
    return cfg.model.precision != "fp32"


def memory_for(cfg: SpinConfig, shape: ModelShape, **changes) -> MemoryEstimate:
    """`estimate_memory` for a config's training section, with some settings changed.

    The ZeRO stage and gradient accumulation dtype are those of the DeepSpeed config the
    training would really get (`deepspeed_config`: bf16 at ZeRO-0 runs as ZeRO-1).
    """
    bf16 = uses_bf16(cfg)
    fields = {k: v for k, v in changes.items() if k in TrainingConfig.model_fields}
    training = cfg.training.model_copy(update=fields)
    ds_config = deepspeed_config(training, bf16=bf16)
    changes = {k: v for k, v in changes.items() if k not in fields}
    settings = dict(
        num_processes=training.num_processes,
        zero_stage=ds_config["zero_optimization"].get("stage", training.zero_stage),
        fp32_grad_accum=ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32",
        bf16=bf16,
        optimizer=training.optimizer,
        micro_batch_size=training.micro_batch_size,
        max_length=training.max_length,
        gradient_checkpointing=training.gradient_checkpointing,
        logprob_chunk_size=training.logprob_chunk_size,
        attn_implementation=cfg.model.attn_implementation,
        zero_config=ds_config.get("zero_optimization", {}),
    )
    lora = getattr(training, "lora", None)  # LoRA: only the adapter trains
    if lora is not None:
        settings["trainable"] = lora_parameters(shape, lora.r, lora.target_modules)
        settings["adapter"] = f"LoRA r={lora.r} on {', '.join(lora.target_modules)}"
    return estimate_memory(shape, **(settings | changes))


def _memory_problem(cfg: SpinConfig, shape: ModelShape, memory: MemoryEstimate, gpu: float) -> str:
    """One line: why the estimate does not fit and which of the fields would make it fit."""
    training = cfg.training
    head = (
        f"GPU memory: the estimate of {memory.peak / GIB:.1f} GiB per rank exceeds "
        f"{gpu / GIB:g} GiB (--gpu-memory-gib); change training.micro_batch_size, "
        "training.zero_stage or training.gradient_checkpointing"
    )
    hints = []
    micro = next(
        (
            m
            for m in range(training.micro_batch_size - 1, 0, -1)
            if memory_for(cfg, shape, micro_batch_size=m).fits(gpu)
        ),
        None,
    )
    if micro is not None:
        hints.append(f"training.micro_batch_size ≤ {micro} fits")
    if not training.gradient_checkpointing and memory_for(
        cfg, shape, gradient_checkpointing=True
    ).fits(gpu):
        hints.append("training.gradient_checkpointing: true fits")
    if training.zero_stage < 3 and memory_for(cfg, shape, zero_stage=3).fits(gpu):
        hints.append("training.zero_stage: 3 fits")
    if not hints:
        hints.append(f"the model states alone take {memory.states / GIB:.1f} GiB on this rank")
        for changes, how in (
            ({}, ""),
            ({"micro_batch_size": 1, "gradient_checkpointing": True}, " with micro-batch 1"),
        ):
            ranks = _ranks_that_fit(cfg, shape, gpu, **changes)
            if ranks is not None:
                hints.append(
                    f"ZeRO-3 over at least {ranks} ranks (training.num_processes){how} would fit"
                )
                break
    return f"{head} ({'; '.join(hints)})"


def _ranks_that_fit(cfg: SpinConfig, shape: ModelShape, gpu: float, **changes) -> int | None:
    """The fewest ranks (more than now) on which ZeRO-3 fits, or None up to 4096."""
    for ranks in range(cfg.training.num_processes + 1, 4097):
        if memory_for(cfg, shape, num_processes=ranks, zero_stage=3, **changes).fits(gpu):
            return ranks
    return None


# ------------------------------------------------------------------------ steps


@dataclass
class StepRow:
    iterations: str  # "0", "1–3"
    pairs: int  # upper bound: identical pairs are dropped
    steps_per_epoch: int
    steps: int
    count: int  # iterations in this row


def optimizer_steps(cfg: SpinConfig) -> list[StepRow]:
    """Optimizer steps per iteration: iteration t trains on num_prompts × (1 + min(history, t))
    pairs (its own and its `data.history` predecessors'), num_epochs times over."""
    from spin_core.train import steps_per_epoch

    rows: list[StepRow] = []
    for t in range(cfg.run.iterations):
        pairs = cfg.data.num_prompts * (1 + min(cfg.data.history, t))
        per_epoch = steps_per_epoch(pairs, cfg.training.global_batch_size)
        if rows and rows[-1].pairs == pairs:
            first = rows[-1].iterations.split("–")[0]
            rows[-1].iterations, rows[-1].count = f"{first}–{t}", rows[-1].count + 1
            continue
        rows.append(StepRow(str(t), pairs, per_epoch, per_epoch * cfg.training.num_epochs, 1))
    return rows


# ------------------------------------------------------------------------- data


@dataclass
class LengthStats:
    """Token lengths over a sample of the training rows (the real tokenization)."""

    sample: int
    rows: int  # training rows the sample was drawn from
    prompt: list[int]  # p50, p90, p99, max
    response: list[int]
    prompts_over: int  # longer than max_prompt_length
    responses_cut: int  # prompt (after truncation) + response > max_length, of kept rows
    kept: int  # sampled rows that survive data.overlong_prompts
    responses_over_new_tokens: int  # real responses longer than generation.max_new_tokens

    @property
    def exact(self) -> bool:
        return self.sample == self.rows


def _percentiles(lengths: list[int]) -> list[int]:
    values = np.asarray(lengths)
    return [int(np.percentile(values, q, method="higher")) for q in PERCENTILES] + [
        int(values.max())
    ]


def length_stats(
    tokenizer, train, cfg: SpinConfig, *, sample_rows: int = SAMPLE_ROWS
) -> tuple[LengthStats, Any]:
    """Length statistics of a seeded sample of `train`, and the sample (with token ids)."""
    from spin_core.prompts import encode_conversations, frame_conversations

    chosen = np.sort(np.random.default_rng(cfg.data.seed).permutation(len(train))[:sample_rows])
    sample = train.iloc[chosen].reset_index(drop=True)
    prompt_ids, real_ids = encode_conversations(
        tokenizer, frame_conversations(sample), sample["real"].tolist()
    )  # InputError when the template cannot split prompt from response
    training = cfg.training
    over = [len(p) > training.max_prompt_length for p in prompt_ids]
    keep = [not o for o in over] if cfg.data.overlong_prompts == "drop" else [True] * len(over)
    cut = sum(
        min(len(p), training.max_prompt_length) + len(r) > training.max_length
        for p, r, k in zip(prompt_ids, real_ids, keep, strict=True)
        if k
    )
    stats = LengthStats(
        sample=len(sample),
        rows=len(train),
        prompt=_percentiles([len(p) for p in prompt_ids]),
        response=_percentiles([len(r) for r in real_ids]),
        prompts_over=sum(over),
        responses_cut=cut,
        kept=sum(keep),
        responses_over_new_tokens=sum(len(r) > cfg.generation.max_new_tokens for r in real_ids),
    )
    return stats, sample.assign(prompt_ids=prompt_ids, real_ids=real_ids)


def _piece(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣")


def _tokens(tokenizer, ids: list[int], head: int, tail: int) -> str:
    pieces = [
        f"{i}:{_piece(t)}" for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)
    ]
    if len(pieces) > head + tail + 1:
        pieces = [*pieces[:head], f"…({len(pieces) - head - tail} more)…", *pieces[-tail:]]
    return " ".join(pieces)


def _text(text: str, limit: int = 240) -> str:
    if len(text) > limit:
        text = text[: limit * 2 // 3] + " … " + text[-limit // 3 :]
    return repr(text)


def _wrap(line: str, width: int = 100) -> list[str]:
    out, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*out, current] if current else out


def tokenization_lines(tokenizer, row) -> list[str]:
    """One row rendered as the prompt and as the conversation, and its tokens with `|`."""
    from spin_core.prompts import encode_conversations, prompt_messages, render

    messages = prompt_messages(row["prompt"], row.get("context"))
    lines = [
        f"prompt:       {_text(render(tokenizer, messages))}",
        f"conversation: {_text(render(tokenizer, messages, row['real']))}",
    ]
    try:
        (prompt_ids,), (response_ids,) = encode_conversations(tokenizer, [messages], [row["real"]])
    except InputError as exc:
        return [*lines, f"tokens: cannot split prompt from response ({exc})"]
    lines.append(
        f"tokens: {len(prompt_ids)} prompt | {len(response_ids)} response "
        "(id:piece; `|` marks where the response starts; generation continues from the prompt)"
    )
    shown = f"{_tokens(tokenizer, prompt_ids, 14, 10)} | {_tokens(tokenizer, response_ids, 12, 4)}"
    return [*lines, *("  " + part for part in _wrap(shown))]


# ----------------------------------------------------------------------- report


@dataclass
class PreflightReport:
    """What `preflight` found: sections of the report, and the problems that stop a run."""

    title: str
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shape: ModelShape | None = None
    memory: MemoryEstimate | None = None
    steps: list[StepRow] = field(default_factory=list)
    lengths: LengthStats | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        out = [f"# {self.title}", ""]
        for heading, lines in self.sections:
            out += [f"## {heading}", "", *lines, ""]
        if self.notes:
            out += ["## Notes", "", *(f"- {n}" for n in self.notes), ""]
        if self.problems:
            out += [f"## Problems ({len(self.problems)}): this run cannot work", ""]
            out += [f"- {p}" for p in self.problems]
        else:
            out.append("Result: ok, nothing found that stops this run.")
        return "\n".join(out).rstrip() + "\n"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _pct(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.1f} %)" if whole else "0"


def _toy_built(toy_dir: Path) -> bool:
    from spin_core.toy import MARKER

    return (toy_dir / MARKER).is_file() and toy_artifacts(toy_dir).model_dir.is_dir()


def preflight(
    cfg: SpinConfig,
    *,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    run_dir: str | Path | None = None,
    source: str = "config",
) -> PreflightReport:
    """Check a config without generating or training; see the module docstring.

    `run_dir` (default runs/<run.name>) is only where a built embedded default is looked
    for. Raises InputError for inputs that cannot be read at all (a missing model
    directory or data file); everything else that stops a run is in `.problems`.
    """
    from spin_core.rundir import RunDir

    report = PreflightReport(title=f"spin check: {source}")
    run = RunDir(run_dir or Path("runs") / cfg.run.name)
    gpu = gpu_memory_gib * GIB
    toy_ready = _toy_built(run.toy)
    if cfg.uses_toy() and not toy_ready:
        report.notes.append(
            f"the embedded default (`toy`) is built by the first run (about 30 s; `spin demo` "
            f"or `spin run`) and is not built yet in {run.toy}: "
            + " and ".join(
                part
                for part, skipped in (
                    ("the data", cfg.data.dataset == TOY),
                    (
                        "the tokenizer, token lengths and memory estimate",
                        cfg.model.name_or_path == TOY,
                    ),
                )
                if skipped
            )
            + " are skipped"
        )
    model_ready = cfg.model.name_or_path != TOY or toy_ready
    data_ready = cfg.data.dataset != TOY or toy_ready
    if not data_ready and cfg.data.num_prompts > cfg.toy.num_train:
        report.problems.append(
            f"data.num_prompts ({cfg.data.num_prompts}) is larger than the toy's "
            f"{cfg.toy.num_train} training pairs (toy.num_train)"
        )

    # Model: config and tokenizer, never the weights.
    tokenizer = None
    if model_ready:
        from spin_core.checkpoint import load_tokenizer
        from spin_core.prompts import template_name

        path = run.base_model(cfg)
        shape = model_shape(path, trust_remote_code=cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
        report.shape = shape
        special = ", ".join(
            f"{k} {getattr(tokenizer, k + '_token')!r}" for k in ("bos", "eos", "pad")
        )
        report.sections.append(
            (
                "Model",
                [
                    f"θ0: {path}",
                    f"shape: {shape.describe()}",
                    f"tokenizer: {type(tokenizer).__name__}, template "
                    f"{template_name(tokenizer)!r}, vocab {len(tokenizer)}, {special}",
                ],
            )
        )
        longest = shape.max_position_embeddings
        if longest and cfg.training.max_length > longest:
            report.notes.append(
                f"training.max_length ({cfg.training.max_length}) exceeds the model's "
                f"max_position_embeddings ({longest})"
            )

    # Data: lengths over a sample, with the one tokenization.
    if data_ready:
        from spin_core.data import load_sft_data

        train, heldout, stats = load_sft_data(run.data_config(cfg))
        data_lines = [
            f"training rows: {len(train)} (after removing held-out prompts); held out: "
            f"{len(heldout)} from {stats['heldout_source']}"
        ]
        if cfg.data.num_prompts > len(train):
            report.problems.append(
                f"data.num_prompts ({cfg.data.num_prompts}) is larger than the {len(train)} "
                f"usable training rows of {cfg.data.dataset}"
            )
        if tokenizer is not None:
            data_lines += _data_section(report, tokenizer, train, cfg)
        report.sections.append(("Data", data_lines))

    # Steps: needs only the config.
    report.steps = optimizer_steps(cfg)
    report.sections.append(("Optimizer steps", _steps_lines(cfg, report.steps)))

    # Memory: needs the model's shape.
    if report.shape is not None:
        memory = memory_for(cfg, report.shape)
        report.memory = memory
        lines = _memory_lines(memory, gpu)
        if cfg.model.precision == "auto":
            lines.append("model.precision auto: bf16 on GPUs (compute_dtype), as estimated here.")
        report.sections.append(("GPU memory per rank (estimate)", lines))
        if not memory.fits(gpu):
            report.problems.append(_memory_problem(cfg, report.shape, memory, gpu))
    _disk_section(report, cfg, run.root)
    return report


def _disk_section(report: PreflightReport, cfg: SpinConfig, run_dir: Path) -> None:
    """The disk estimate (needs the model's shape); a problem when the run cannot fit."""
    if report.shape is None:
        return
    disk = estimate_disk(cfg, report.shape, run_dir)
    report.sections.append(("Disk (estimate)", disk.lines()))
    if not disk.fits():
        report.problems.append(disk.problem())


@dataclass
class DiskEstimate:
    """Bytes a run writes into its run directory, and the free space there."""

    model: int  # one exported model directory
    checkpoint: int  # one DeepSpeed checkpoint (all ranks' shards)
    data: int  # one iteration's Parquet files (upper bound)
    iterations: int
    kept_checkpoints: int  # per iteration while it trains (keep_checkpoints + the one being saved)
    keep_finished_state: bool
    models_per_iteration: int  # 2 with the SFT baseline
    where: Path
    free: int

    def per_iteration(self) -> int:
        return self.models_per_iteration * self.model + self.data

    def needed(self) -> int:
        """Peak use of the whole run: finished iterations keep their models and data (and
        checkpoints with keep_finished_state); the iteration in training holds its own."""
        training = self.models_per_iteration * self.kept_checkpoints * self.checkpoint
        kept = training if self.keep_finished_state else 0
        return self.iterations * self.per_iteration() + (self.iterations - 1) * kept + training

    def fits(self) -> bool:
        return self.needed() <= self.free

    def lines(self) -> list[str]:
        g = GIB
        return [
            f"per iteration: model {self.model / g:.2f} GiB × {self.models_per_iteration}, "
            f"data ≤ {self.data / g:.2f} GiB, while training {self.kept_checkpoints} DeepSpeed "
            f"checkpoints × {self.checkpoint / g:.2f} GiB × {self.models_per_iteration}"
            + (
                " (kept after the iteration: training.keep_finished_state)"
                if self.keep_finished_state
                else " (removed once the iteration's model is promoted)"
            ),
            f"whole run ({self.iterations} iterations): about {self.needed() / g:.1f} GiB; "
            f"free where the run directory is ({self.where}): {self.free / g:.1f} GiB",
        ]

    def problem(self) -> str:
        return (
            f"disk: the run needs about {self.needed() / GIB:.1f} GiB but {self.where} has "
            f"{self.free / GIB:.1f} GiB free (fewer run.iterations, training.keep_checkpoints, "
            "or another --run-dir)"
        )


def estimate_disk(cfg: SpinConfig, shape: ModelShape, run_dir: str | Path) -> DiskEstimate:
    """What a run of `cfg` writes: per iteration the exported θ(t+1) (weights in the compute
    precision), its DeepSpeed checkpoints (weights, and for every trained parameter the fp32
    master copy with bf16 and the optimizer's fp32 tensors; ZeRO shards them over the ranks
    without changing the total) and the Parquet files of its prompts, generations and pairs
    (every token as an int32 id and about 4 bytes of text, in ~5 copies: an upper bound)."""
    import shutil

    training = cfg.training
    bf16 = uses_bf16(cfg)
    weight = 2 if bf16 else 4
    lora = getattr(training, "lora", None)
    trainable = (
        shape.parameters if lora is None else lora_parameters(shape, lora.r, lora.target_modules)
    )
    states = OPTIMIZER_STATES[training.optimizer][1]
    checkpoint = shape.parameters * weight + trainable * (4 * states + (4 if bf16 else 0))
    tokens = cfg.data.num_prompts * (1 + cfg.data.history) * training.max_length
    where = Path(run_dir).resolve()
    probe = next(p for p in (where, *where.parents) if p.exists())
    return DiskEstimate(
        model=shape.parameters * weight,
        checkpoint=checkpoint,
        data=tokens * 8 * 5,
        iterations=cfg.run.iterations,
        kept_checkpoints=training.keep_checkpoints + 1,
        keep_finished_state=training.keep_finished_state,
        models_per_iteration=2 if cfg.run.baseline == "sft" else 1,
        where=probe,
        free=shutil.disk_usage(probe).free,
    )


def _data_section(report: PreflightReport, tokenizer, train, cfg: SpinConfig) -> list[str]:
    training = cfg.training
    try:
        lengths, sample = length_stats(tokenizer, train, cfg)
    except InputError as exc:
        report.problems.append(str(exc))
        return ["", "```", *tokenization_lines(tokenizer, train.iloc[0]), "```"]
    report.lengths = lengths
    what = (
        f"all {lengths.rows} training rows"
        if lengths.exact
        else f"a seeded sample of {lengths.sample} of the {lengths.rows} training rows"
    )
    drop = cfg.data.overlong_prompts == "drop"
    lines = [
        "",
        "One row as training sees it:",
        "",
        "```",
        *tokenization_lines(tokenizer, sample.iloc[0]),
        "```",
        "",
        f"Token lengths ({what}; responses include EOS):",
        "",
        "| | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|",
        "| prompt | " + " | ".join(map(str, lengths.prompt)) + " |",
        "| response (real) | " + " | ".join(map(str, lengths.response)) + " |",
        "",
        f"- prompts longer than training.max_prompt_length ({training.max_prompt_length}): "
        f"{_pct(lengths.prompts_over, lengths.sample)}, "
        + ("dropped (data.overlong_prompts: drop)" if drop else "left-truncated"),
        f"- real responses cut at training.max_length ({training.max_length}) after the "
        f"prompt: {_pct(lengths.responses_cut, lengths.kept)}",
        f"- real responses longer than generation.max_new_tokens "
        f"({cfg.generation.max_new_tokens}): {_pct(lengths.responses_over_new_tokens, lengths.sample)}",
    ]
    over = lengths.prompts_over / lengths.sample
    if drop:
        usable = lengths.rows - round(over * lengths.rows)
        estimated = "" if lengths.exact else "about "
        lines.append(f"- usable prompts after dropping: {estimated}{usable}")
        if over > 0.5:
            report.problems.append(
                f"training.max_prompt_length ({training.max_prompt_length}): "
                f"{100 * over:.0f} % of the prompts are longer and would be dropped "
                "(data.overlong_prompts: drop); raise it or use overlong_prompts: truncate"
            )
        elif usable < cfg.data.num_prompts <= lengths.rows:
            report.problems.append(
                f"training.max_prompt_length ({training.max_prompt_length}): after dropping "
                f"longer prompts {estimated}{usable} remain, fewer than data.num_prompts "
                f"({cfg.data.num_prompts})"
            )
    elif over > 0.5:
        report.notes.append(
            f"{100 * over:.0f} % of the prompts are longer than training.max_prompt_length "
            f"({training.max_prompt_length}) and will be left-truncated"
        )
    if lengths.kept and lengths.responses_cut / lengths.kept > 0.5:
        report.notes.append(
            f"{100 * lengths.responses_cut / lengths.kept:.0f} % of the real responses are cut "
            f"at training.max_length ({training.max_length})"
        )
    if lengths.responses_over_new_tokens / lengths.sample > 0.25:
        report.notes.append(
            f"{100 * lengths.responses_over_new_tokens / lengths.sample:.0f} % of the real "
            f"responses are longer than generation.max_new_tokens "
            f"({cfg.generation.max_new_tokens}): the opponent's answers are cut there and the "
            "real ones are not, a length cue the model can learn instead of quality"
        )
    if training.max_prompt_length + cfg.generation.max_new_tokens > training.max_length:
        report.notes.append(
            f"training.max_prompt_length + generation.max_new_tokens "
            f"({training.max_prompt_length} + {cfg.generation.max_new_tokens}) exceeds "
            f"training.max_length ({training.max_length}): long generations are cut in training"
        )
    return lines


def _steps_lines(cfg: SpinConfig, rows: list[StepRow]) -> list[str]:
    training = cfg.training
    total = sum(r.steps * r.count for r in rows)
    lines = [
        f"global batch {training.global_batch_size} pairs = micro-batch "
        f"{training.micro_batch_size} × {training.accumulation_steps()} accumulation × "
        f"{training.num_processes} rank{'s' if training.num_processes > 1 else ''}; "
        f"{training.num_epochs} epoch{'s' if training.num_epochs > 1 else ''} per iteration; "
        f"data.history {cfg.data.history}",
        "",
        "| iteration | training pairs (at most) | steps per epoch | optimizer steps |",
        "|---|---|---|---|",
        *(f"| {r.iterations} | {r.pairs} | {r.steps_per_epoch} | {r.steps} |" for r in rows),
        "",
        f"total over run.iterations ({cfg.run.iterations}): {total} optimizer steps"
        + (" (the SFT baseline trains as many again)" if cfg.run.baseline == "sft" else ""),
        "Upper bounds: iteration t trains on data.num_prompts × (1 + min(data.history, t)) pairs, "
        + (
            "less the pairs whose generated response equals the real one (data.drop_identical)."
            if cfg.data.drop_identical
            else "every pair kept (data.drop_identical: false)."
        ),
    ]
    return lines


def _memory_lines(memory: MemoryEstimate, gpu: float) -> list[str]:
    lines = [
        memory.settings,
        "",
        "| component | GiB | formula (Ψ parameters, s tokens, b sequences, h hidden, L layers) |",
        "|---|---|---|",
    ]
    for row in memory.rows:
        name = row.name if row.in_peak else f"({row.name})"
        lines.append(f"| {name} | {row.bytes / GIB:.2f} | {row.formula} |")
    verdict = "fits" if memory.fits(gpu) else "does NOT fit"
    lines += [
        f"| **peak** | **{memory.peak / GIB:.2f}** | states + max(forward/backward, step) "
        "+ allowance |",
        "",
        f"Model states (weights + gradients + optimizer): {memory.states / GIB:.2f} GiB. "
        f"Peak {memory.peak / GIB:.1f} GiB of {gpu / GIB:g} GiB (--gpu-memory-gib): {verdict}. "
        "Rows in parentheses are not part of the peak. Sequences are taken at training.max_length "
        "(the worst case; batches are padded to their longest pair).",
    ]
    return lines
