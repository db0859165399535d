"""vLLM generation backend (`generation.backend: vllm`, install with `pip install 'spin[vllm]'`).

The same interface as `HFBackend`: it takes the prompt token ids that
`spin_core.prompts.encode_prompt` made (so the prompt the opponent answers is the
token sequence training scores), and returns text, finish reason and the exact
token ids per row, in input order. Only responses come from vLLM: the
log-probabilities used for training are always recomputed by `spin_core.score`
with the training forward pass, never taken from vLLM.

The engine takes `generation.gpu_memory_utilization` of the GPU and gives it back
in `close()`, which `spin_core.generation.generate_from_model` calls once the
shards are written: on one GPU, training starts next in the same process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from spin_core.checkpoint import compute_dtype
from spin_core.config import SpinConfig
from spin_core.generation.decoding import Decoding, Generated


class VLLMBackend:
    """Offline `vllm.LLM` over prompt token ids; tensor parallel size from the config."""

    def __init__(self, model_path: str, tokenizer, decoding: Decoding, cfg: SpinConfig):
        import vllm  # an ImportError here becomes a config error in make_backend

        self.vllm = vllm
        self.tokenizer, self.decoding = tokenizer, decoding
        dtype = compute_dtype(cfg.model.precision)
        self.llm = vllm.LLM(
            model=model_path,
            tokenizer=model_path,
            tensor_parallel_size=cfg.generation.tensor_parallel_size,
            dtype="bfloat16" if dtype.is_floating_point and dtype.itemsize == 2 else "float32",
            seed=decoding.seed,
            trust_remote_code=cfg.model.trust_remote_code,
            gpu_memory_utilization=cfg.generation.gpu_memory_utilization,
        )

    def _params(self, seed: int | None):
        decoding = self.decoding
        return self.vllm.SamplingParams(
            temperature=decoding.temperature if decoding.do_sample else 0.0,
            top_p=decoding.top_p if decoding.do_sample else 1.0,
            max_tokens=decoding.max_new_tokens,
            seed=seed,
            stop_token_ids=[self.tokenizer.eos_token_id],
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
        results = [generated_from_vllm(o.outputs[0], self.tokenizer) for o in outputs]
        if progress is not None:
            progress(len(prompt_ids))
        return results

    def close(self) -> None:
        """Stop the engine and give its GPU memory back (the vLLM maintainers' recipe:
        drop the engine, then `cleanup_dist_env_and_memory`); a second call does nothing.
        Callers then run `spin_core.generation.release_memory()`."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(engine_core, "shutdown", None)):
            engine_core.shutdown()  # V1: the EngineCore process holds the GPU memory
        del llm, engine_core
        with contextlib.suppress(ImportError):
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()  # also gc.collect() and torch.cuda.empty_cache()


def generated_from_vllm(completion, tokenizer) -> Generated:
    """A vLLM completion as a `Generated`: its token ids as produced, EOS last when it stopped.

    vLLM may leave the stop token out of `token_ids`; it is put back for a
    completion that stopped, since training scores log p(EOS | response) exactly
    when the opponent generated it, and never for one cut at max_tokens.
    """
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return Generated.from_ids(ids, tokenizer)  # cuts after the first EOS
