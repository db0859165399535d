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

from spin_core.runtime.processes import DIE_WITH_PARENT, free_port

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


class TemporaryServer:
    """The Prefect API a `spin run` uses when none is configured, started in the background.

    What Prefect's own temporary server is (uvicorn on 127.0.0.1, no UI, the database in
    PREFECT_HOME), with three differences: it starts at once, before Prefect is even
    imported here, so its start-up (seconds) overlaps the input checks; it runs in its own
    session, so the SIGINT a terminal sends to its foreground process group (Ctrl-C) or a
    service manager's SIGTERM to the group reach `spin` only, which then stops the server
    after its own cleanup (a server killed first left `spin` retrying a dead API); and the
    parent-death watchdog ends it if `spin` is killed (WATCHDOG).
    """

    def __init__(self, port: int | None = None):
        import importlib.util

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        origin = importlib.util.find_spec("prefect").origin  # found, not imported
        env = os.environ | {
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-c", WATCHDOG, "-m", "uvicorn"]
        command += ["--app-dir", str(Path(origin).parent.parent), "--factory"]
        command += ["prefect.server.api.server:create_app", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(command, env=env, start_new_session=True)

    def wait_healthy(self, timeout: float = 120) -> str:
        """Block until /health answers; the API URL."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the temporary Prefect server on port {self.port} did not start"
                )
            time.sleep(0.1)
        return self.url

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)  # SQLite survives a kill: no need to wait longer
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def api_for_run() -> Iterator[TemporaryServer | None]:
    """PREFECT_API_URL when it is set (a running `spin serve`, a shared server), else a
    TemporaryServer started now and stopped on exit; PREFECT_API_URL points at it inside."""
    if os.environ.get("PREFECT_API_URL") or _configured_api():
        yield None
        return
    served = served_api()
    if served:  # a `spin serve` of this PREFECT_HOME: no server to start, runs show in its UI
        os.environ["PREFECT_API_URL"] = served
        try:
            yield None
        finally:
            _drain_prefect_workers()
            os.environ.pop("PREFECT_API_URL", None)
        return
    server = TemporaryServer()
    os.environ["PREFECT_API_URL"] = server.url  # read when Prefect is first imported
    try:
        yield server
    finally:
        _drain_prefect_workers()  # the last logs and events reach the server before it stops
        server.stop()
        os.environ.pop("PREFECT_API_URL", None)


@contextmanager
def ready_for_flows(server: TemporaryServer | None) -> Iterator[None]:
    """Run flows against `server` (api_for_run's): once it answers, and with its settings.

    With a TemporaryServer: no flow-run heartbeats. Heartbeats let a long-lived server
    mark a run whose process died as crashed; a temporary server dies with that process,
    so nothing would read them, while every flow's exit waits up to 1 s for the heartbeat
    thread to wake (Prefect's flow engine): about 1 s per iteration of a small run.
    """
    if server is None:
        yield
        return
    server.wait_healthy()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _served_file() -> Path:
    return Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser() / "spin-serve.json"


def served_api() -> str | None:
    """The API URL of a live `spin serve` of this PREFECT_HOME that answers, else None."""
    import json

    try:
        record = json.loads(_served_file().read_text())
        os.kill(int(record["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record["url"] if _healthy(record["url"]) else None


@contextmanager
def announce_served(url: str) -> Iterator[None]:
    """Let `spin run` find this `spin serve`'s API (PREFECT_HOME/spin-serve.json) while it serves."""
    import json

    path = _served_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "url": url}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _configured_api() -> str | None:
    """PREFECT_API_URL of Prefect's settings in this process, when Prefect is already loaded
    (a test harness, a profile); never imports Prefect for the question."""
    if "prefect.settings" not in sys.modules:
        return _profile_api()
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _profile_api() -> str | None:
    """PREFECT_API_URL of the active Prefect profile (`prefect config set`), read as Prefect
    reads it: $PREFECT_PROFILES_PATH or $PREFECT_HOME/profiles.toml, $PREFECT_PROFILE."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def _drain_prefect_workers(timeout: float = 3) -> None:
    if "prefect.logging.handlers" not in sys.modules:
        return  # Prefect was never used: nothing queued
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


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
    port: int,
    env: dict | None = None,
    log: Path | None = None,
    start_timeout: float = 120,
    host: str = "127.0.0.1",
) -> Iterator[str]:
    """`prefect server start` on `host`:`port`; yields its API URL on this machine once
    /health answers.

    env: the server's environment (its PREFECT_HOME); log: where its output goes
    (discarded without one). The server is stopped on exit.
    """
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host]
    with open(log or os.devnull, "w") as output:
        # Its own session: a Ctrl-C or SIGTERM to the terminal's process group stops the
        # serving process first, which then stops this server (not the other way round).
        # And a SIGTERM from the kernel when this process dies without cleanup (kill -9, the
        # OOM killer), which a server in its own session would otherwise outlive.
        server = subprocess.Popen(
            [sys.executable, "-c", DIE_WITH_PARENT, *command, "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
AUTH_VARIABLE = (
    "PREFECT_SERVER_API_AUTH_STRING"  # the server's; clients use PREFECT_API_AUTH_STRING
)


def check_serve_address(host: str | None, port: int | None, insecure: bool) -> None:
    """`spin serve --host/--port`: refused (InputError) before anything starts when they cannot
    apply (PREFECT_API_URL names a server elsewhere) or would open the API to the network with
    no credentials: anyone who reaches the port could then start runs, that is run code."""
    from prefect.settings import PREFECT_API_URL

    from spin_core.errors import InputError

    if (host or port) and PREFECT_API_URL.value():
        raise InputError(
            f"--host/--port: PREFECT_API_URL is set ({PREFECT_API_URL.value()}), so spin serve "
            "starts no server of its own; unset it or leave out --host and --port"
        )
    if host and host not in LOOPBACK and not os.environ.get(AUTH_VARIABLE) and not insecure:
        raise InputError(
            f"--host {host}: a server other machines can reach needs credentials: set "
            f"{AUTH_VARIABLE}=user:password (Prefect's Basic Authentication; workers and clients "
            "then set PREFECT_API_AUTH_STRING to the same), or pass --insecure"
        )


@contextmanager
def prefect_api(
    start_timeout: float = 120, host: str | None = None, port: int | None = None
) -> Iterator[str]:
    """The Prefect API to register with: PREFECT_API_URL, else a local server started here.

    The local server listens on `host` (127.0.0.1) at `port` (PREFECT_SERVER_API_PORT, 4200
    by default), keeps its database in PREFECT_HOME, and is stopped on exit; one already
    answering on that port is used as it is. With PREFECT_SERVER_API_AUTH_STRING set, this
    process and the flow runs it starts send the same credentials.
    """
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_SERVER_API_PORT,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = port or PREFECT_SERVER_API_PORT.value()
    url = f"http://127.0.0.1:{port}/api"
    updates = {PREFECT_API_URL: url}
    auth = os.environ.get(AUTH_VARIABLE)
    if auth and not PREFECT_API_AUTH_STRING.value():
        os.environ["PREFECT_API_AUTH_STRING"] = auth  # for the flow-run processes
        updates[PREFECT_API_AUTH_STRING] = auth
    with contextlib.ExitStack() as stack:
        if not _healthy(url):
            stack.enter_context(
                prefect_server(port, start_timeout=start_timeout, host=host or "127.0.0.1")
            )
        shown = url if host in (None, *LOOPBACK) else f"http://{_reachable(host)}:{port}/api"
        print(f"Prefect UI at {shown.removesuffix('/api')}", flush=True)
        os.environ["PREFECT_API_URL"] = url  # for the flow-run processes this one starts
        with temporary_settings(updates=updates):
            yield url


def _reachable(host: str) -> str:
    """The name other machines use for `host` (this machine's for a wildcard address)."""
    import socket

    return socket.getfqdn() if host in ("0.0.0.0", "::") else host
