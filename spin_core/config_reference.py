"""The config reference table of the README, generated from the config's own fields (their
type, default, bounds, description and the "may change on resume" mark), so it cannot
drift: `python -m spin_core.config_reference` prints it; tests/pipeline/test_docs.py
keeps the README equal to it."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from spin_core.config import MAY_CHANGE_ON_RESUME, SpinConfig


def _reference_rows(prefix: str, model: type[BaseModel]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = str(field.annotation).replace("typing.", "").replace("<class '", "")
        annotation = annotation.replace("'>", "").replace("spin_core.config.", "")
        default = field.default_factory() if field.default_factory else field.default
        bounds = [
            f"{symbol} {getattr(m, attr)}"
            for m in field.metadata
            for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
            if getattr(m, attr, None) is not None
        ]
        description = field.description + (f" ({', '.join(bounds)})" if bounds else "")
        if field.json_schema_extra is MAY_CHANGE_ON_RESUME:
            description += "; *may change on resume*"
        rows.append(
            f"| `{prefix}{name}` | {annotation.replace('|', chr(92) + '|')} | "
            f"`{json_default(default)}` | {description} |"
        )
        nested = [a for a in getattr(field.annotation, "__args__", ()) if is_section(a)]
        for section in nested:  # an optional sub-section (training.lora): its fields too
            rows += _reference_rows(f"{prefix}{name}.", section)
    return rows


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def reference_markdown() -> str:
    """The config reference table (README), generated from the model so it cannot drift."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for section_name, section_field in SpinConfig.model_fields.items():
        lines += _reference_rows(f"{section_name}.", section_field.annotation)
    return "\n".join(lines)


def json_default(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


if __name__ == "__main__":
    print(reference_markdown())
