"""Shard claims: generation workers take shards as they go, and a dead worker's are taken over.

A worker claims shard k by creating `.part-0000k.claim` exclusively (O_EXCL) with its
host, pid and the process's start time in it, and removes the claim once the shard is
written. A claim is stale, and taken over, when its owner is gone: on this host, no
process with that pid and start time (so a reused pid is not mistaken for the owner); on
another host, no heartbeat (the owner touches its claim every HEARTBEAT_SECONDS) for
STALE_SECONDS. Taking over renames the stale claim aside first, so of two workers that
both found it stale exactly one wins. The names start with a dot, so the run directory's
fingerprints and completeness checks ignore them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def claim_path(shards_dir: Path, index: int) -> Path:
    return Path(shards_dir) / f".part-{index:05d}.claim"


def owner_alive(record: dict, claim: Path) -> bool:
    """Whether the claim's owner still works on it (see the module docstring)."""
    if record.get("host") == socket.gethostname():
        return record.get("start") is not None and _start_time(record["pid"]) == record["start"]
    try:
        return time.time() - claim.stat().st_mtime < STALE_SECONDS
    except FileNotFoundError:
        return False


def try_claim(shards_dir: Path, index: int) -> bool:
    """Claim shard `index` for this process; False when a live worker holds it."""
    path = claim_path(shards_dir, index)
    for _ in range(2):  # a second try after taking over a stale claim
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                record = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                record = {}  # being written, or half-written by a killed worker
                if time.time() - _mtime(path) < 5:
                    return False
            if record and owner_alive(record, path):
                return False
            try:  # only one of the workers that found it stale renames it
                os.rename(path, path.with_name(f"{path.name}.stale-{os.getpid()}"))
            except FileNotFoundError:
                return False
            path.with_name(f"{path.name}.stale-{os.getpid()}").unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(owner_record(), handle)
        return True
    return False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def release(shards_dir: Path, index: int) -> None:
    claim_path(shards_dir, index).unlink(missing_ok=True)


def claimed_shards(
    shards_dir: Path, indices: list[int], done: Callable[[int], bool]
) -> Iterator[int]:
    """The shards of `indices` this worker takes, one at a time, each claimed first.

    A shard that is complete (`done`) or held by a live worker is skipped. While the
    caller works on a shard a heartbeat thread touches its claim; the claim is released
    when the caller asks for the next one (or stops).
    """
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    for index in indices:
        if done(index) or not try_claim(shards_dir, index):
            continue
        if done(index):  # finished by its previous owner just before the claim
            release(shards_dir, index)
            continue
        beating = threading.Event()
        heart = threading.Thread(
            target=_heartbeat, args=(claim_path(shards_dir, index), beating), daemon=True
        )
        heart.start()
        try:
            yield index
        finally:
            beating.set()
            release(shards_dir, index)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            os.utime(path)
        except FileNotFoundError:
            return
