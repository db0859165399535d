"""The vLLM side of bench_generate, run under the vLLM interpreter (`.venv-vllm/bin/python -m
benchmarks.vllm_side ARGS.json`): one engine on this process's cores (SPIN_CPU_CORES), warmed
up, then, once every engine of the measurement is ready (a file barrier), one timed
`generate` over its prompts' token ids. Prints one JSON line: tokens, seconds, the ids."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args_file", type=Path, help="what bench_generate writes for one engine")
    args = json.loads(parser.parse_args().args_file.read_text())
    from spin_core.runtime.devices import pin_to_assigned_cores

    pin_to_assigned_cores()
    from spin_core.config import SpinConfig
    from spin_core.generation.decoding import Decoding
    from spin_core.generation.vllm import VLLMBackend
    from spin_core.storage.models import load_tokenizer

    cfg = SpinConfig.model_validate(args["config"])
    tokenizer = load_tokenizer(args["model"])
    backend = VLLMBackend(
        args["model"], tokenizer, Decoding.from_config(cfg.generation, tokenizer), cfg
    )
    prompts = args["prompt_ids"]
    backend.generate(prompts[:2])  # warm-up
    barrier = Path(args["barrier"])
    (barrier / f"{args['name']}.ready").touch()
    while len(list(barrier.glob("*.ready"))) < args["engines"]:
        time.sleep(0.01)
    started = time.perf_counter()
    generated = backend.generate(prompts)
    seconds = time.perf_counter() - started
    backend.close()
    result = {
        "tokens": sum(g.num_tokens for g in generated),
        "seconds": seconds,
        "ids": [g.token_ids for g in generated],
    }
    print(json.dumps(result), flush=True)
