"""What a step body sees of Prefect (`spin_core.step.Context`): the run logger,
progress and table artifacts, and worker fan-out as mapped tasks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from prefect import get_run_logger, task, unmapped
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from spin_core import interrupt


class Progress:
    """A Prefect progress artifact (0–100 %) updated from a spin_core callback: at most
    one update per UPDATE_SECONDS (an API call each, made from the step's own thread),
    and always the last."""

    UPDATE_SECONDS = 2.0

    def __init__(self, key: str, description: str):
        self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
        self.last = 0.0
        self.last_time = time.monotonic()

    def update(self, done: float, total: float) -> None:
        percent = 100.0 * done / max(total, 1)
        now = time.monotonic()
        due = percent - self.last >= 5 and now - self.last_time >= self.UPDATE_SECONDS
        if due or (done >= total and percent > self.last):
            update_progress_artifact(artifact_id=self.artifact_id, progress=percent)
            self.last, self.last_time = percent, now


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
        """fn(item) for each item. One item runs here, in this thread, where Ctrl-C stops
        it at once; several run concurrently, one task run each (one device each), and
        stop at their next batch when this thread is interrupted (spin_core/interrupt.py)."""
        items = list(items)
        if len(items) == 1:
            return [fn(items[0])]
        workers = interrupt.Workers()
        futures = _worker.with_options(name=name).map(unmapped(partial(workers.run, fn)), items)
        try:
            # Polled, not waited on: a SIGINT the kernel delivered to a worker thread sets
            # Python's flag without waking a wait on a lock, and an interrupt raised inside
            # a lock's wait leaves it broken; a sleep wakes and raises cleanly.
            while not all(f.wrapped_future.done() for f in futures):
                time.sleep(0.2)
            return futures.result()  # raises the first failure
        except BaseException:
            workers.stop()  # they stop at their next batch, so the task runner need not wait
            raise

    def table(self, key: str, rows: list[dict], description: str) -> None:
        create_table_artifact(table=rows, key=key, description=description)

    def markdown(self, key: str, text: str, description: str) -> None:
        create_markdown_artifact(markdown=text, key=key, description=description)
