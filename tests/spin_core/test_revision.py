"""model.revision and data.revision pin what is loaded from the hub (reproducibility)."""

from __future__ import annotations

import pandas as pd
import pytest

from spin_core import data
from spin_core.config import DataConfig, SpinConfig
from spin_core.errors import InputError
from spin_core.storage.models import SNAPSHOT_FILES, pinned_model
from spin_core.storage.rundir import RunDir


def test_a_pinned_hub_model_is_loaded_from_its_revision_snapshot(monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo_id, *, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    cfg = SpinConfig.model_validate({"model": {"name_or_path": "org/model", "revision": "0123abc"}})
    assert RunDir(tmp_path / "run").base_model(cfg) == str(tmp_path / "snapshot")
    assert calls == [("org/model", "0123abc", SNAPSHOT_FILES)]
    assert not any("bin" in pattern or "pt" == pattern[-2:] for pattern in SNAPSHOT_FILES)
    unpinned = SpinConfig.model_validate({"model": {"name_or_path": "org/model"}})
    assert RunDir(tmp_path / "run").base_model(unpinned) == "org/model"
    assert pinned_model(str(tmp_path), "0123abc") == str(tmp_path)  # local: as it is
    assert len(calls) == 1


def test_an_unknown_revision_is_one_input_error_naming_the_field(monkeypatch):
    def snapshot_download(repo_id, **_):
        raise RuntimeError("Revision Not Found for url: https://huggingface.co/api/models/x\nmore")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    with pytest.raises(InputError, match=r"^model.revision: cannot get org/model at revision b"):
        pinned_model("org/model", "bad")


def test_data_revision_reaches_load_dataset(monkeypatch):
    import datasets

    seen = {}

    def load_dataset(source, *, split, revision):
        seen.update(source=source, split=split, revision=revision)
        frame = pd.DataFrame({"prompt": ["p1", "p2", "p3"], "real": ["r1", "r2", "r3"]})
        return datasets.Dataset.from_pandas(frame)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(
        dataset="org/chats",
        revision="fedcba9",
        prompt_column="prompt",
        response_column="real",
        eval_size=1,
        num_prompts=1,
    )
    train, heldout, _ = data.load_sft_data(cfg)
    assert seen == {"source": "org/chats", "split": "train_sft", "revision": "fedcba9"}
    assert len(train) + len(heldout) == 3
