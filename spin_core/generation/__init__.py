"""Generation: the opponent θt writes a response to every prompt.

- `decoding`: the decoding settings, one response (`Generated`), the backend
  interface, and token-budget batching (shared with scoring and evaluation);
- `hf`: the Hugging Face backend (`generate` for sampling, a cached greedy decoder);
- `vllm`: the vLLM backend (`generation.backend: vllm`);
- `shards`: batched generation into resumable Parquet shards, split over workers;
- `memory`: `release_memory()`, run after each GPU step in the flow process.
"""

from spin_core.generation.decoding import (
    Decoding,
    Generated,
    GenerationBackend,
    token_budget_batches,
)
from spin_core.generation.hf import HFBackend, decode, greedy_decode, shard_generator
from spin_core.generation.memory import release_memory
from spin_core.generation.shards import (
    check_backend_available,
    generate_from_model,
    generate_shards,
    make_backend,
    merge_shards,
    shard_path,
    worker_shards,
)

__all__ = [
    "Decoding",
    "Generated",
    "GenerationBackend",
    "HFBackend",
    "check_backend_available",
    "decode",
    "generate_from_model",
    "generate_shards",
    "greedy_decode",
    "make_backend",
    "merge_shards",
    "release_memory",
    "shard_generator",
    "shard_path",
    "token_budget_batches",
    "worker_shards",
]
