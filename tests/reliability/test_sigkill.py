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


def test_sigkill_of_the_process_running_generation_workers_stops_them(
    toy_config, toy_build, tmp_path
):
    """kill -9 leaves no cleanup to run: the workers get SIGTERM from the kernel instead
    (PR_SET_PDEATHSIG), and a rerun finishes with the shards written before it kept."""
    import pandas as pd

    from spin_core.generation import shard_path
    from spin_core.prompts import encode_pairs
    from spin_core.storage.models import load_tokenizer

    heldout = pd.read_parquet(toy_build.eval_path).head(160)
    prompts = pd.DataFrame(
        {
            "id": [f"q{i:03d}" for i in range(len(heldout))],
            "prompt": heldout["messages"].map(lambda m: m[0]["content"]),
            "real": heldout["messages"].map(lambda m: m[1]["content"]),
        }
    )
    prompts["prompt_ids"], prompts["real_ids"] = encode_pairs(
        load_tokenizer(str(toy_build.model_dir)), prompts, 64
    )
    prompts.to_parquet(tmp_path / "prompts.parquet")
    config = toy_config.model_copy(deep=True)
    config.generation.num_workers, config.generation.shard_size = 2, 4
    (tmp_path / "config.json").write_text(config.model_dump_json())
    shards = tmp_path / "generated"
    command = [sys.executable, "-m", "tests.drive_generation", str(tmp_path / "config.json")]
    command += [str(toy_build.model_dir), str(tmp_path / "prompts.parquet"), str(shards)]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not shard_path(shards, 0).exists():
        assert driver.poll() is None and time.monotonic() < deadline, "no shard was written"
        time.sleep(0.05)
    workers = psutil.Process(driver.pid).children(recursive=True)
    assert len(workers) == 2
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("part-*.parquet")}
    total = -(-len(prompts) // 4)
    assert 0 < len(kept) < total
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert len(list(shards.glob("part-*.parquet"))) == total
    for name, mtime in kept.items():
        assert (shards / name).stat().st_mtime_ns == mtime
