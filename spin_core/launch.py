"""Multi-rank training as a child process group: launch, stream, fail, cancel.

With `training.num_processes > 1` (or a hostfile) training runs as a DeepSpeed
job: `torchrun` on one node, the `deepspeed` launcher with a hostfile on several.
The launcher starts in its own session (process group), so stopping it stops
every rank:

- the caller's exception (a cancelled flow run, Ctrl-C, SIGTERM turned into an
  exception) ends the wait and the whole group is terminated, then killed;
- if the caller dies without running any cleanup (kill -9), the launcher gets
  SIGTERM from the kernel (PR_SET_PDEATHSIG) and terminates its ranks;
- a rank that fails makes the launcher exit non-zero; the error carries the last
  lines the ranks printed.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from spin_core.config import TrainingConfig

STEP_PREFIX = "SPIN_STEP "  # rank 0 prints each step record after this prefix

# "[rank1]: FileNotFoundError: ..." or "ValueError: ...", not the launcher's own summary.
_EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(?!torch\.distributed)[\w.]*(Error|Exception): ")


class LaunchError(RuntimeError):
    """The training ranks failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Exec'd in front of the launcher: the kernel sends it SIGTERM when spin dies, even by
# kill -9 (set in the child itself, since preexec_fn is unsafe with threads).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "if os.getppid() == 1:\n"
    "    sys.exit(143)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def launcher_command(training: TrainingConfig, args_file: Path) -> list[str]:
    """torchrun on one node; the deepspeed launcher across the hosts of a hostfile."""
    module = ["-m", "spin_core.train_entry", str(args_file)]
    if training.hostfile:
        per_node = training.num_processes // training.num_nodes
        return [
            "deepspeed",
            "--hostfile",
            training.hostfile,
            "--num_nodes",
            str(training.num_nodes),
            "--num_gpus",
            str(per_node),
            "--master_port",
            str(free_port()),
            "--module",
            *module[1:],
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(training.num_processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *module,
    ]


def terminate_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_group(
    command: list[str],
    *,
    on_line: Callable[[str], None],
    env: dict[str, str] | None = None,
    tail: int = 40,
) -> None:
    """Run `command` in its own process group, passing each output line to `on_line`.

    Raises LaunchError (with the last `tail` lines) when it exits non-zero; any
    exception while waiting stops the whole group first.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _DIE_WITH_PARENT, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=env,
        start_new_session=True,
    )
    last = collections.deque(maxlen=tail)
    first_error = None  # the first exception a rank printed: the root cause, usually
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            last.append(line)
            if first_error is None and _EXCEPTION_LINE.match(line):
                first_error = line
            on_line(line)
        code = proc.wait()
    except BaseException:
        terminate_group(proc.pid)
        proc.wait()
        raise
    terminate_group(proc.pid, grace=2.0)  # ranks that outlived the launcher
    if code != 0:
        cause = f": {first_error.split(':', 1)[-1].strip()}" if first_error else ""
        raise LaunchError(
            f"training ranks failed (launcher exit code {code}){cause}\n"
            + "last output:\n"
            + "\n".join(last)
        )


def launch_training(
    training_args: dict,
    training: TrainingConfig,
    *,
    on_step: Callable[[dict], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> None:
    """Run `spin_core.train_entry` with `training_args` on `training.num_processes` ranks."""
    state_dir = Path(training_args["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", prefix=".launch-", dir=state_dir, delete=False
    ) as handle:
        json.dump(training_args, handle)
        args_file = Path(handle.name)
    env = os.environ | {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))

    def route(line: str) -> None:
        at = line.find(STEP_PREFIX)  # the launcher may prefix rank output ("[rank0]:")
        if at >= 0:
            if on_step is not None:
                on_step(json.loads(line[at + len(STEP_PREFIX) :]))
        elif on_log is not None and line.strip():
            on_log(line)

    try:
        run_group(launcher_command(training, args_file), on_line=route, env=env)
    finally:
        args_file.unlink(missing_ok=True)
