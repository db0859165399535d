"""Prefect servers: the one `spin serve` starts, and the temporary one made to die with `spin`.

`prefect_api()` gives `spin serve` an API to register with: PREFECT_API_URL, or a
server it starts on 127.0.0.1 and stops on exit.

Without PREFECT_API_URL, Prefect runs flows against a temporary server: a uvicorn
child process it stops on a clean exit. A `spin` killed with SIGKILL (the OOM
killer, a timeout, `kill -9`) runs no cleanup, and that child used to live on,
re-parented to init. `die_with_parent()` makes Prefect start it under a small
watchdog that exits the server as soon as its parent is gone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(
    port: int, env: dict | None = None, log: Path | None = None, start_timeout: float = 120
) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1:`port`; yields its API URL once /health answers.

    env: the server's environment (its PREFECT_HOME); log: where its output goes
    (discarded without one). The server is stopped on exit.
    """
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    with open(log or os.devnull, "w") as output:
        server = subprocess.Popen(
            [*command, "--port", str(port)], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + start_timeout
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log else ""
                raise RuntimeError(f"the Prefect server on port {port} did not start\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextmanager
def prefect_api(start_timeout: float = 120) -> Iterator[str]:
    """The Prefect API to register with: PREFECT_API_URL, else a local server started here.

    The local server listens on 127.0.0.1 at PREFECT_SERVER_API_PORT (4200 by default),
    keeps its database in PREFECT_HOME, and is stopped on exit; one already answering
    on that port is used as it is.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_API_PORT, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = PREFECT_SERVER_API_PORT.value()
    url = f"http://127.0.0.1:{port}/api"
    with contextlib.ExitStack() as stack:
        if not _healthy(url):
            stack.enter_context(prefect_server(port, start_timeout=start_timeout))
        print(f"Prefect UI at {url.removesuffix('/api')}", flush=True)
        os.environ["PREFECT_API_URL"] = url  # for the flow-run processes this one starts
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
