"""vLLM generation backend (`generation.backend: vllm`, install with `pip install 'spin[vllm]'`).

The same interface as `HFBackend`: it takes the prompt token ids that
`spin_core.prompts.encode_prompt` made (so the prompt the opponent answers is the
token sequence training scores), and returns text, finish reason and token count
per row, in input order. Only responses come from vLLM: the log-probabilities
used for training are always recomputed by `spin_core.score` with the training
forward pass, never taken from vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spin_core.checkpoint import compute_dtype
from spin_core.generate import Decoding, Generated


class VLLMBackend:
    """Offline `vllm.LLM` over prompt token ids; tensor parallel size from the config."""

    def __init__(self, model_path: str, tokenizer, decoding: Decoding, cfg):
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
        )
        self.params = vllm.SamplingParams(
            temperature=decoding.temperature if decoding.do_sample else 0.0,
            top_p=decoding.top_p if decoding.do_sample else 1.0,
            max_tokens=decoding.max_new_tokens,
            seed=decoding.seed if decoding.do_sample else None,
            stop_token_ids=[tokenizer.eos_token_id],
            skip_special_tokens=True,
        )

    def generate(
        self, prompt_ids: Sequence[list[int]], progress: Callable[[int], None] | None = None
    ) -> list[Generated]:
        prompts = [self.vllm.TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        results = []
        for output in outputs:  # vLLM returns outputs in input order
            completion = output.outputs[0]
            stopped = completion.finish_reason == "stop"
            token_ids = list(completion.token_ids)
            text_ids = [t for t in token_ids if t != self.tokenizer.eos_token_id]
            results.append(
                Generated(
                    text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                    finish_reason="stop" if stopped else "length",
                    # EOS counted, as HFBackend counts it (vLLM omits the stop token).
                    num_tokens=len(text_ids) + (1 if stopped else 0),
                )
            )
        if progress is not None:
            progress(len(prompt_ids))
        return results
