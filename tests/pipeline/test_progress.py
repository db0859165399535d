"""Progress artifacts in the Prefect UI: each update is an API call made from the step's own
thread, so a fast loop (thousands of scored sequences) must not make one per item."""

from __future__ import annotations

from tasks import context


def test_progress_updates_at_most_every_two_seconds_and_always_at_the_end(monkeypatch):
    sent: list[float] = []
    now = [0.0]
    monkeypatch.setattr(context, "create_progress_artifact", lambda **kwargs: "artifact-id")
    monkeypatch.setattr(
        context, "update_progress_artifact", lambda artifact_id, progress: sent.append(progress)
    )
    monkeypatch.setattr(context.time, "monotonic", lambda: now[0])
    progress = context.Progress("score", "scoring")
    for done in range(1, 1001):  # 1,000 items over 5 s
        now[0] = done * 0.005
        progress.update(done, 1000)
    # One update per 2 s (at 2 s and 4 s) and the last: not one per 5 % (20), nor per item.
    assert sent == [40.0, 80.0, 100.0]
    progress.update(1000, 1000)  # a repeated end sends nothing more
    assert sent == [40.0, 80.0, 100.0]
