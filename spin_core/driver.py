"""The pipeline without an orchestrator: the same steps, run in turn in this process.

    from spin_core import driver
    from spin_core.config import load_config

    report = driver.run(load_config("configs/demo.yaml"), "runs/plain")

This is what `spin run` does without Prefect: the same step definitions
(`spin_core/steps.py`) in the same order (`spin_core/pipeline.py`), the same run
directory, journal and resume (a step whose outputs are complete is loaded, not
rerun), the same collapse / retry / stop policy. Nothing is cached beyond the outputs themselves, there is no UI, and
generation workers run one after the other. The benchmarks use it as the
Prefect-free reference; a notebook can use it to step through an iteration.
"""

from __future__ import annotations

import logging
from typing import Any

from spin_core import pipeline
from spin_core.config import SpinConfig
from spin_core.console import announce
from spin_core.errors import retryable
from spin_core.execution import Context, PlainContext, Step, execute


class PlainRunner:
    """Runs each step in this process (`spin_core.execution.execute`), retrying transient failures."""

    def __init__(self, ctx: Context | None = None):
        self.ctx = ctx or PlainContext()
        self.log = self.ctx.log

    def step(self, step: Step, *args, **kwargs) -> Any:
        params = step.params(*args, **kwargs)
        with announce(step.name, params, complete=step.complete(params)):
            for attempt in range(step.retries + 1):
                try:
                    return execute(step, self.ctx, params)
                except Exception as error:
                    if attempt == step.retries or not retryable(error):
                        raise
                    self.log.warning("%s failed (%r); retrying", step.name, error)

    def iteration(self, *args, **kwargs) -> dict:
        """One iteration in this process (`pipeline.run_iteration`'s arguments after the runner)."""
        return pipeline.run_iteration(self, *args, **kwargs)


def run(config: SpinConfig, run_dir: str, log: logging.Logger | None = None) -> str:
    """All iterations of `config` in `run_dir` (resuming what is there); returns report.md."""
    return pipeline.run_pipeline(PlainRunner(PlainContext(log)), config, run_dir)
