"""Shard claims (a live owner's shard is left alone, a dead one's is taken over) and the
devices each generation worker process gets, with fake GPU lists."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from spin_core.generation import claims
from spin_core.runtime.devices import plan_workers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_workers_claim_is_respected_and_a_dead_ones_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        record = {
            "host": socket.gethostname(),
            "pid": live.pid,
            "start": claims._start_time(live.pid),
        }
        claims.claim_path(tmp_path, 0).write_text(json.dumps(record))
        assert not claims.try_claim(tmp_path, 0)  # its owner works on it
    finally:
        live.kill()
        live.wait()
    assert claims.try_claim(tmp_path, 0)  # the owner died: taken over
    mine = json.loads(claims.claim_path(tmp_path, 0).read_text())
    assert mine["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".part-00000.claim"]


def test_a_reused_pid_does_not_keep_a_claim_alive(tmp_path):
    """Same pid, other start time: another process that got the dead owner's pid."""
    record = {"host": socket.gethostname(), "pid": os.getpid(), "start": "1"}
    claims.claim_path(tmp_path, 3).write_text(json.dumps(record))
    assert claims.try_claim(tmp_path, 3)


def test_another_hosts_claim_lives_while_its_heartbeat_does(tmp_path):
    path = claims.claim_path(tmp_path, 1)
    path.write_text(json.dumps({"host": "gpu-node-7", "pid": _dead_pid(), "start": "5"}))
    assert not claims.try_claim(tmp_path, 1)  # touched just now
    old = time.time() - claims.STALE_SECONDS - 1
    os.utime(path, (old, old))
    assert claims.try_claim(tmp_path, 1)


def test_claimed_shards_skips_finished_and_held_shards_and_releases_each_claim(tmp_path):
    held = {
        "host": socket.gethostname(),
        "pid": os.getppid(),
        "start": claims._start_time(os.getppid()),
    }
    claims.claim_path(tmp_path, 2).write_text(json.dumps(held))
    taken = []
    for index in claims.claimed_shards(tmp_path, [0, 1, 2, 3], done=lambda k: k == 1):
        assert claims.claim_path(tmp_path, index).is_file()
        taken.append(index)
    assert taken == [0, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".part-00002.claim"]


def test_each_worker_gets_its_own_gpus_and_tensor_parallel_groups():
    gpus = ["0", "1", "2", "3", "4", "5", "6", "7"]
    plan, fits = plan_workers(8, 1, gpus=gpus)
    assert fits and [w.env()["CUDA_VISIBLE_DEVICES"] for w in plan] == gpus
    # a worker's first GPU is its cuda:0, even under a launcher that set LOCAL_RANK
    assert {w.env()["LOCAL_RANK"] for w in plan} == {"0"}
    plan, fits = plan_workers(4, 2, gpus=gpus)
    assert fits and [w.env()["CUDA_VISIBLE_DEVICES"] for w in plan] == ["0,1", "2,3", "4,5", "6,7"]
    plan, fits = plan_workers(3, 1, gpus=["2", "5"])  # more workers than GPUs: shared
    assert not fits and [w.gpus for w in plan] == [("2",), ("5",), ("2",)]


def test_on_a_cpu_each_worker_gets_its_own_cores_and_as_many_threads():
    plan, fits = plan_workers(2, 1, gpus=[], cores=[0, 1, 2, 3, 4])
    assert fits and [w.cores for w in plan] == [(0, 1, 2), (3, 4)]
    env = plan[1].env()
    assert env["SPIN_CPU_CORES"] == "3,4" and env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "3,4" and env["CUDA_VISIBLE_DEVICES"] == ""
    plan, fits = plan_workers(3, 1, gpus=[], cores=[0, 1])
    assert not fits and [w.cores for w in plan] == [(0,), (1,), (0,)]


def test_training_that_needs_more_gpus_than_the_machine_has_is_refused_before_work():
    import pytest

    from spin_core.config import ConfigError, load_config
    from spin_core.runtime.devices import check_device_counts

    eight = load_config("configs/zephyr-7b-ultrachat.yaml", ["training.num_processes=8"])
    assert check_device_counts(eight, gpus=8) == []
    with pytest.raises(
        ConfigError,
        match=r"training.num_processes: 8 ranks on 1 node\(s\) need 8 GPUs on each; this machine has 4",
    ):
        check_device_counts(eight, gpus=4)
    assert check_device_counts(eight, gpus=0) == []  # a CPU machine: gloo ranks
    workers = load_config(
        "configs/zephyr-7b-ultrachat.yaml",
        ["training.num_processes=2", "generation.num_workers=4"],
    )
    (warning,) = check_device_counts(workers, gpus=2)
    assert warning.startswith("generation.num_workers: 4 workers × 1 GPU(s)")


def test_spin_run_refuses_too_many_ranks_for_the_gpus_it_sees(monkeypatch, tmp_path):
    """`check_before_start`, as `spin run` calls it, with a faked count of 2 GPUs."""
    import pytest

    from spin_core import steps
    from spin_core.config import ConfigError, load_config
    from spin_core.runtime import devices

    monkeypatch.setattr(devices, "visible_gpus", lambda: ["0", "1"])
    config = load_config(
        "configs/demo.yaml", ["training.num_processes=4", "training.global_batch_size=128"]
    )
    with pytest.raises(ConfigError, match="this machine has 2"):
        steps.check_before_start(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing written
