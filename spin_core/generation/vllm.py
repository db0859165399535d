"""vLLM generation backend (`generation.backend: vllm`, install with `pip install 'spin[vllm]'`).

The same interface as `HFBackend`: it takes the prompt token ids that
`spin_core.prompts.encode_prompt` made (so the prompt the opponent answers is the
token sequence training scores), and returns text, finish reason and the exact
token ids per row, in input order. Only responses come from vLLM: the
log-probabilities used for training are always recomputed by `spin_core.score`
with the training forward pass, never taken from vLLM.

It runs only in a generation worker process (`spin_core/generation/worker.py`), never in
the flow process: its engine takes `generation.gpu_memory_utilization` of the worker's
GPU, and the memory returns when the worker exits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from spin_core.config import SpinConfig
from spin_core.generation.decoding import Decoding, Generated, stop_token_ids
from spin_core.runtime.devices import compute_dtype

CPU_KV_CACHE_GIB = 4.0  # vLLM's own default for VLLM_CPU_KVCACHE_SPACE


def kv_cache_bytes(gib: float | None) -> int | None:
    """The KV cache of one engine: `gib`; unset, None on a GPU (vLLM sizes it from
    gpu_memory_utilization) and VLLM_CPU_KVCACHE_SPACE or 4 GiB on a CPU. On a CPU vLLM
    otherwise refuses to start unless gpu_memory_utilization of the machine's memory is
    free, which two engines side by side never have."""
    import torch

    if gib is None and not torch.cuda.is_available():
        gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or CPU_KV_CACHE_GIB)
    return None if gib is None else int(gib * 2**30)


class VLLMBackend:
    """Offline `vllm.LLM` over prompt token ids; tensor parallel size from the config."""

    def __init__(self, model_path: str, tokenizer, decoding: Decoding, cfg: SpinConfig):
        import vllm  # an ImportError here becomes a config error in make_backend

        self.vllm = vllm
        self.tokenizer, self.decoding = tokenizer, decoding
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json
            generation_config = None
        self.stop_ids = stop_token_ids(generation_config, tokenizer)
        dtype = compute_dtype(cfg.model.precision)
        self.llm = vllm.LLM(
            model=model_path,
            tokenizer=model_path,
            tensor_parallel_size=cfg.generation.tensor_parallel_size,
            dtype="bfloat16" if dtype.is_floating_point and dtype.itemsize == 2 else "float32",
            seed=decoding.seed,
            trust_remote_code=cfg.model.trust_remote_code,
            gpu_memory_utilization=cfg.generation.gpu_memory_utilization,
            # Room for the longest prompt and response; vLLM plans its KV cache for it.
            max_model_len=cfg.training.max_prompt_length + decoding.max_new_tokens,
            enforce_eager=cfg.generation.vllm_eager,
            kv_cache_memory_bytes=kv_cache_bytes(cfg.generation.kv_cache_gib),
        )

    def _params(self, seed: int | None):
        decoding = self.decoding
        return self.vllm.SamplingParams(
            temperature=decoding.temperature if decoding.do_sample else 0.0,
            top_p=decoding.top_p if decoding.do_sample else 1.0,
            max_tokens=decoding.max_new_tokens,
            seed=seed,
            stop_token_ids=list(self.stop_ids),
            skip_special_tokens=True,
        )

    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        progress: Callable[[int], None] | None = None,
        first_row: int = 0,
    ) -> list[Generated]:
        # Plain ints: ids read from Parquet are numpy scalars, which vLLM's msgspec
        # transport to its engine process refuses.
        prompts = [
            self.vllm.TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompt_ids
        ]
        # One seed per request (seed + run-wide row index): one shared seed would make
        # every prompt draw from the same random stream, correlating the negatives.
        params = [
            self._params(self.decoding.seed + first_row + i if self.decoding.do_sample else None)
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = [
            generated_from_vllm(o.outputs[0], self.tokenizer, self.stop_ids) for o in outputs
        ]
        if progress is not None:
            progress(len(prompt_ids))
        return results

    def close(self) -> None:
        """Stop the engine: its EngineCore process holds the model and the KV cache. The
        worker process exits next, which gives back whatever is left; nothing here touches
        torch.distributed (vLLM's `cleanup_dist_env_and_memory` would destroy the calling
        process's process group). A second call does nothing."""
        llm = self.__dict__.pop("llm", None)
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(engine_core, "shutdown", None)):
            engine_core.shutdown()


def generated_from_vllm(completion, tokenizer, stop_ids=()) -> Generated:
    """A vLLM completion as a `Generated`: its token ids as produced, the stop token last
    when it stopped.

    vLLM may leave the stop token out of `token_ids`; it is put back for a completion that
    stopped (the one vLLM names in `stop_reason`, else EOS), since training scores
    log p(EOS | response) exactly when the opponent generated it, and never for one cut at
    max_tokens or one that already ends with a stop token.
    """
    stops = set(stop_ids) | {tokenizer.eos_token_id}
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and not (ids and ids[-1] in stops):
        stop_reason = getattr(completion, "stop_reason", None)
        ids.append(stop_reason if isinstance(stop_reason, int) else tokenizer.eos_token_id)
    return Generated.from_ids(ids, tokenizer, stops)  # cuts after the first stop token
