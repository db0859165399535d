"""The memory model of a training rank: a model's shape from its config alone, and the GPU
memory one rank needs at a ZeRO stage, precision, optimizer, micro-batch and gradient
checkpointing (`estimate_memory`; `memory_for` reads those from a config). `spin check`
(spin_core/reports/preflight.py) renders it and says what would make a run fit.

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
further fp32 copy. At ZeRO-2/3 (bf16 with accumulation > 1) the gradient partitions
themselves are fp32: 4 B instead of 2 per trainable parameter and rank share. The optimizer runs one parameter at a time (foreach=False), so its
temporaries are one parameter's, below this model's resolution.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from spin_core.config import SpinConfig, TrainingConfig, deepspeed_config

GIB = 1024**3
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
            f"{self.model_type}, {count_text(self.parameters)} parameters ({self.counted}); hidden "
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

    from spin_core.storage.models import check_causal_lm

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
    """GPU memory per training rank, from the model's shape and the training settings;
    the model (ZeRO's model states, Korthikanti et al.'s activations, `trainable`,
    `fp32_grad_accum`) is the module docstring's."""
    P = num_processes
    T = shape.parameters if trainable is None else trainable  # gradients and optimizer state
    zero = zero_config or {}
    w = 2 if bf16 else 4  # bytes of a weight / gradient element in compute precision
    share = {  # the fraction of each model state one rank holds (ZeRO paper, Figure 1)
        "weights": 1 / P if zero_stage >= 3 else 1.0,
        "gradients": 1 / P if zero_stage >= 2 else 1.0,
        "optimizer": 1 / P if zero_stage >= 1 else 1.0,
    }
    rows = _state_rows(shape, share, P, bf16, optimizer, trainable, fp32_grad_accum, zero_stage)
    states = sum(r.bytes for r in rows)

    s, b = max_length, 2 * micro_batch_size
    eager = (attn_implementation or "sdpa") == "eager"
    full, checkpointed, coefficient = _activations(shape, s, b, w, eager)
    activations = checkpointed if gradient_checkpointing else full
    rows.append(
        MemoryRow(
            f"activations, checkpointing {'on' if gradient_checkpointing else 'off'} "
            f"({b} seqs × {s} tokens)",
            activations,
            ("2·s·b·h·L + one layer" if gradient_checkpointing else f"s·b·h·L·({coefficient})"),
        )
    )
    head_rows = _logits_rows(shape, min(logprob_chunk_size, s * b), bf16)
    rows += head_rows
    buffers = 0.0
    if zero_stage >= 3:
        rows.append(_zero3_buffers(shape, zero, T, w))
        buffers = rows[-1].bytes
    forward_backward = activations + sum(r.bytes for r in head_rows) + buffers

    # At the optimizer step DeepSpeed casts this rank's gradient partition to fp32 for the
    # master weights (ZeRO-3: one sub-group of sub_group_size elements at a time); the
    # activations are gone by then, so the peak takes the larger of the two phases.
    step = 0.0
    if bf16 and not fp32_grad_accum:
        elements = T * share["optimizer"]
        if zero_stage >= 3:
            elements = min(elements, _ds_setting(zero, "sub_group_size", DS_SUB_GROUP_SIZE))
        step = 4 * elements
    peak = states + max(forward_backward, step) + RUNTIME_RESERVE_BYTES
    rows += [
        MemoryRow("CUDA context, NCCL, allocator (allowance)", RUNTIME_RESERVE_BYTES, "fixed"),
        MemoryRow(
            "fp32 gradient copy at the optimizer step",
            step,
            "after backward: peak uses max(this, activations + logits + buffers)",
            in_peak=False,
        ),
        MemoryRow(
            f"activations if gradient checkpointing were {'off' if gradient_checkpointing else 'on'}",
            full if gradient_checkpointing else checkpointed,
            (f"s·b·h·L·({coefficient})" if gradient_checkpointing else "2·s·b·h·L + one layer"),
            in_peak=False,
        ),
    ]
    settings = _settings_line(
        P, zero_stage, bf16, optimizer, micro_batch_size, s, gradient_checkpointing,
        attn_implementation, adapter, trainable,
    )  # fmt: skip
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


def _settings_line(
    P: int,
    zero_stage: int,
    bf16: bool,
    optimizer: str,
    micro_batch_size: int,
    s: int,
    gradient_checkpointing: bool,
    attn_implementation: str | None,
    adapter: str,
    trainable: int | None,
) -> str:
    """The estimate's settings in one line, as `spin check` prints it above the table."""
    name, states_per_param, _ = OPTIMIZER_STATES[optimizer]
    precision = "bf16 compute, fp32 master weights (DeepSpeed bf16)" if bf16 else "fp32 throughout"
    return (
        f"{P} rank{'s' if P > 1 else ''}, ZeRO-{zero_stage}, {precision}, {name} "
        f"({states_per_param} fp32 state{'s' if states_per_param > 1 else ''}), micro-batch "
        f"{micro_batch_size} pairs = {2 * micro_batch_size} sequences × {s} tokens, gradient "
        f"checkpointing {'on' if gradient_checkpointing else 'off'}, attention "
        f"{attn_implementation or 'sdpa'}"
        + (
            f", {adapter}: {count_text(trainable)} trainable parameters (Ψ_train)"
            if trainable
            else ""
        )
    )


def _state_rows(
    shape: ModelShape,
    share: dict[str, float],
    P: int,
    bf16: bool,
    optimizer: str,
    trainable: int | None,
    fp32_grad_accum: bool,
    zero_stage: int,
) -> list[MemoryRow]:
    """Weights, gradients, fp32 master and optimizer state of one rank (ZeRO paper, §3.1)."""
    T = shape.parameters if trainable is None else trainable  # gradients and optimizer state
    N = shape.parameters + (0 if trainable is None else trainable)  # weights (+ adapter)
    t_sym = "Ψ" if trainable is None else "Ψ_train"
    w = 2 if bf16 else 4
    name, states_per_param, state_names = OPTIMIZER_STATES[optimizer]
    split = {k: (f" / {P}" if v < 1 else "") for k, v in share.items()}
    dtype = "bf16" if bf16 else "fp32"
    # ZeRO-2/3 with fp32 accumulation keep their gradient partitions in fp32; ZeRO-0/1 (the
    # BF16_Optimizer) keep bf16 gradients and a whole fp32 accumulation buffer beside them.
    partitioned_fp32 = bf16 and fp32_grad_accum and zero_stage >= 2
    g, gradient_dtype = (4, "fp32") if partitioned_fp32 else (w, dtype)
    rows = [
        MemoryRow(
            f"weights ({dtype})",
            w * N * share["weights"],
            f"{w} B × {'(Ψ + Ψ_train)' if trainable is not None else 'Ψ'}{split['weights']}",
        ),
        MemoryRow(
            f"gradients ({gradient_dtype})",
            g * T * share["gradients"],
            f"{g} B × {t_sym}{split['gradients']}",
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
    if bf16 and fp32_grad_accum and not partitioned_fp32:
        rows.append(
            MemoryRow("fp32 gradient accumulation (BF16_Optimizer)", 4 * T, f"4 B × {t_sym}")
        )
    return rows


def _activations(
    shape: ModelShape, s: int, b: int, w: int, eager: bool
) -> tuple[float, float, str]:
    """(all layers kept, checkpointed, the per-layer coefficient as text) for b sequences of
    s tokens (Korthikanti et al. 2022), scaled from 16-bit to `w` bytes per element."""
    h, L, a, kv = shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads
    i = shape.intermediate_size
    attention = 7 + 4 * kv / a
    mlp = 3 + (8 if shape.gated_mlp else 4) * i / h
    per_layer = s * b * h * (attention + mlp + 4) + (5 * a * s * s * b if eager else 0)
    per_layer *= w / 2
    full = L * per_layer
    checkpointed = L * 2 * s * b * h * (w / 2) + per_layer
    coefficient = f"{attention + mlp + 4:.0f}" + (" + 5·a·s/h" if eager else "")
    return full, checkpointed, coefficient


def _logits_rows(shape: ModelShape, positions: int, bf16: bool) -> list[MemoryRow]:
    """The log-prob chunk and the fp32 LM head. Log-probs are taken over
    `logprob_chunk_size` response positions at a time (spin_core.logprobs), so a
    (batch, seq, vocab) tensor never exists; the head matmul is in fp32: an fp32 copy of
    the head weight in bf16, and in backward the head's gradient summed over the chunks."""
    V, h = shape.vocab_size, shape.hidden_size
    return [
        MemoryRow(
            f"logits chunk ({positions} positions × vocab {V})",
            positions * V * LOGITS_BYTES_PER_ELEMENT,
            f"chunk × V × {LOGITS_BYTES_PER_ELEMENT} B",
        ),
        MemoryRow(
            "fp32 LM head copy and its gradient sum",
            (4 if bf16 else 0) * V * h + 4 * V * h,
            f"({'4 + ' if bf16 else ''}4) B × V × h",
        ),
    ]


def _zero3_buffers(shape: ModelShape, zero: dict[str, Any], T: int, w: int) -> MemoryRow:
    """ZeRO-3 gathers each module's weights before it runs (plus a prefetch bucket) and
    reduces gradients through a contiguous bucket of reduce_bucket_size elements."""
    reduce_bucket = min(_ds_setting(zero, "reduce_bucket_size", DS_REDUCE_BUCKET_SIZE), T)
    prefetch = _ds_setting(zero, "stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET_SIZE)
    live = _ds_setting(zero, "stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS)
    gathered = min(shape.largest_module + prefetch, live)
    return MemoryRow(
        "ZeRO-3 gathered weights and reduce bucket",
        w * (reduce_bucket + gathered),
        f"{w} B × (largest module + prefetch bucket + reduce bucket)",
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


def memory_problem(cfg: SpinConfig, shape: ModelShape, memory: MemoryEstimate, gpu: float) -> str:
    """One line: why the estimate does not fit, and each change that would make it fit on
    these ranks with its estimate; more ranks only when nothing on these does (on one GPU,
    "ZeRO-3 over 4 ranks" cannot be acted on)."""
    from spin_core.config import LoraConfig

    training = cfg.training
    head = (
        f"GPU memory: the estimate of {memory.peak / GIB:.1f} GiB per rank exceeds "
        f"{gpu / GIB:g} GiB (--gpu-memory-gib)"
    )
    hints = []
    smallest = {"micro_batch_size": 1, "gradient_checkpointing": True}  # the least activations

    def hint(text: str, **changes) -> bool:
        estimate = memory_for(cfg, shape, **changes)
        if estimate.fits(gpu):
            hints.append(f"{text} ({estimate.peak / GIB:.1f} GiB)")
        return estimate.fits(gpu)

    micro = next(
        (
            m
            for m in range(training.micro_batch_size - 1, 0, -1)
            if memory_for(cfg, shape, micro_batch_size=m).fits(gpu)
        ),
        None,
    )
    if micro is not None:
        hint(f"training.micro_batch_size: {micro}", micro_batch_size=micro)
    if not training.gradient_checkpointing:
        hint("training.gradient_checkpointing: true", gradient_checkpointing=True)
    if training.zero_stage < 3 and training.num_processes > 1:
        hint("training.zero_stage: 3", zero_stage=3)
    if training.lora is None:
        lora = LoraConfig()
        names = f"LoRA r={lora.r} on {len(lora.target_modules)} projections"
        if not hint(f"training.lora: {{}} ({names})", lora=lora):
            hint(f"training.lora: {{}} with micro-batch 1 ({names})", lora=lora, **smallest)
    if hints:
        return f"{head}; it fits with {'; or '.join(hints)}"
    why = f"{head}; the model states alone take {memory.states / GIB:.1f} GiB on this rank"
    for changes, how in (({}, ""), (smallest, " with micro-batch 1")):
        ranks = _ranks_that_fit(cfg, shape, gpu, **changes)
        if ranks is not None:
            return f"{why}; ZeRO-3 over at least {ranks} GPUs (training.num_processes){how} fits"
    return why


def _ranks_that_fit(cfg: SpinConfig, shape: ModelShape, gpu: float, **changes) -> int | None:
    """The fewest ranks (more than now) on which ZeRO-3 fits, or None up to 4096."""
    for ranks in range(cfg.training.num_processes + 1, 4097):
        if memory_for(cfg, shape, num_processes=ranks, zero_stage=3, **changes).fits(gpu):
            return ranks
    return None


def count_text(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


@dataclass
class GenerationMemory:
    """GPU memory of one generation worker (one GPU, or `tensor_parallel_size` with vLLM)."""

    backend: str
    rows: list[MemoryRow]
    peak: float  # bytes on one GPU
    limit: float  # what it may use: the GPU (HF), gpu_memory_utilization of it (vLLM)
    kv_tokens: int  # tokens the KV cache holds
    needed_tokens: int  # tokens the KV cache must hold at least
    per_batch_token: float = 0.0  # HF: bytes that grow with generation.batch_tokens (KV, prefill)

    def fits(self) -> bool:
        return self.peak <= self.limit and self.kv_tokens >= self.needed_tokens


def generation_memory(cfg: SpinConfig, shape: ModelShape, gpu: float) -> GenerationMemory:
    """What one generation worker holds on a GPU while θt writes the responses.

    HF (spin's decoder): θt in the compute dtype, the KV cache of a full batch
    (`generation.batch_tokens` tokens), one layer's MLP activations while the prompts are
    prefilled, the last position's logits. vLLM takes `gpu_memory_utilization` of the GPU;
    its weights (split over `tensor_parallel_size`) must leave room for a KV cache that holds
    one whole sequence (max_prompt_length + max_new_tokens), or vLLM refuses to start.
    """
    g = cfg.generation
    w = 2 if uses_bf16(cfg) else 4
    head_dim = shape.hidden_size // shape.num_heads
    kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * head_dim * w  # K and V
    sequence = cfg.training.max_prompt_length + g.max_new_tokens
    if g.backend == "vllm":
        tp = g.tensor_parallel_size
        weights = w * shape.parameters / tp
        limit = g.gpu_memory_utilization * gpu
        kv = max(limit - weights - RUNTIME_RESERVE_BYTES, 0.0)
        rows = [
            MemoryRow(f"weights ({w} B × Ψ / {tp} GPUs)", weights, f"{w} B × Ψ / {tp}"),
            MemoryRow("CUDA context, activations (allowance)", RUNTIME_RESERVE_BYTES, "fixed"),
            MemoryRow("KV cache: the rest of vLLM's share", kv, "share − weights − allowance"),
        ]
        return GenerationMemory("vllm", rows, limit, limit, int(kv / (kv_per_token / tp)), sequence)
    tokens = g.batch_tokens
    mlp = tokens * shape.intermediate_size * (3 if shape.gated_mlp else 2) * w
    rows = [
        MemoryRow(f"weights ({'bf16' if w == 2 else 'fp32'})", w * shape.parameters, f"{w} B × Ψ"),
        MemoryRow(
            f"KV cache ({tokens} tokens: generation.batch_tokens)",
            tokens * kv_per_token,
            "2 × L × kv heads × head dim × w per token",
        ),
        MemoryRow("prefill: one layer's MLP activations", mlp, "tokens × intermediate × 3 × w"),
        MemoryRow(
            "last position's logits (fp32)",
            4 * g.max_batch_size * shape.vocab_size,
            "max_batch_size × vocab × 4 B",
        ),
        MemoryRow("CUDA context, allocator (allowance)", RUNTIME_RESERVE_BYTES, "fixed"),
    ]
    peak = sum(r.bytes for r in rows)
    per_token = (tokens * kv_per_token + mlp) / tokens
    return GenerationMemory("hf", rows, peak, gpu, tokens, sequence, per_token)


def generation_memory_lines(memory: GenerationMemory, cfg: SpinConfig, gpu: float) -> list[str]:
    g = cfg.generation
    lines = [
        f"backend {memory.backend}, {g.num_workers} worker(s), each on its own GPU"
        + (f" × {g.tensor_parallel_size} (tensor parallel)" if memory.backend == "vllm" else ""),
        "",
        "| component | GiB | formula |",
        "|---|---|---|",
        *(f"| {r.name} | {r.bytes / GIB:.2f} | {r.formula} |" for r in memory.rows),
    ]
    if memory.backend == "vllm":
        lines.append(
            f"vLLM may take {memory.limit / GIB:.1f} GiB of {gpu / GIB:g} GiB "
            f"(generation.gpu_memory_utilization {g.gpu_memory_utilization}); its KV cache holds "
            f"about {memory.kv_tokens} tokens, {memory.kv_tokens // max(memory.needed_tokens, 1)} "
            f"whole sequences of {memory.needed_tokens}: "
            + ("fits." if memory.fits() else "does NOT fit.")
        )
    else:
        lines.append(
            f"Peak {memory.peak / GIB:.1f} GiB of {gpu / GIB:g} GiB: "
            + ("fits." if memory.fits() else "does NOT fit.")
        )
    return lines


def generation_memory_problem(memory: GenerationMemory, cfg: SpinConfig, gpu: float) -> str:
    g = cfg.generation
    if memory.backend == "vllm":
        return (
            f"generation memory: vLLM's share of {memory.limit / GIB:.1f} GiB per GPU leaves room "
            f"for {memory.kv_tokens} tokens of KV cache, fewer than one sequence of "
            f"{memory.needed_tokens} (raise generation.gpu_memory_utilization or "
            "generation.tensor_parallel_size)"
        )
    fixed = memory.peak - memory.per_batch_token * g.batch_tokens
    smaller = max(64, int((gpu - fixed) / memory.per_batch_token))
    return (
        f"generation memory: the estimate of {memory.peak / GIB:.1f} GiB per GPU exceeds "
        f"{gpu / GIB:g} GiB (--gpu-memory-gib); generation.batch_tokens ≤ about {smaller} fits"
    )
