"""What a step body sees of Prefect (`spin_core.step.Context`): the run logger,
progress and table artifacts, and worker fan-out as mapped tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prefect import get_run_logger, task, unmapped
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE


class Progress:
    """A Prefect progress artifact (0–100 %) updated from a spin_core callback."""

    def __init__(self, key: str, description: str):
        self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
        self.last = 0.0

    def update(self, done: float, total: float) -> None:
        percent = 100.0 * done / max(total, 1)
        if percent - self.last >= 5 or done >= total:  # a few dozen updates, not thousands
            update_progress_artifact(artifact_id=self.artifact_id, progress=percent)
            self.last = percent


@task(name="worker", cache_policy=NO_CACHE)
def _worker(fn: Callable[[Any], Any], item: Any) -> Any:
    """One share of a step's work (a generation worker's shards), as its own task run."""
    return fn(item)


class PrefectContext:
    """The context of a step running as a Prefect task."""

    def __init__(self):
        self.log = get_run_logger()

    def progress(self, key: str, description: str) -> Progress:
        return Progress(key, description)

    def map(self, fn: Callable[[Any], Any], items: Iterable, name: str) -> list:
        # One task run per item (per generation worker, one device each), run concurrently.
        tasks = _worker.with_options(name=name)
        return tasks.map(unmapped(fn), list(items)).result()  # raises the first failure

    def table(self, key: str, rows: list[dict], description: str) -> None:
        create_table_artifact(table=rows, key=key, description=description)

    def markdown(self, key: str, text: str, description: str) -> None:
        create_markdown_artifact(markdown=text, key=key, description=description)
