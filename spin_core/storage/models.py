"""Loading models and tokenizers, and writing Hugging Face model directories.

A model is a directory (config, safetensors weights, tokenizer, generation
config); every directory written here appears atomically: it is built under a
temporary name and renamed, so a directory that exists is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from spin_core.config import ModelConfig
from spin_core.errors import InputError
from spin_core.generation.decoding import stop_token_ids
from spin_core.prompts import ensure_pad_token
from spin_core.runtime.devices import compute_dtype, device

logger = logging.getLogger(__name__)


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
