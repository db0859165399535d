"""Generation: the opponent θt writes a response to every prompt.

- `decoding`: the decoding settings, one response (`Generated`), the backend
  interface, and token-budget batching (shared with scoring and evaluation);
- `hf`: the Hugging Face backend (a cached decoder, greedy or sampled);
- `vllm`: the vLLM backend (`generation.backend: vllm`), used only in worker processes;
- `shards`: batched generation into resumable Parquet shards;
- `claims`: how workers take shards as they go, and a dead worker's shard is taken over;
- `workers`: one worker process per device (`worker` is its entry point).
"""

from spin_core.generation.decoding import (
    Decoding,
    Generated,
    GenerationBackend,
    stop_token_ids,
    token_budget_batches,
)
from spin_core.generation.hf import HFBackend, decode, greedy_decode, shard_generator
from spin_core.generation.shards import (
    generate_from_model,
    generate_shards,
    make_backend,
    merge_shards,
    missing_shards,
    shard_count,
    shard_path,
)
from spin_core.generation.workers import check_backend_available, generate, run_workers

__all__ = [
    "Decoding",
    "Generated",
    "GenerationBackend",
    "HFBackend",
    "check_backend_available",
    "decode",
    "generate",
    "generate_from_model",
    "generate_shards",
    "greedy_decode",
    "make_backend",
    "merge_shards",
    "missing_shards",
    "run_workers",
    "shard_count",
    "shard_generator",
    "shard_path",
    "stop_token_ids",
    "token_budget_batches",
]
