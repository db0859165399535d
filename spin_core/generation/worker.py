"""One generation worker process: `python -m spin_core.generation.worker ARGS.json SLOT`.

Started by `spin_core.generation.workers.run_workers`, one per device (its GPUs in
`CUDA_VISIBLE_DEVICES`, or its CPU cores in `SPIN_CPU_CORES`). It loads its own engine (HF
or vLLM), claims shards until none is left to take, writes each atomically, and prints
`SPIN_ROWS n` after every n rows for the parent's progress bar. It may run under another
interpreter than the flow's (`generation.python`: a virtualenv with vLLM), so it imports
only the generation modules and their light dependencies.

SIGTERM (the parent stopping it, or the kernel when the parent died) ends it through
`finally` blocks, so a vLLM engine core is shut down rather than orphaned.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(143)


def main(args_file: str, slot: int) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from spin_core.runtime.devices import pin_to_assigned_cores

    pin_to_assigned_cores()
    import pandas as pd

    from spin_core.config import SpinConfig
    from spin_core.generation.shards import generate_from_model
    from spin_core.generation.workers import ROWS_PREFIX

    args = json.loads(Path(args_file).read_text())
    cfg = SpinConfig.model_validate(args["config"])
    prompts = pd.read_parquet(args["prompts"])

    def on_rows(rows: int) -> None:
        print(f"{ROWS_PREFIX}{rows}", flush=True)

    generate_from_model(args["opponent"], cfg, prompts, args["shards_dir"], on_rows=on_rows)
    logging.getLogger("spin").info("generation worker %d: no shard left to take", slot)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1], int(sys.argv[2]))
