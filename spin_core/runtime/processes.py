"""Child processes that die with the run: started, streamed line by line, stopped.

Two shapes:
- `run_group`: one command in a process group of its own (the training launcher and its
  ranks), stopped as a group;
- `Children`: several workers in the run's own process group (generation workers), so a
  Ctrl-C or SIGTERM sent to the group reaches them directly, read from one thread that
  stays interruptible.

Either way a child gets SIGTERM from the kernel when its parent dies, even by kill -9
(PR_SET_PDEATHSIG, set in the child itself by `DIE_WITH_PARENT`, since preexec_fn is
unsafe with threads).
"""

from __future__ import annotations

import collections
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# "[rank1]: FileNotFoundError: ..." or "ValueError: ...", not a launcher's own summary.
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(?!torch\.distributed)[\w.]*(Error|Exception): ")

# Exec'd in front of a child: the kernel sends it SIGTERM when its parent dies.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "if os.getppid() == 1:\n"
    "    sys.exit(143)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


class LaunchError(RuntimeError):
    """A child process group failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of a child that runs spin's code (training ranks, generation workers):
    this one, quiet, unbuffered, and this checkout importable, also under another interpreter
    (`python -m spin_core....`)."""
    env = os.environ | {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    return env


def _popen(command: list[str], env: dict[str, str] | None, new_session: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DIE_WITH_PARENT, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=env,
        start_new_session=new_session,
    )


def _wait_gone(alive: Callable[[], bool], grace: float) -> bool:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive():
            return True
        time.sleep(0.1)
    return not alive()


def terminate_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""

    def alive() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_gone(alive, grace):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _failure(what: str, code: int, last: collections.deque, first_error: str | None) -> str:
    cause = f": {first_error.split(':', 1)[-1].strip()}" if first_error else ""
    return f"{what} failed (exit code {code}){cause}\nlast output:\n" + "\n".join(last)


def run_group(
    command: list[str],
    *,
    on_line: Callable[[str], None],
    env: dict[str, str] | None = None,
    tail: int = 40,
    what: str = "training ranks",
) -> None:
    """Run `command` in its own process group, passing each output line to `on_line`.

    Raises LaunchError (with the last `tail` lines) when it exits non-zero; any
    exception while waiting stops the whole group first.
    """
    proc = _popen(command, env, new_session=True)
    last = collections.deque(maxlen=tail)
    first_error = None  # the first exception a rank printed: the root cause, usually
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            last.append(line)
            if first_error is None and EXCEPTION_LINE.match(line):
                first_error = line
            on_line(line)
        code = proc.wait()
    except BaseException:
        terminate_group(proc.pid)
        proc.wait()
        raise
    terminate_group(proc.pid, grace=2.0)  # ranks that outlived the launcher
    if code != 0:
        raise LaunchError(_failure(f"{what} (launcher)", code, last, first_error))


@dataclass
class Child:
    """One worker process of `Children`: its slot, its process and what it printed last."""

    slot: int
    proc: subprocess.Popen
    last: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    first_error: str | None = None

    def failure(self) -> str:
        return _failure(f"worker {self.slot}", self.proc.returncode, self.last, self.first_error)


class Children:
    """Worker processes in this process's group, their output merged into one stream.

    `start(slot, command, env)` starts one; `events()` yields (child, line) for every line
    a child prints and (child, None) when it exits, in the caller's thread (reader threads
    only queue lines), so the caller can react and stays interruptible. Leaving the `with`
    block stops whatever still runs: SIGTERM, then SIGKILL after `grace` seconds.
    """

    def __init__(self, grace: float = 10.0):
        self.grace = grace
        self.running: dict[int, Child] = {}
        self._queue: queue.Queue = queue.Queue()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, slot: int, command: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(slot, _popen(command, env, new_session=False))
        self.running[slot] = child
        threading.Thread(target=self._read, args=(child,), daemon=True).start()
        return child

    def _read(self, child: Child) -> None:
        for line in child.proc.stdout:
            self._queue.put((child, line.rstrip("\n")))
        child.proc.wait()
        self._queue.put((child, None))

    def events(self):
        while self.running:
            try:
                child, line = self._queue.get(timeout=0.2)  # a timeout keeps Ctrl-C prompt
            except queue.Empty:
                continue
            if line is None:
                self.running.pop(child.slot, None)
            else:
                child.last.append(line)
                if child.first_error is None and EXCEPTION_LINE.match(line):
                    child.first_error = line
            yield child, line

    def stop(self) -> None:
        procs = [c.proc for c in self.running.values() if c.proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        if not _wait_gone(lambda: any(p.poll() is None for p in procs), self.grace):
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        for proc in procs:
            proc.wait()
        self.running.clear()
