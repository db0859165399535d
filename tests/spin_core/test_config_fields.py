"""Every config field is read by the code: a field nothing reads is a setting that does nothing."""

from __future__ import annotations

import ast
from pathlib import Path

from spin_core.config import SpinConfig
from spin_core.config_reference import is_section

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("spin_core", "tasks", "flows")
# How code names a config section it was handed (`config.training`, `cfg`, `settings`...).
SECTION_NAMES = {"cfg", "config", "settings", "spec", "decoding", "self"}


def _config_fields(model: type, section: str):
    for name, field in model.model_fields.items():
        yield section, name
        for annotation in getattr(field.annotation, "__args__", ()) or (field.annotation,):
            if is_section(annotation):  # a sub-section (training.lora, eval.lm_eval)
                yield from _config_fields(annotation, name)


def _attribute_reads() -> set[tuple[str, str]]:
    """(receiver's last name, attribute) of every attribute read in the package."""
    reads = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    reads.add((ast.unparse(node.value).split(".")[-1], node.attr))
    return reads


def test_every_config_field_is_read_somewhere():
    reads = _attribute_reads()
    unread = [
        f"{section}.{name}"
        for top, field in SpinConfig.model_fields.items()
        for section, name in _config_fields(field.annotation, top)
        if not any((receiver, name) in reads for receiver in {section, *SECTION_NAMES})
    ]
    assert not unread, f"config fields that no code reads: {unread}"
