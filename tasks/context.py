"""What a step body sees of Prefect (`spin_core.execution.Context`): the run logger, and
progress and table artifacts."""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)


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


class PrefectContext:
    """The context of a step running as a Prefect task."""

    def __init__(self):
        self.log = get_run_logger()

    def progress(self, key: str, description: str) -> Progress:
        return Progress(key, description)

    def table(self, key: str, rows: list[dict], description: str) -> None:
        create_table_artifact(table=rows, key=key, description=description)

    def markdown(self, key: str, text: str, description: str) -> None:
        create_markdown_artifact(markdown=text, key=key, description=description)

    def phase(self, name: str, event: str) -> None:
        pass
