"""`spin` killed with SIGKILL leaves no process of the run behind (Prefect's server included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.overrides import overrides, set_args

pytestmark = pytest.mark.slow


def test_sigkill_of_spin_leaves_no_process_behind(toy_build, tmp_path):
    command = [sys.executable, "-m", "flows.cli", "run", "configs/demo.yaml"]
    command += ["--run-dir", str(tmp_path / "run")]
    command += set_args(overrides(toy_build))
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)  # Prefect's temporary server, started by spin itself
    log = (tmp_path / "spin.log").open("w")
    spin = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        server = []
        while not server:  # wait until the temporary server runs
            assert spin.poll() is None, (tmp_path / "spin.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the temporary server did not start"
            children = psutil.Process(spin.pid).children(recursive=True)
            server = [p for p in children if "uvicorn" in " ".join(p.cmdline())]
            time.sleep(0.5)
        survivors = psutil.Process(spin.pid).children(recursive=True)
        os.kill(spin.pid, signal.SIGKILL)
        spin.wait()
        gone, alive = psutil.wait_procs(survivors, timeout=20)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    finally:
        try:
            os.killpg(spin.pid, signal.SIGKILL)  # whatever the test itself left
        except ProcessLookupError:
            pass
