"""`python -m tests.drive_generation CONFIG.json MODEL PROMPTS SHARDS`: generation of one
iteration as the pipeline's step runs it (`spin_core.generation.generate`), in a process of
its own, for the tests that signal its whole process group."""

from __future__ import annotations

import json
import sys

from spin_core.config import SpinConfig
from spin_core.generation import generate

if __name__ == "__main__":
    config_file, model, prompts, shards = sys.argv[1:5]
    config = SpinConfig.model_validate(json.loads(open(config_file).read()))
    generate(model, config, prompts, shards, on_log=lambda line: print(line, flush=True))
    print("generation done", flush=True)
