"""θ(t+1) out of the engine: one Hugging Face directory in `training.export_dtype`, from the
optimizer's fp32 master weights (LoRA: the adapter merged into θt in fp32), with the
fraction of weights that changed from θt (`export.json` in train_state/)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from spin_core.config import LoraConfig, ModelConfig
from spin_core.runtime.devices import device
from spin_core.storage.files import write_json_atomic
from spin_core.storage.models import load_policy, save_model_dir

logger = logging.getLogger(__name__)

# Below this fraction of weights changed vs θt, the export is warned about: the update
# was (mostly) rounded away, e.g. a bf16 export at a small learning rate.
MIN_WEIGHTS_CHANGED = 0.01
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def with_adapter(model, lora: LoraConfig):
    """`model` with a fresh LoRA adapter on `lora.target_modules`; only the adapter trains."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_adapter(state_dict: dict, base: tuple[str, ModelConfig], lora: LoraConfig, adapter_dir):
    """θt + adapter as a plain model: the trained adapter (the fp32 master copies of its
    weights, `trained_state_dict`) is loaded onto a fresh fp32 copy of θt, saved to
    `adapter_dir`, and merged into the weights in fp32 (in bf16, a ΔW of ~1e-4 on weights
    of ~0.02 would be partly rounded away)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    init_model, model_cfg = base
    unset_hf_deepspeed_config()  # training is over: a whole θt, not a ZeRO-3 partition
    fresh, _ = load_policy(init_model, model_cfg, for_training=True)  # fp32, on the CPU
    peft_model = with_adapter(fresh, lora)
    missing, unexpected = peft_model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lora_" in k]:
        raise RuntimeError(f"adapter state does not match: {unexpected[:3]} {missing[:3]}")
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    return peft_model.merge_and_unload()


def export_model(
    engine,
    tokenizer,
    out_dir: Path,
    rank: int,
    zero_stage: int,
    dtype: torch.dtype,
    *,
    lora: LoraConfig | None = None,
    base: tuple[str, ModelConfig] | None = None,
    summary_path: Path | None = None,
    compute: torch.dtype | None = None,
) -> dict | None:
    """Write θ(t+1) as one HF directory in `dtype`, from the optimizer's fp32 master weights.

    With bf16 compute the module holds bf16 copies; an update smaller than half of bf16's
    spacing (lr 5e-7 on weights of 0.02, whose spacing is 1.2e-4) is in the fp32 master
    only, so exporting the module would drop it. With LoRA the adapter (fp32 master) is
    merged into θt's weights in fp32, so the next iteration, evaluation and vLLM see an
    ordinary model; the adapter alone is saved beside it, in `adapter/`.
    Ranks other than 0 return once the last tensor is assembled, before rank 0 writes.
    Returns on rank 0 (None elsewhere) the export summary, also written to
    `summary_path`: the dtype and `weights_changed`, the fraction of weight elements that
    differ from θt's as stored, also once rounded to the `compute` dtype; a warning says when
    it is below MIN_WEIGHTS_CHANGED.
    """
    module = engine.module.policy
    state_dict = trained_state_dict(engine, rank, zero_stage, trainable_only=lora is not None)
    summary = None
    if rank == 0:
        init_model = base[0] if base is not None else None
        if lora is not None:  # the adapter onto a fresh fp32 θt, merged there
            module = merge_adapter(state_dict, base, lora, Path(out_dir).parent / "adapter")
            state_dict = module.state_dict()
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        summary = export_summary(init_model, state_dict, dtype, compute or dtype)
        if summary_path is not None:
            write_json_atomic(summary, summary_path)  # before the model: a model has one
        module.config.use_cache = True
        module.config.dtype = dtype
        save_model_dir(module, tokenizer, out_dir, state_dict=state_dict)
    # No barrier: the other ranks would wait in it, within the collective timeout, for rank 0
    # to compare and write 28 GB (7B in fp32). The directory's atomic rename says the export
    # is complete, and the launcher returns once every rank has.
    return summary


def trained_state_dict(
    engine, rank: int, zero_stage: int, *, trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """θ(t+1)'s tensors on rank 0's host (an empty dict on the other ranks).

    A trained parameter comes from the optimizer's fp32 master copy
    (`safe_get_full_fp32_param`), anything else as the module holds it. Called on every
    rank in the same order: under ZeRO each assembly is a collective. One tensor at a
    time, so a GPU holds one whole parameter at once, and only rank 0 copies to the host
    (8 ranks would otherwise each hold the whole model in host memory).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module.policy
    copies: dict[int, torch.Tensor | None] = {}  # tied weights are assembled once
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        trained = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
        if trainable_only and not trained:
            continue
        if id(tensor) not in copies:
            master = safe_get_full_fp32_param(tensor) if trained else None
            if master is not None:
                copies[id(tensor)] = host_copy(master, rank)
            elif zero_stage == 3 and hasattr(tensor, "ds_id"):
                with deepspeed.zero.GatheredParameters([tensor]):
                    copies[id(tensor)] = host_copy(tensor, rank)
            else:
                copies[id(tensor)] = host_copy(tensor, rank)
        if rank == 0:
            out[name] = copies[id(tensor)]
    return out


def carry_fp32_masters(engine, init_model: str) -> int:
    """Seed the optimizer's fp32 master weights from θt's stored fp32 weights; the count set.

    In bf16 the engine's masters are built from the module's bf16 copy, so loading an fp32
    θt would round away the part of the last iteration's update below bf16's spacing (what
    the fp32 export kept). Each rank sets its own partition from the whole tensor, read one
    at a time (no collective). Weights stored in a lower precision are left as they are.
    """
    from deepspeed.utils import safe_set_full_fp32_param
    from safetensors import safe_open

    trained = {n: p for n, p in engine.module.policy.named_parameters() if p.requires_grad}
    carried = 0
    for path in _safetensors_files(init_model):
        with safe_open(str(path), framework="pt") as stored:
            for key in stored.keys():  # noqa: SIM118 - safe_open is not a dict
                param = trained.get(key)
                if param is None or stored.get_slice(key).get_dtype() != "F32":
                    continue
                safe_set_full_fp32_param(param, stored.get_tensor(key).to(device()))
                carried += 1
    return carried


def host_copy(tensor: torch.Tensor, rank: int) -> torch.Tensor | None:
    """A host copy of `tensor` on rank 0; None (no copy) on the others."""
    if rank != 0:
        return None
    return tensor.detach().to("cpu", copy=True)


def export_summary(
    init_model: str | None, state_dict: dict, dtype: torch.dtype, compute: torch.dtype
) -> dict:
    """The export's dtype and the fraction of its weights that differ from θt's (warned
    about when below MIN_WEIGHTS_CHANGED); None when θt's weights cannot be read.

    `weights_changed_as_computed` is that fraction once both are rounded to the compute dtype:
    what generation, evaluation and LoRA's frozen base see of the update (full fine-tuning
    carries the fp32 masters into the next iteration, `carry_fp32_masters`).
    """
    dtypes = (torch.float32,) if compute == dtype else (torch.float32, compute)
    fractions = weights_changed(init_model, state_dict, dtypes) if init_model else (None,)
    changed, as_computed = fractions[0], fractions[-1]
    if changed is not None and changed < MIN_WEIGHTS_CHANGED:
        logger.warning(
            "the exported model equals θt in %.2f%% of its weights: the update was mostly lost%s",
            100 * (1 - changed),
            " to bf16 rounding; set training.export_dtype=fp32 to keep it"
            if dtype == torch.bfloat16
            else " (learning rate too small for these steps?)",
        )
    return {
        "export_dtype": str(dtype).removeprefix("torch."),
        "weights_changed": changed,
        "compute_dtype": str(compute).removeprefix("torch."),
        "weights_changed_as_computed": as_computed,
    }


def _safetensors_files(init_model: str) -> list[Path]:
    path = Path(init_model).expanduser()
    if not path.is_dir():  # a hub name: the snapshot from_pretrained loaded
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(init_model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the fraction is then unknown
            return []
    return sorted(path.glob("*.safetensors"))


def weights_changed(
    init_model: str, state_dict: dict, rounded_to: tuple[torch.dtype, ...]
) -> tuple[float | None, ...]:
    """For each dtype of `rounded_to`, the fraction of the elements of `state_dict`'s
    floating tensors that differ from θt's tensors of the same name in `init_model`'s
    safetensors files, both rounded to that dtype; θt is read once, a tensor at a time."""
    from safetensors import safe_open

    changed, total = [0] * len(rounded_to), 0
    for path in _safetensors_files(init_model):
        with safe_open(str(path), framework="pt") as stored:
            for key in stored.keys():  # noqa: SIM118 - safe_open is not a dict
                new = state_dict.get(key)
                if new is None or not new.is_floating_point():
                    continue
                old = stored.get_tensor(key)
                if old.shape == new.shape:
                    for i, dtype in enumerate(rounded_to):
                        changed[i] += int((new.to(dtype) != old.to(dtype)).sum())
                    total += old.numel()
    return tuple(c / total if total else None for c in changed)
