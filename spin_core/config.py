"""The one typed configuration of a SPIN run.

`SpinConfig` is validated from YAML, from `--set key.sub=value` overrides and, in
the pipeline, from the Prefect flow parameter form; the same model serves all
three, so every field has a type, a default, a range and a one-line description.
Defaults follow the paper's official recipe (Chen et al., 2024) for a 7B model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spin_core.errors import InputError


class ConfigError(InputError):
    """A configuration that cannot be used; the message names the field."""


# Marks a field that does not change what a run computes (batching, checkpoint cadence,
# reporting, how far to go): a resumed run may change it, and cache keys leave it out.
MAY_CHANGE_ON_RESUME = {"may_change_on_resume": True}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A per-iteration schedule: one value for every iteration, or a list indexed by
# iteration whose last value carries on for later iterations.
PositiveSchedule = float | list[float]


def _check_schedule(name: str, value: PositiveSchedule) -> PositiveSchedule:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{name} must be a number or a non-empty list of numbers")
    for v in values:
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    return value


def schedule_at(value: PositiveSchedule, iteration: int) -> float:
    """The value of a per-iteration schedule at `iteration` (last entry repeats)."""
    if isinstance(value, list):
        return float(value[min(iteration, len(value) - 1)])
    return float(value)


class DataConfig(_Section):
    dataset: str = Field(
        "HuggingFaceH4/ultrachat_200k",
        description="SFT data: a Parquet/JSONL file or directory, or a Hugging Face dataset name",
    )
    split: str = Field("train_sft", description="split to load when `dataset` is a hub name")
    revision: str | None = Field(
        None, description="hub commit (or tag) of `dataset` and `eval_dataset` when hub names"
    )
    eval_dataset: str | None = Field(
        None,
        description="held-out data (same formats); when unset, `eval_size` rows are held out of `dataset`",
    )
    eval_split: str = Field("test_sft", description="split of `eval_dataset` when it is a hub name")
    eval_size: int = Field(500, ge=1, le=100_000, description="held-out pairs used for evaluation")
    messages_column: str = Field(
        "messages",
        description="chat-format column of {role, content} messages (UltraChat style)",
    )
    prompt_turns: Literal["first", "all"] = Field(
        "first",
        description="chats: 'first' = the first user turn and its answer (the paper); 'all' = "
        "every turn before the last assistant message is the prompt, that message is y",
    )
    prompt_column: str | None = Field(
        None, description="prompt column (set with response_column instead of a messages column)"
    )
    response_column: str | None = Field(None, description="human response column")
    num_prompts: int = Field(
        50_000, ge=1, le=100_000_000, description="(prompt, real) pairs sampled per iteration"
    )
    resample_each_iteration: bool = Field(
        False, description="draw a new sample each iteration (the paper reuses one fixed sample)"
    )
    seed: int = Field(42, ge=0, description="seed of the prompt sample and held-out split")
    history: int = Field(
        1,
        ge=0,
        le=100,
        description="earlier iterations' synthetic pairs mixed into the training set",
    )
    drop_identical: bool = Field(
        True, description="drop pairs whose generated response equals the real one (zero gradient)"
    )
    overlong_prompts: Literal["truncate", "drop"] = Field(
        "truncate", description="prompts longer than max_prompt_length: left-truncate or drop"
    )


class ModelConfig(_Section):
    name_or_path: str = Field(
        "alignment-handbook/zephyr-7b-sft-full",
        description="θ0: a local HF model directory or hub name",
    )
    trust_remote_code: bool = Field(
        False, description="allow model code from the hub (off: secure)"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="compute precision; auto = bf16 on GPU, fp32 on CPU"
    )
    attn_implementation: str | None = Field(
        None, description="transformers attention implementation (e.g. sdpa, flash_attention_2)"
    )
    revision: str | None = Field(
        None,
        description="hub commit (or tag) of θ0 when name_or_path is a hub name: pins what is loaded",
    )


class GenerationConfig(_Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="generation engine")
    do_sample: bool = Field(False, description="sample (True) or decode greedily (False)")
    temperature: float = Field(1.0, gt=0, le=10, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(256, ge=1, le=32_768, description="longest generated response")
    batch_tokens: int = Field(
        65_536,
        ge=64,
        description="token budget of one generation batch (prompt + new tokens per row)",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    max_batch_size: int = Field(
        256,
        ge=1,
        description="most prompts in one generation batch",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    shard_size: int = Field(
        1000,
        ge=1,
        description="rows per generated shard; finished shards survive a crash",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    num_workers: int = Field(
        1,
        ge=1,
        le=1024,
        description="generation worker processes on a machine, each with its own device(s): "
        "tensor_parallel_size GPUs, or a share of the CPU cores",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size")
    python: str | None = Field(
        None,
        description="the Python that runs generation workers (a virtualenv with vLLM, whose pins "
        "differ from training's); unset: spin's own",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV cache of each vLLM engine, in GiB; unset: what gpu_memory_utilization "
        "leaves on a GPU, and $VLLM_CPU_KVCACHE_SPACE or 4 GiB on a CPU",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    vllm_eager: bool = Field(
        False,
        description="vLLM without graph compilation or CUDA graphs: its engine starts sooner "
        "(about 40 s less for SmolLM2 on a CPU), and decodes slower on a GPU",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="fraction of each GPU's memory vLLM may take (weights, activations, KV cache)",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    seed: int = Field(0, ge=0, description="sampling seed")


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        min_length=1,
        description="module names that get an adapter (default: attention and MLP projections)",
    )


class TrainingConfig(_Section):
    beta: PositiveSchedule = Field(
        0.1, description="β (λ = 1/β in the paper): a number, or a list indexed by iteration"
    )
    learning_rate: PositiveSchedule = Field(
        [5e-7, 5e-7, 1e-7],
        description="peak learning rate: a number, or a list indexed by iteration (last repeats)",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        le=100,
        description="α of SFT-anchored SPIN: adds α · the real responses' per-token NLL to the "
        "loss (0 = the paper's loss)",
    )
    optimizer: Literal["rmsprop", "adamw"] = Field("rmsprop", description="optimizer")
    weight_decay: float = Field(0.0, ge=0, le=1, description="decoupled weight decay")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of steps of linear warm-up")
    num_epochs: int = Field(
        2, ge=1, le=100, description="epochs over the training set per iteration"
    )
    global_batch_size: int = Field(64, ge=1, description="pairs per optimizer step, over all ranks")
    micro_batch_size: int = Field(8, ge=1, description="pairs per forward pass on one rank")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="micro-batches per step; derived from the global batch when unset"
    )
    num_processes: int = Field(
        1, ge=1, le=4096, description="training ranks (GPUs) over all nodes; > 1 launches ranks"
    )
    num_nodes: int = Field(
        1, ge=1, le=512, description="nodes of a multi-node job (hostfile or torchrun rendezvous)"
    )
    hostfile: str | None = Field(
        None, description="DeepSpeed hostfile: launch the ranks on these hosts with `deepspeed`"
    )
    launcher: Literal["auto", "deepspeed", "torchrun"] = Field(
        "auto",
        description="how ranks start: deepspeed (over SSH, from the hostfile) or torchrun (every "
        "other node runs `python -m spin_core.training.node`); auto = deepspeed with a hostfile",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^[^\s:]+:\d{1,5}$",
        description="host:port of node 0 for a multi-node torchrun job; unset: "
        "$MASTER_ADDR:$MASTER_PORT, else this host and a free port",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    max_length: int = Field(1024, ge=2, description="longest prompt + response in tokens")
    max_prompt_length: int = Field(
        512, ge=1, description="longest prompt in tokens (left-truncated)"
    )
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = off)")
    gradient_checkpointing: bool = Field(True, description="recompute activations to save memory")
    zero_stage: int | None = Field(
        None,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage; unset: 3 on several ranks, 0 on one",
    )
    save_steps: int = Field(
        50,
        ge=1,
        description="optimizer steps between DeepSpeed checkpoints",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    eval_steps: int = Field(
        0,
        ge=0,
        description="held-out health check every this many optimizer steps (0 = at the end only)",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    collective_timeout_minutes: float = Field(
        60,
        gt=0,
        le=24 * 60,
        description="how long a rank waits in a collective (DeepSpeed's default is 10 min): "
        "checkpoint saves on slow shared storage wait on the slowest rank's write",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="DeepSpeed checkpoints kept in train_state/",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    keep_finished_state: bool = Field(
        False,
        description="keep an iteration's DeepSpeed checkpoints once its model is exported and "
        "promoted (false: they are removed; 7B: 3 × 67 GiB while training)",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    logprob_chunk_size: int = Field(
        1024,
        ge=1,
        description="response positions per chunk when computing log-probs",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    score_batch_tokens: int = Field(
        32_768,
        ge=64,
        description="token budget of one opponent-scoring batch (larger is faster on a GPU; "
        "on a CPU about one training micro-batch, e.g. 2048, is faster)",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    seed: int = Field(42, ge=0, description="seed of data order and initialisation")
    deepspeed: dict[str, Any] | None = Field(
        None, description="DeepSpeed JSON merged over the generated DeepSpeed config"
    )
    lora: LoraConfig | None = Field(
        None,
        description="train a fresh LoRA adapter on θt each iteration and export θt + adapter "
        "merged (unset: full fine-tuning)",
    )
    export_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the exported θ(t+1), taken from the fp32 master weights: fp32 keeps "
        "every update (7B: 28 GB per iteration); bf16 halves that but rounds away updates below "
        "bf16's spacing (metrics: weights_changed)",
    )

    @field_validator("beta", "learning_rate")
    @classmethod
    def _positive_schedule(cls, value: PositiveSchedule, info) -> PositiveSchedule:
        return _check_schedule(info.field_name, value)

    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on one rank."""
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        return self.global_batch_size // (self.micro_batch_size * self.num_processes)

    @model_validator(mode="after")
    def _check_batch_and_lengths(self) -> TrainingConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"max_length ({self.max_length})"
            )
        if self.num_processes % self.num_nodes:
            raise ValueError(
                f"num_processes ({self.num_processes}) must be divisible by "
                f"num_nodes ({self.num_nodes}): the same number of ranks on every node"
            )
        if self.launcher == "deepspeed" and self.num_nodes > 1 and not self.hostfile:
            raise ValueError(
                f"num_nodes is {self.num_nodes}: the deepspeed launcher needs a hostfile naming "
                "the nodes (or launcher: torchrun, which needs none)"
            )
        if self.launcher == "torchrun" and self.hostfile:
            raise ValueError(
                "hostfile is for the deepspeed launcher: unset it, or set launcher: deepspeed"
            )
        per_step = self.micro_batch_size * self.num_processes
        accumulation = self.gradient_accumulation_steps
        if accumulation is None and self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be divisible by "
                f"micro_batch_size × num_processes ({self.micro_batch_size} × {self.num_processes})"
            )
        if accumulation is not None and self.global_batch_size != per_step * accumulation:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must equal micro_batch_size × "
                f"gradient_accumulation_steps × num_processes ({self.micro_batch_size} × "
                f"{accumulation} × {self.num_processes} = {per_step * accumulation})"
            )
        if self.zero_stage is None:
            self.zero_stage = 0 if self.num_processes == 1 else 3  # one rank: nothing to shard
        return self


class LmEvalConfig(_Section):
    """lm-evaluation-harness benchmarks of θ0 and every promoted θt (spin_core/lm_eval.py)."""

    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval task or group names, 'name:N' for N-shot (e.g. arc_challenge:25); "
        "empty: off",
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="few-shot examples of tasks without ':N' (unset: the task's own)"
    )
    limit: int | float | None = Field(
        None,
        gt=0,
        description="examples per task, a fraction when < 1 (quick checks only: scores are "
        "then not comparable)",
    )
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")
    processes: int | None = Field(
        None,
        ge=1,
        description="data-parallel lm-eval processes, one per GPU of this machine (unset: every "
        "GPU it has); more than 1 runs lm-eval as a child job over the GPUs; a machine "
        "without GPUs runs one",
    )
    include_path: str | None = Field(
        None, description="directory of custom task YAMLs, searched before lm-eval's own"
    )

    @field_validator("tasks")
    @classmethod
    def _task_specs(cls, tasks: list[str]) -> list[str]:
        names = set()
        for spec in tasks:
            name, colon, shots = spec.rpartition(":") if ":" in spec else (spec, "", "")
            if not name.strip() or (colon and not shots.isdigit()):
                raise ValueError(f"expected 'name' or 'name:N' with N ≥ 0 few-shot, got {spec!r}")
            if name in names:
                raise ValueError(f"task {name!r} is listed twice")
            names.add(name)
        return tasks

    def task_shots(self) -> list[tuple[str, int | None]]:
        """(task, few-shot) per task: its ':N', else `num_fewshot` (None: the task's own)."""
        pairs = []
        for spec in self.tasks:
            name, _, shots = spec.rpartition(":") if ":" in spec else (spec, "", "")
            pairs.append((name, int(shots) if shots else self.num_fewshot))
        return pairs


class EvalConfig(_Section):
    max_new_tokens: int | None = Field(
        None, ge=1, description="longest held-out generation; defaults to generation.max_new_tokens"
    )
    health_size: int = Field(
        200,
        ge=1,
        description="held-out pairs scored by the in-training health check",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    lm_eval: LmEvalConfig | None = Field(
        None,
        description="also run lm-evaluation-harness (pip install 'spin[lm-eval]') on θ0 and "
        "every promoted θt (unset or no tasks: off)",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )


class RunConfig(_Section):
    name: str = Field("spin", min_length=1, description="run name (runs/<name>/ by default)")
    iterations: int = Field(
        3, ge=1, le=1000, description="SPIN iterations T", json_schema_extra=MAY_CHANGE_ON_RESUME
    )
    early_stop_margin: float | None = Field(
        None,
        description="stop when the held-out margin of the new model falls below this",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    collapse_tolerance: float = Field(
        0.5,
        ge=0,
        description="nats/token the held-out real log-likelihood may fall below the opponent's",
    )
    promote_collapsed: bool = Field(
        False, description="promote a model that failed the health check anyway"
    )
    on_collapse: Literal["stop", "retry_half_lr"] = Field(
        "stop",
        description="after a collapsed iteration: stop, or retry it once at half the learning rate",
    )
    sample_rows: int = Field(
        8,
        ge=0,
        le=100,
        description="sample generations shown in the report",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    execution: Literal["local", "deployments"] = Field(
        "local",
        description="where generation and training run: in this process, or on GPU workers "
        "through the spin-generate / spin-train deployments",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    tracking: Literal["none", "mlflow", "wandb"] = Field(
        "none",
        description="also log step metrics and evaluations to MLflow (MLFLOW_TRACKING_URI, "
        "else sqlite in the run directory) or W&B (offline unless WANDB_MODE/WANDB_API_KEY)",
        json_schema_extra=MAY_CHANGE_ON_RESUME,
    )
    baseline: Literal["none", "sft"] = Field(
        "none",
        description="also train a continued-SFT baseline with SPIN's optimizer steps and learning rate",
    )
    deterministic: bool = Field(
        False,
        description="deterministic CUDA kernels (torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8) in the flow process and every training rank; slower",
    )


TOY = "toy"  # data.dataset / model.name_or_path value that selects the embedded default


class ToyConfig(_Section):
    num_train: int = Field(4000, ge=10, description="toy training pairs generated")
    num_eval: int = Field(500, ge=10, description="toy held-out pairs generated")
    sft_steps: int = Field(
        300, ge=1, description="SFT warm-up steps that make θ0 (weak on purpose)"
    )
    sft_lr: float = Field(1e-3, gt=0, description="SFT warm-up learning rate (AdamW)")
    seed: int = Field(0, ge=0, description="seed of the toy data and θ0")
    hidden_size: int = Field(
        128, ge=8, le=4096, multiple_of=4, description="θ0's width (4 attention heads)"
    )
    num_layers: int = Field(4, ge=1, le=64, description="θ0's transformer layers")
    sft_batch_size: int = Field(64, ge=1, le=4096, description="SFT warm-up pairs per step")
    base_model: str | None = Field(
        None,
        description="a chat model directory to warm up into θ0 on natural-language chat tasks "
        "(spin_core/chat_tasks.py) instead of building the character-level Llama, "
        "e.g. models/SmolLM2-135M-Instruct from `spin import-gguf smollm2`",
    )


class SpinConfig(_Section):
    """A SPIN run: data, model θ0, generation, training, evaluation and run control."""

    data: DataConfig = Field(default_factory=DataConfig, description="SFT data and sampling")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the SFT model θ0")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="how the opponent writes responses"
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="the SPIN objective and optimizer"
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation")
    run: RunConfig = Field(default_factory=RunConfig, description="iterations and run control")
    toy: ToyConfig = Field(
        default_factory=ToyConfig,
        description="the embedded default, built when data.dataset or model.name_or_path is 'toy'",
    )

    def uses_toy(self) -> bool:
        return TOY in (self.data.dataset, self.model.name_or_path)

    @model_validator(mode="after")
    def _check_columns(self) -> SpinConfig:
        if (self.data.prompt_column is None) != (self.data.response_column is None):
            raise ValueError(
                "data.prompt_column and data.response_column must be set together "
                f"(got prompt_column={self.data.prompt_column!r}, "
                f"response_column={self.data.response_column!r})"
            )
        return self

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    got = error.get("input")
    if isinstance(got, dict | list) or got is None:
        return f"{where}: {message}"
    return f"{where}: {message} (got {got!r})"


def validate_config(raw: dict[str, Any], source: str = "config") -> SpinConfig:
    """Validate a plain mapping into `SpinConfig`, raising `ConfigError` naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return SpinConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    key, _, text = item.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r}: empty key")
    # YAML gives `0.1` -> float, `[1e-5, 1e-6]` -> list, `true` -> bool, as in the file.
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {text!r}: {exc}") from None
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with `key.sub=value` overrides applied (not yet validated)."""
    merged = copy.deepcopy(raw)
    for item in overrides:
        keys, value = _parse_override(item)
        node = merged
        for k in keys[:-1]:
            if node.get(k) is None:  # an unset optional section (training.lora: null)
                node[k] = {}
            child = node[k]
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SpinConfig:
    """Load a YAML config (or the defaults when `path` is None) with `--set` overrides."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, source=str(path) if path else "config")


def deepspeed_config(training: TrainingConfig, *, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for one iteration, with `training.deepspeed` merged over it."""
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.accumulation_steps(),
        "train_batch_size": training.global_batch_size,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": {"stage": training.zero_stage},
        # RMSprop (the paper's optimizer) is a client optimizer DeepSpeed has not tested.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if training.zero_stage == 3:
        generated["zero_optimization"].update(
            {"stage3_gather_16bit_weights_on_model_save": True, "overlap_comm": False}
        )
    if bf16 and training.zero_stage <= 1:
        # ZeRO-0 + bf16 would be DeepSpeed's FP16_UnfusedOptimizer: gradients summed over the
        # accumulation micro-batches in bf16, and no fp32 master weights left to export.
        # ZeRO-1 with fp32 accumulation is its BF16_Optimizer (ZeRO-0 refuses that mix); on
        # one rank ZeRO-1 partitions nothing.
        generated["zero_optimization"]["stage"] = 1
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    elif bf16 and training.accumulation_steps() > 1:
        # ZeRO-2/3 sum the micro-batches' gradients into their partitions in the gradient
        # dtype unless told otherwise (DeepSpeed 0.19.8 honours this at every stage).
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(generated, training.deepspeed or {})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _may_change_on_resume(section: type[BaseModel]) -> set[str]:
    return {
        name
        for name, field in section.model_fields.items()
        if field.json_schema_extra is MAY_CHANGE_ON_RESUME
    }


# (section, field) of the fields marked MAY_CHANGE_ON_RESUME: they are not part of cache keys.
RESULT_NEUTRAL_FIELDS = {
    (section, name)
    for section, field in SpinConfig.model_fields.items()
    for name in _may_change_on_resume(field.annotation)
}


def result_changing_differences(old: SpinConfig, new: SpinConfig) -> list[str]:
    """Dotted names of fields whose change would change a run's results."""
    differences = []
    old_dump, new_dump = old.model_dump(mode="json"), new.model_dump(mode="json")
    for section, fields in new_dump.items():
        for name, value in fields.items():
            if (section, name) in RESULT_NEUTRAL_FIELDS:
                continue
            if old_dump.get(section, {}).get(name) != value:
                differences.append(f"{section}.{name}")
    return differences
