"""LoRA: θ(t+1) = θt + a trained adapter, exported merged as a plain model directory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from spin_core.training.export import with_adapter
from spin_core.training.train import train_iteration
from tests.spin_core.test_train import _config, toy_job, train_parquet  # noqa: F401 (fixture)

LORA = ["training.lora.r=4", "training.lora.alpha=8", "training.learning_rate=1e-2"]


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_only_the_adapter_is_trainable(toy_build):
    model = AutoModelForCausalLM.from_pretrained(toy_build.model_dir)
    cfg = _config(toy_build, *LORA)
    adapted = with_adapter(model, cfg.training.lora)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == set(cfg.training.lora.target_modules) & {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(toy_build, train_parquet, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lora")
    result = train_iteration(
        _config(toy_build, "training.num_epochs=1", "training.save_steps=3", *LORA),
        toy_job(toy_build, train_parquet, out / "state", out / "model"),
    )
    return out, result


def test_lora_export_is_theta_plus_the_adapter_merged(toy_build, lora_run):
    from peft import PeftModel

    out, result = lora_run
    log = _log(result.log_path)
    assert log[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # the adapter starts at 0
    base = AutoModelForCausalLM.from_pretrained(toy_build.model_dir).state_dict()
    merged_model = AutoModelForCausalLM.from_pretrained(out / "model")
    merged = merged_model.state_dict()
    assert not any("lora" in k for k in merged)  # a plain model directory
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.split(".")[-2].endswith("_proj") for k in changed)  # adapters only
    # base + adapter (PEFT, unmerged) computes what the merged export computes.
    with_lora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(toy_build.model_dir), out / "adapter"
    ).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged_model(ids).logits, with_lora(ids).logits, atol=1e-5, rtol=1e-5
        )


def test_an_interrupted_lora_iteration_resumes_with_the_same_losses(
    toy_build,
    train_parquet,  # noqa: F811
    lora_run,
    tmp_path,
):
    _, straight = lora_run
    cfg = _config(toy_build, "training.num_epochs=1", "training.save_steps=3", *LORA)
    job = toy_job(toy_build, train_parquet, tmp_path / "state", tmp_path / "model")
    stopped = train_iteration(cfg, job, stop_after_steps=3)
    assert stopped.model_dir is None
    resumed = train_iteration(cfg, job)
    assert resumed.resumed_from == 3
    for a, b in zip(_log(straight.log_path), _log(resumed.log_path), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)


@pytest.mark.slow
def test_lora_under_zero3_equals_lora_under_zero0(toy_build, train_parquet, lora_run, tmp_path):  # noqa: F811
    _, zero0 = lora_run
    zero3 = train_iteration(
        _config(
            toy_build,
            "training.num_epochs=1",
            "training.save_steps=3",
            "training.zero_stage=3",
            *LORA,
        ),
        toy_job(toy_build, train_parquet, tmp_path / "state", tmp_path / "model"),
    )
    for a, b in zip(_log(zero0.log_path), _log(zero3.log_path), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
