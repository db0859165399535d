"""Prefect's temporary server, made to die with the `spin` process that started it.

Without PREFECT_API_URL, Prefect runs flows against a temporary server: a uvicorn
child process it stops on a clean exit. A `spin` killed with SIGKILL (the OOM
killer, a timeout, `kill -9`) runs no cleanup, and that child used to live on,
re-parented to init. `die_with_parent()` makes Prefect start it under a small
watchdog that exits the server as soon as its parent is gone.
"""

from __future__ import annotations

import subprocess

# Runs `python -m uvicorn ARGS` in this process with a thread that ends it when the
# parent process dies (its parent pid changes). Polling, not PR_SET_PDEATHSIG: that
# signal follows the thread that forked, and Prefect may start the server from any thread.
WATCHDOG = (
    "import os, runpy, sys, threading, time\n"
    "parent = os.getppid()\n"
    "def watch():\n"
    "    while os.getppid() == parent:\n"
    "        time.sleep(0.5)\n"
    "    os._exit(143)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "sys.argv = ['uvicorn', *sys.argv[3:]]\n"  # argv: ['-c', '-m', 'uvicorn', ARGS...]
    "runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)\n"
)


class _SubprocessDyingWithParent:
    """prefect.server.api.server's view of `subprocess`: its uvicorn child gets the watchdog."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args, **kwargs):  # noqa: N802 (subprocess's name)
        if list(args[1:3]) == ["-m", "uvicorn"]:
            args = [args[0], "-c", WATCHDOG, *args[1:]]
        return subprocess.Popen(args, **kwargs)


def die_with_parent() -> None:
    """Start Prefect's temporary server (from now on) under the parent-death watchdog."""
    from prefect.server.api import server

    server.subprocess = _SubprocessDyingWithParent()
