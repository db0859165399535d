"""The memory model's model-state figures against DeepSpeed's own estimators.

DeepSpeed ships `estimate_zero2_model_states_mem_needs_all_live` and
`estimate_zero3_model_states_mem_needs_all_live`: given a model they count its parameters
(tied ones once) and its largest layer, and print the GPU memory of the model states per
GPU for each offload option. Here they run on a small real Llama with tied embeddings and
grouped-query attention; the exact byte counts behind their printed table are recorded
(the table rounds to 0.01 GB) and compared with `spin_core.training.memory.estimate_memory` for the
same model, read from its config alone, for mixed-precision AdamW without offload.
"""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.zero import stage3, stage_1_and_2
from transformers import LlamaConfig, LlamaForCausalLM

from spin_core.training.memory import estimate_memory, model_shape

RANKS = 4


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    config = LlamaConfig(
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=3000,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("small-llama")
    config.save_pretrained(folder)
    torch.manual_seed(0)
    return folder, LlamaForCausalLM(config)


def _deepspeed_figures(module, function: str, model, capsys) -> list[tuple[dict, tuple]]:
    """(arguments, result) of every per-option estimate `function` makes for `model`."""
    calls = []
    exact = getattr(module, function.removesuffix("_all_live"))

    def recorded(**kwargs):
        result = exact(**kwargs)
        calls.append((kwargs, result))
        return result

    original = getattr(module, exact.__name__)
    setattr(module, exact.__name__, recorded)
    try:
        getattr(module, function)(model, num_gpus_per_node=RANKS)
    finally:
        setattr(module, exact.__name__, original)
    assert "per GPU" in capsys.readouterr().out  # the table DeepSpeed prints
    return calls


def _ours(folder, zero_stage: int):
    return estimate_memory(
        model_shape(str(folder)),
        num_processes=RANKS,
        zero_stage=zero_stage,
        bf16=True,
        optimizer="adamw",
        micro_batch_size=1,
        max_length=16,
        gradient_checkpointing=False,
    )


def test_the_shape_counts_what_deepspeed_counts(small_llama):
    folder, model = small_llama
    total, largest = stage3.model_to_params(model)
    shape = model_shape(str(folder))
    assert shape.parameters == total  # the tied embedding once
    assert shape.largest_module == largest  # the embedding (vocab × hidden)
    assert largest == 3000 * 96


def test_zero2_model_states_equal_deepspeeds_estimate(small_llama, capsys):
    """ZeRO-2: 2 B of bf16 weights per parameter on every rank, plus 18 B per parameter
    partitioned (bf16 gradient 2, fp32 gradient 4, fp32 master 4, Adam 8). Ours holds the
    fp32 gradient copy apart (it exists at the optimizer step only, after the activations
    are freed), so its states plus that copy must be DeepSpeed's figure."""
    folder, model = small_llama
    calls = _deepspeed_figures(
        stage_1_and_2, "estimate_zero2_model_states_mem_needs_all_live", model, capsys
    )
    ((_, (_, deepspeed_gpu)),) = [(k, r) for k, r in calls if not k["cpu_offload"]]
    ours = _ours(folder, 2)
    assert ours.states + ours.optimizer_step == pytest.approx(deepspeed_gpu, abs=1)


def test_zero3_model_states_against_deepspeeds_estimate(small_llama, capsys):
    """ZeRO-3: DeepSpeed's figure is 18 B per parameter partitioned plus 4 B per parameter of
    the largest layer (its allowance for a gathered layer). Ours partitions 2 + 2 + 4 + 8 B
    of states plus the 4 B fp32 gradient copy at the step: 20 B, because it also counts the
    partitioned bf16 gradient buffer that ZeRO-3 keeps between backward and the step
    (DeepSpeed's `grad_partitions_flat_buffer`), which the estimator leaves out; gathered
    layers are counted among the buffers, with the prefetch and reduce buckets."""
    folder, model = small_llama
    calls = _deepspeed_figures(
        stage3, "estimate_zero3_model_states_mem_needs_all_live", model, capsys
    )
    on_gpu = [r for k, r in calls if not k["cpu_offload"] and not k["cpu_offload_params"]]
    assert len(on_gpu) == 2 and on_gpu[0][1:] == on_gpu[1][1:]  # zero_init on, off: same GPU
    _, deepspeed_gpu, largest_layer_bytes = on_gpu[0]
    total, largest = stage3.model_to_params(model)
    assert largest_layer_bytes == 4 * largest
    deepspeed_states = deepspeed_gpu - largest_layer_bytes
    ours = _ours(folder, 3)
    bf16_gradient_partition = 2 * total / RANKS
    assert ours.states + ours.optimizer_step == pytest.approx(
        deepspeed_states + bf16_gradient_partition, abs=1
    )
