"""What produced a result: library versions, the generator, and model-directory fingerprints.

Users of the official SPIN code could not reproduce its numbers until they knew which
model revision and which generator wrote the data. Every evaluated model's metrics.json
(and so metrics.parquet and the report) carries these fields.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

EDGE_BYTES = 1 << 20  # of a large file, its size and first and last MiB are fingerprinted
SMALL_FILE = 64 << 20


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_fingerprint(model_dir: str | Path) -> str | None:
    """A short SHA-256 of a model directory: small files whole, weight files by size and
    their first and last MiB (fast on 7B shards, and it changes when the weights do)."""
    root = Path(model_dir)
    if not root.is_dir():
        return None  # a hub name: model.revision pins it
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}:{size}".encode())
        with open(path, "rb") as handle:
            if size <= SMALL_FILE:
                digest.update(handle.read())
            else:
                digest.update(handle.read(EDGE_BYTES))
                handle.seek(size - EDGE_BYTES)
                digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def environment(generation_backend: str) -> dict:
    """Versions of what computes a result, and the generation backend with its version."""
    backend_package = {"hf": "transformers", "vllm": "vllm"}[generation_backend]
    return {
        "python_version": platform.python_version(),
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "deepspeed_version": _version("deepspeed"),
        "generation_backend": f"{generation_backend} ({backend_package} "
        f"{_version(backend_package)})",
    }


def record(generation_backend: str, model: str) -> dict:
    """The provenance fields of one evaluated model. The opponent that trained θ(t+1) is
    θt, whose fingerprint is in θt's own row."""
    return environment(generation_backend) | {"model_fingerprint": model_fingerprint(model)}
