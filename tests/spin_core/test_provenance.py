"""Provenance: versions, the generator and model fingerprints recorded with every result."""

from __future__ import annotations

import importlib.metadata

from spin_core.storage import provenance


def test_fingerprint_follows_the_weights_not_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "SMALL_FILE", 1024)  # exercise the large-file rule
    monkeypatch.setattr(provenance, "EDGE_BYTES", 256)
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama"}')
        (d / "model.safetensors").write_bytes(bytes(range(256)) * 20)
    assert provenance.model_fingerprint(a) == provenance.model_fingerprint(b)
    weights = bytearray((b / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # the last byte of a large file
    (b / "model.safetensors").write_bytes(bytes(weights))
    assert provenance.model_fingerprint(a) != provenance.model_fingerprint(b)
    (b / "model.safetensors").write_bytes(bytes(range(256)) * 20)
    (b / "config.json").write_text('{"model_type": "mistral"}')
    assert provenance.model_fingerprint(a) != provenance.model_fingerprint(b)
    assert provenance.model_fingerprint("org/hub-name") is None


def test_record_names_the_versions_and_the_generator(tmp_path):
    fields = provenance.record("hf", str(tmp_path))
    version = importlib.metadata.version
    assert fields["torch_version"] == version("torch")
    assert fields["deepspeed_version"] == version("deepspeed")
    assert fields["generation_backend"] == f"hf (transformers {version('transformers')})"
    assert len(fields["model_fingerprint"]) == 16
