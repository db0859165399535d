"""Worker threads of one group stop at their next check once the group is told to stop;
other threads, and the main thread, never stop there."""

from __future__ import annotations

import threading
import time

import pytest

from spin_core import interrupt


def _batches(log: list, name: str, n: int = 200) -> str:
    for _ in range(n):  # 200 batches of 10 ms
        interrupt.check()
        time.sleep(0.01)
    log.append(name)
    return name


def test_a_stopped_group_stops_its_threads_and_no_other():
    group, finished, raised = interrupt.Workers(), [], []

    def member(name):
        try:
            group.run(lambda item: _batches(finished, item), name)
        except interrupt.Interrupted:
            raised.append(name)

    threads = [threading.Thread(target=member, args=(f"w{k}",)) for k in range(2)]
    outsider = threading.Thread(target=_batches, args=(finished, "outsider", 50))
    for thread in [*threads, outsider]:
        thread.start()
    time.sleep(0.2)
    group.stop()
    started = time.monotonic()
    for thread in [*threads, outsider]:
        thread.join(timeout=10)
    assert time.monotonic() - started < 1.5  # not the 2 s the workers had left
    assert sorted(raised) == ["w0", "w1"] and finished == ["outsider"]
    # A reused pool thread is no longer in the group once its share is done.
    assert group.run(lambda item: item, "again") == "again"
    interrupt.check()  # the main thread: never raises


def test_interrupted_is_a_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt):
        raise interrupt.Interrupted("stop")
