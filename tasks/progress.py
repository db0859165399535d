"""Progress reporting from spin_core callbacks into Prefect (logs and progress artifacts)."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact


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


def logger():
    return get_run_logger()
