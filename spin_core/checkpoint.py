"""Loading models and tokenizers, and writing Hugging Face model directories.

A model is a directory (config, safetensors weights, tokenizer, generation
config); every directory written here appears atomically: it is built under a
temporary name and renamed, so a directory that exists is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from spin_core.config import ModelConfig
from spin_core.errors import InputError
from spin_core.generation.decoding import stop_token_ids
from spin_core.prompts import ensure_pad_token

logger = logging.getLogger(__name__)
T = TypeVar("T")


def compute_dtype(precision: str) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU for 'auto' (docs/DESIGN.md §4)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# What NCCL, the backend on GPUs, can reduce: it has no bool or complex type.
COLLECTIVE_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; every collective of spin goes through here.

    It must be on this rank's `device()` in a dtype NCCL reduces: NCCL rejects a CPU
    tensor ("No backend type associated with device type cpu"), which gloo on a CPU
    would accept, so the check stops on a CPU what would break only on GPUs.
    """
    import torch.distributed as dist

    if tensor.device != device() or tensor.dtype not in COLLECTIVE_DTYPES:
        raise RuntimeError(
            f"a collective got a {tensor.dtype} tensor on {tensor.device}; expected it on "
            f"{device()} in one of {[str(d).removeprefix('torch.') for d in COLLECTIVE_DTYPES]}"
        )
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank0_decides(read: Callable[[], T]) -> T:
    """What `read()` returns on rank 0, on every rank (it must pickle); only rank 0 reads.

    Ranks on several nodes can see different states of a shared filesystem (NFS caches
    attributes for up to a minute), so a decision read from files there (which checkpoint to
    resume, whether the pairs are scored) is taken on rank 0 alone and sent to the others.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return read()
    box = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device())  # NCCL sends from the GPU
    return box[0]


def _looks_local(name_or_path: str) -> bool:
    # Hub names are "name" or "org/name"; anything else is meant as a local path.
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


# What a pinned hub snapshot fetches: configs, safetensors weights, tokenizer files; never
# pickled weights (.bin, .pt), which loading would unpickle.
SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def pinned_model(name_or_path: str, revision: str | None) -> str:
    """θ0 at the hub commit `revision`: the local snapshot directory every later load
    reads, so one commit is loaded everywhere. Local directories are returned as they are."""
    if revision is None or Path(name_or_path).expanduser().exists() or _looks_local(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, revision=revision, allow_patterns=SNAPSHOT_FILES)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo or revision: all "cannot"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"model.revision: cannot get {name_or_path} at revision {revision}: {first}"
        ) from None


def check_model_path(name_or_path: str, field: str = "model.name_or_path") -> None:
    """Refuse a local model path that does not exist or holds no model config."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(
                f"{field}: {name_or_path} has no config.json (expected an HF model directory)"
            )
        return
    if _looks_local(name_or_path):
        raise InputError(f"{field}: model directory {name_or_path} does not exist")


def check_causal_lm(
    name_or_path: str, *, trust_remote_code: bool = False, field: str = "model.name_or_path"
) -> None:
    """Refuse, before any heavy work, a model whose config has no causal-LM class."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    check_model_path(name_or_path, field)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{field}: cannot read the model config of {name_or_path}: {exc}".splitlines()[0]
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(
        config, "auto_map", {}
    ).get("AutoModelForCausalLM"):
        raise InputError(
            f"{field}: {name_or_path} is a {config.model_type!r} model, not a causal "
            "language model (expected a config that AutoModelForCausalLM can load)"
        )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model, left-padded for generation, with a pad token."""
    check_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"model.name_or_path: cannot load a tokenizer from {name_or_path}: {exc}"
        ) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """A causal LM from a directory or hub name; InputError when it is not one.

    torch's default dtype is the same afterwards, whatever happened: from_pretrained sets it
    to `dtype` while it builds the model, and code run later in this process (lm-eval, a
    tokenizer's tensors) would otherwise make bf16 tensors without asking for them.
    """
    check_model_path(name_or_path)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    default_dtype = torch.get_default_dtype()
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except ValueError as exc:
        # transformers raises ValueError for a config class that has no causal-LM head.
        raise InputError(
            f"model.name_or_path: {name_or_path} is not a causal language model ({exc})".splitlines()[
                0
            ]
        ) from None
    except OSError as exc:
        raise InputError(
            f"model.name_or_path: cannot load {name_or_path}: {exc}".splitlines()[0]
        ) from None
    finally:
        torch.set_default_dtype(default_dtype)
    return model


def load_policy(
    path: str,
    model_cfg: ModelConfig,
    *,
    for_training: bool = False,
    on_device: torch.device | None = None,
):
    """Model and tokenizer of `path` in the configured compute dtype, on this rank's device
    (or `on_device`)."""
    tokenizer = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
    # Training keeps fp32 master weights; DeepSpeed casts to bf16 when enabled.
    dtype = torch.float32 if for_training else compute_dtype(model_cfg.precision)
    model = load_model(
        path,
        dtype=dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=model_cfg.attn_implementation,
    )
    if not for_training:
        model.to(on_device or device()).eval()
    return model, tokenizer


def replace_dir(tmp: Path, final: Path) -> Path:
    """Move a finished directory into place (an older copy is removed first)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_model_dir(
    model, tokenizer, out_dir: str | Path, *, state_dict: dict | None = None
) -> Path:
    """Write an HF model directory (safetensors) atomically; returns its path."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    generation_config = getattr(model, "generation_config", None) or GenerationConfig()
    # Every EOS id the model stops at is kept (Llama-3: <|end_of_text|> and <|eot_id|>).
    stops = stop_token_ids(generation_config, tokenizer)
    generation_config.eos_token_id = stops[0] if len(stops) == 1 else list(stops)
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.save_pretrained(tmp)
    return replace_dir(tmp, out_dir)


def is_model_dir(path: str | Path) -> bool:
    """True when `path` is a complete model directory written by `save_model_dir`."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
