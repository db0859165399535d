"""One training rank: `python -m spin_core.training.rank ARGS.json` (started by spin_core.training.launch).

ARGS.json is `{"config": <the config as a plain dict>, "job": <TrainJob.to_json()>}`, so a
launched rank trains exactly as the in-process one does. Rank 0 prints every step record
on a line of its own, prefixed with `SPIN_STEP `, for the launching task to log and report
as progress.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from spin_core.config import SpinConfig
from spin_core.training.job import TrainJob
from spin_core.training.launch import STEP_PREFIX
from spin_core.training.train import run_rank


def main(args_file: str) -> None:
    args = json.loads(Path(args_file).read_text())
    cfg = SpinConfig.model_validate(args["config"])

    def on_step(record: dict) -> None:
        # One write for the whole line: spin's children run unbuffered, where print() writes the
        # text and its newline separately and another rank's output can land between the two.
        sys.stdout.write(STEP_PREFIX + json.dumps(record) + "\n")
        sys.stdout.flush()

    run_rank(cfg, TrainJob.from_json(args["job"]), on_step=on_step)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1])
