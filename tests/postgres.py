"""A throwaway PostgreSQL server on 127.0.0.1 for the tests that run Prefect as a team does.

Prefect's self-hosting guide recommends PostgreSQL for a server with several workers; the
deployment tests run their Prefect server on one (README "Scaling out"). The server is the
machine's own PostgreSQL (Debian's package, found as `pg_ctl`), started in a temporary
directory with trust authentication on 127.0.0.1 only, and removed afterwards. PostgreSQL
refuses to run as root, so under root it runs as the package's `postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spin_core.runtime.processes import free_port


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _run_as() -> str | None:
    """The user the server runs as: this one, or `postgres` under root; None if there is none."""
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid()).pw_name
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return None


def unavailable() -> str | None:
    """Why no PostgreSQL can be started here, or None."""
    if _bin_dir() is None:
        return "PostgreSQL is not installed (no pg_ctl; `make setup` installs it as root)"
    if _run_as() is None:
        return "running as root and there is no `postgres` user to run PostgreSQL as"
    return None


@contextmanager
def postgres_database(name: str = "prefect") -> Iterator[str]:
    """A fresh server with database `name`; yields its SQLAlchemy URL for Prefect
    (postgresql+asyncpg://spin@127.0.0.1:PORT/NAME). Stopped and deleted on exit."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    bin_dir, user = _bin_dir(), _run_as()
    owner = pwd.getpwnam(user)
    root = Path(tempfile.mkdtemp(prefix="spin-postgres-"))  # under /tmp: the user can reach it
    os.chown(root, owner.pw_uid, owner.pw_gid)
    data, log, port = root / "data", root / "server.log", free_port()

    def run(*command: str) -> None:
        subprocess.run(
            [str(bin_dir / command[0]), *command[1:]],
            check=True,
            capture_output=True,
            user=owner.pw_uid if os.getuid() == 0 else None,
            group=owner.pw_gid if os.getuid() == 0 else None,
            cwd=root,
        )

    try:
        run("initdb", "-D", str(data), "-U", "spin", "--auth=trust", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        run("pg_ctl", "start", "-D", str(data), "-l", str(log), "-w", "-t", "120", "-o", options)
        try:
            run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "spin", name)
            yield f"postgresql+asyncpg://spin@127.0.0.1:{port}/{name}"
        finally:
            run("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w")
    finally:
        shutil.rmtree(root, ignore_errors=True)
