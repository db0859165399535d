"""GPU memory between the pipeline's GPU steps.

Generation, evaluation and (on one GPU) training run one after another in the
flow process. PyTorch keeps the memory of freed tensors in its caching
allocator, where the next step's vLLM engine cannot see it and its start-up
free-memory check fails; models held in reference cycles are freed only when the
cyclic collector happens to run. So a step drops its model and calls
`release_memory()` when it is done.
"""

from __future__ import annotations

import gc

import torch


def release_memory() -> None:
    """Collect unreachable objects (models in reference cycles), then hand PyTorch's
    cached CUDA blocks back to the driver (a no-op where CUDA never started)."""
    gc.collect()
    torch.cuda.empty_cache()
