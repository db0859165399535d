"""Scaling: generation and training time at 1×, 2× and 4× the number of prompts.

One SPIN iteration's steps on the toy θ0, the pipeline's own step definitions
(spin_core/steps.py) run by the plain driver: sample (load the SFT data, draw the
prompts and tokenize them once), generate (shards, merged), build D_t (identical
pairs dropped, on the ids), train one epoch (the engine scores the pairs with
θt's weights before its first step; that scoring is also reported on its own,
as "score (in train)"). Each step's time should grow linearly with the prompts: a
growth exponent (log2 of the time ratio per doubling) near 1, none clearly above
it. Fixed costs (loading the model, starting DeepSpeed) make small sizes look
sublinear; loading the SFT data (inside sample) is a fixed cost too.

    python -m benchmarks.bench_scaling     # 512, 1024, 2048 prompts
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import _common
from spin_core import steps
from spin_core.driver import PlainRunner
from spin_core.step import PlainContext

SCALES = (1, 2, 4)
BASE, QUICK_BASE = 512, 64
STEPS = ("sample", "generate", "build", "train")
MAX_EXPONENT = 1.15  # above this a step grows faster than linearly (with noise margin)


class _StepClock(PlainContext):
    """The plain driver's context, with the end of each optimizer step handed to `phases`."""

    def __init__(self, phases: _common.TrainPhases):
        super().__init__()
        self.phases = phases

    def progress(self, key: str, description: str):
        phases = self.phases

        class Clock:
            def update(self, done: float, total: float) -> None:
                if key.startswith("train-"):
                    phases.on_step({"step": done})

        return Clock()


def one_iteration(num_prompts: int, out_dir: Path) -> dict:
    """Seconds of each step of one iteration on `num_prompts` toy prompts."""
    cfg = _common.toy_config(
        [
            f"data.num_prompts={num_prompts}",
            "training.num_epochs=1",
            "training.save_steps=100000",
            "training.eval_steps=0",
            f"generation.shard_size={max(num_prompts // 4, 1)}",
        ]
    )
    run_dir, opponent = str(out_dir), str(cfg.model.name_or_path)
    phases = _common.TrainPhases()
    runner = PlainRunner(_StepClock(phases))
    runner.step(steps.check_inputs, cfg, run_dir)  # loads the data once (warm file cache)
    seconds = {}
    with _common.Timer() as timer:
        runner.step(steps.sample_prompts, cfg, run_dir, 0)
    seconds["sample"] = timer.wall
    with _common.Timer() as timer:
        runner.step(steps.generate_responses, cfg, run_dir, 0, opponent)
    seconds["generate"] = timer.wall
    with _common.Timer() as timer:
        counts = runner.step(steps.build_training_set, cfg, run_dir, 0)
    seconds["build"] = timer.wall
    with phases.timing():
        runner.step(steps.train_policy, cfg, run_dir, 0, opponent)
    split = phases.split()
    seconds["train"] = split["total"]
    return {
        "pairs": counts["train_pairs"],
        "steps": len(phases.step_ends),
        "seconds": seconds,
        "score": split["scoring"],
    }
