"""Stopping work that runs in helper threads when the run is interrupted.

Ctrl-C (SIGINT) and SIGTERM reach only a process's main thread. Generation workers that
run as threads (one per device, `generation.num_workers` > 1 under Prefect) would go on
to the end of their shards while the main thread waits for them, so an interrupted run
would stop only when the whole generation step is done. Each worker runs inside a
`Workers` group (`Workers.run`); the main thread calls `Workers.stop()` as it unwinds,
and the group's threads, which call `check()` between batches, stop there by raising
`Interrupted`. Finished shards are kept (written atomically), so a rerun resumes from
them. Threads outside a group never stop here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Interrupted(KeyboardInterrupt):
    """Raised in a worker thread once its group was told to stop."""


_group_of: dict[int, Workers] = {}  # thread ident → the group it works for now


class Workers:
    """Threads that do one step's work together and stop together."""

    def __init__(self):
        self.stopped = threading.Event()

    def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """fn(item) in this thread, as a member of the group (a pool thread is reused)."""
        ident = threading.get_ident()
        _group_of[ident] = self
        try:
            return fn(item)
        finally:
            _group_of.pop(ident, None)

    def stop(self) -> None:
        self.stopped.set()


def check() -> None:
    """In a worker thread: raise `Interrupted` when its group was told to stop."""
    group = _group_of.get(threading.get_ident())
    if group is not None and group.stopped.is_set():
        raise Interrupted("the run was interrupted")
