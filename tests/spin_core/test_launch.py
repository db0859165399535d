"""Launching the training ranks: from this interpreter, across nodes, with the variables they need."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spin_core.config import load_config
from spin_core.storage.rundir import RunDir, save_config
from spin_core.training.job import TrainJob
from spin_core.training.launch import (
    free_port,
    launch_training,
    launcher_command,
    node_rank_from_env,
    split_step_line,
    write_deepspeed_env,
)
from tests.spin_core.test_train import train_parquet  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[2]


def _training(*overrides: str):
    return load_config("configs/demo.yaml", ["training.micro_batch_size=1", *overrides]).training


def test_deepspeed_launcher_is_run_by_this_interpreter(tmp_path):
    training = _training(
        f"training.hostfile={tmp_path / 'hostfile'}",
        "training.num_nodes=2",
        "training.num_processes=16",
        "training.global_batch_size=64",
    )
    command = launcher_command(training, tmp_path / "args.json")
    # .venv/bin/spin without an activated venv has no `deepspeed` on PATH.
    assert command[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert command[command.index("--hostfile") + 1] == str(tmp_path / "hostfile")
    assert command[command.index("--num_nodes") + 1] == "2"
    assert command[command.index("--num_gpus") + 1] == "8"
    # DeepSpeed would otherwise pass --local_rank=N before the args file train_entry reads.
    assert "--no_local_rank" in command
    assert command[-3:] == ["--module", "spin_core.training.rank", str(tmp_path / "args.json")]


def test_the_deepspeed_master_port_is_one_the_first_host_of_the_hostfile_can_use(
    tmp_path, monkeypatch
):
    """DeepSpeed puts rank 0 on the hostfile's first host: a port found free on this host says
    nothing about that one, so it gets $MASTER_PORT or DeepSpeed's default there."""
    import socket

    from spin_core.training.launch import deepspeed_master_port

    hostfile = tmp_path / "hostfile"
    monkeypatch.delenv("MASTER_PORT", raising=False)
    hostfile.write_text("# the GPU nodes\n\ngpu-node-a slots=8\ngpu-node-b slots=8\n")
    assert deepspeed_master_port(str(hostfile)) == 29500
    monkeypatch.setenv("MASTER_PORT", "31337")
    assert deepspeed_master_port(str(hostfile)) == 31337
    hostfile.write_text(f"{socket.gethostname()} slots=8\ngpu-node-b slots=8\n")
    with socket.socket() as busy:  # launched from the first host: a port free here
        busy.bind(("127.0.0.1", 31337))
        assert deepspeed_master_port(str(hostfile)) != 31337


def test_torchrun_across_nodes_uses_a_static_rendezvous_at_node_0(tmp_path):
    training = _training(
        "training.num_nodes=4",
        "training.num_processes=32",
        "training.rdzv_endpoint=node-0:29500",
    )
    command = launcher_command(
        training, tmp_path / "args.json", node_rank=3, rdzv_endpoint="node-0:29500"
    )
    assert command == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "4",
        "--nproc_per_node",
        "8",
        "--node_rank",
        "3",  # static: ranks 24-31 here, global rank 0 on node 0 (the pipeline's node)
        "--rdzv_backend",
        "static",
        "--rdzv_endpoint",
        "node-0:29500",
        "-m",
        "spin_core.training.rank",
        str(tmp_path / "args.json"),
    ]


def test_launcher_fields_are_checked_together():
    with pytest.raises(ValueError, match="deepspeed launcher needs a hostfile"):
        _training("training.launcher=deepspeed", "training.num_nodes=2", "training.num_processes=2")
    with pytest.raises(ValueError, match="hostfile is for the deepspeed launcher"):
        _training("training.launcher=torchrun", "training.hostfile=hosts")
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        _training("training.rdzv_endpoint=no-port")
    # auto without a hostfile: several nodes means torchrun on each.
    assert _training("training.num_nodes=2", "training.num_processes=2").num_nodes == 2


def test_a_step_record_sharing_its_line_with_another_ranks_warning_is_still_read():
    """All ranks write to one pipe, so another rank's warning can land on the record's line
    (a CI run failed on exactly this); the record is read and the warning is logged."""
    warning = "[rank1]: FutureWarning: `all_gather_into_tensor` is deprecated."
    record, rest = split_step_line('[rank0]: SPIN_STEP {"step": 7, "loss": 0.68}' + warning)
    assert record == {"step": 7, "loss": 0.68}
    assert rest == "[rank0]: " + warning
    assert split_step_line("SPIN_STEP {cut") == (None, "SPIN_STEP {cut")
    assert split_step_line("plain") == (None, "plain")


def test_a_rank_writes_its_step_record_and_newline_in_one_write(monkeypatch):
    """Unbuffered, print() writes the text and the newline separately: another rank's output
    then lands between them."""
    import spin_core.training.rank as entry

    writes: list[str] = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    def fake_run_rank(cfg, job, *, on_step):
        on_step({"step": 1})

    monkeypatch.setattr(sys, "stdout", Recorder())
    monkeypatch.setattr(entry, "run_rank", fake_run_rank)
    monkeypatch.setattr(entry.SpinConfig, "model_validate", staticmethod(lambda raw: None))
    monkeypatch.setattr(entry.TrainJob, "from_json", staticmethod(lambda raw: None))
    args = Path(os.devnull)
    monkeypatch.setattr(entry.Path, "read_text", lambda self: '{"config": {}, "job": {}}')
    entry.main(str(args))
    assert writes == ['SPIN_STEP {"step": 1}\n']


def test_node_rank_comes_from_slurm_or_kubernetes(monkeypatch):
    for name in ("SLURM_NODEID", "NODE_RANK", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    assert node_rank_from_env() is None
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert node_rank_from_env() == 2
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert node_rank_from_env() == 1


def test_train_node_refuses_node_0(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if k not in ("SLURM_NODEID", "NODE_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "spin_core.training.node", str(tmp_path), "--node-rank", "0"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "node 0 runs the pipeline" in result.stderr


def test_deepspeed_env_forwards_the_hub_settings_but_no_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("NCCL_IB_HCA=mlx5\nHF_HOME=/mine\n")
    env = {
        "HF_HOME": "/shared/hf",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_secret",
        "HUGGING_FACE_HUB_TOKEN": "hf_secret",
        "HF_HUB_CACHE": "/shared/hf/hub cache",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "AWS_SECRET_ACCESS_KEY": "x",
        "HOME": "/root",
    }
    path = write_deepspeed_env(tmp_path / ".deepspeed_env", env)
    assert path.read_text().splitlines() == [
        "NCCL_IB_HCA=mlx5",  # the user's own file still applies (DS_ENV_FILE replaces it)
        "HF_HOME=/mine",  # and wins over ours
        "HF_HUB_CACHE=/shared/hf/hub cache",
        "HF_HUB_OFFLINE=1",
        "TOKENIZERS_PARALLELISM=false",
        "TQDM_DISABLE=1",
        "TRANSFORMERS_OFFLINE=1",
    ]
    assert "secret" not in path.read_text()


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.mark.slow
def test_remote_ranks_get_the_hub_variables_through_deepspeeds_runner(tmp_path):
    """DeepSpeed's own runner (pdsh backend), with pdsh and ssh stand-ins that print what
    every node would run: the forwarded variables are exported there, the token is not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "ssh", "echo 10.0.0.1\n")  # reachability check, then `hostname -I`
    _fake(bin_dir, "pdsh", 'echo "PDSH $*"\n')
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    cfg = load_config(
        "configs/demo.yaml",
        [
            "training.micro_batch_size=1",
            f"training.hostfile={hostfile}",
            "training.num_nodes=2",
            "training.num_processes=2",
            "training.global_batch_size=8",
        ],
    )
    job = TrainJob("model", "pairs.parquet", tmp_path / "state", tmp_path / "out", 0)
    lines: list[str] = []
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HOME": "/shared/hf", "HF_HUB_OFFLINE": "1"}
    saved = dict(os.environ)
    try:
        os.environ.update(env | {"HF_TOKEN": "hf_secret", "HOME": str(tmp_path)})
        launch_training(cfg, job, on_log=lines.append)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    (remote,) = [line for line in lines if line.startswith("PDSH ")]
    assert "-w node-a,node-b" in remote
    assert "export HF_HOME=/shared/hf;" in remote and "export HF_HUB_OFFLINE=1;" in remote
    assert "hf_secret" not in remote
    # Every node runs this interpreter's launcher, which must not pass --local_rank=N.
    assert f"{sys.executable} -u -m deepspeed.launcher.launch" in remote
    assert " --module --no_local_rank " in remote
    assert " spin_core.training.rank " in remote


def _config(toy_build, *extra: str):
    return load_config(
        "configs/demo.yaml",
        [
            f"model.name_or_path={toy_build.model_dir}",
            "training.learning_rate=1e-4",
            "training.global_batch_size=16",
            "training.micro_batch_size=8",
            "training.num_epochs=1",
            "training.max_length=96",
            "training.max_prompt_length=48",
            "training.zero_stage=2",
            "training.num_processes=2",
            *extra,
        ],
    )


def _job(cfg, train_path: Path, run: RunDir) -> TrainJob:
    return TrainJob(cfg.model.name_or_path, train_path, run.train_state(0), run.model(0), 0)


@pytest.mark.slow
def test_deepspeed_launcher_trains_two_ranks_without_the_venv_on_path(
    toy_build,
    train_parquet,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as `.venv/bin/spin` runs, not activated
    cfg = _config(toy_build, "training.launcher=deepspeed")
    run = RunDir(tmp_path / "run")
    steps: list[dict] = []
    launch_training(cfg, _job(cfg, train_parquet, run), on_step=steps.append)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 64 pairs / 16 per step
    assert (run.model(0) / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_train_through_a_torchrun_rendezvous(
    toy_build,
    train_parquet,  # noqa: F811
    tmp_path,
):
    """Two "nodes" on this machine, one rank each: node 0 is this process's launch, node 1
    runs `python -m spin_core.training.node`, joins, and exits when the run's lock goes."""
    endpoint = f"127.0.0.1:{free_port()}"
    cfg = _config(
        toy_build,
        "training.num_nodes=2",
        "training.launcher=torchrun",
        f"training.rdzv_endpoint={endpoint}",
    )
    run = RunDir(tmp_path / "run")
    save_config(run, cfg)
    run.lock.write_text("{}")  # the live pipeline's lock, as spin run holds it
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_NODEID", "NODE_RANK")}
    log = (tmp_path / "node1.log").open("w")
    node1 = subprocess.Popen(
        [sys.executable, "-m", "spin_core.training.node", str(run.root), "--node-rank", "1"],
        env=env | {"PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        steps: list[dict] = []
        launch_training(cfg, _job(cfg, train_parquet, run), on_step=steps.append)
        assert not run.launch_request.exists()  # the launch is no longer announced
        run.lock.unlink()  # the pipeline ended
        assert node1.wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
        log.close()
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert (run.model(0) / "model.safetensors").exists()


def test_a_node_that_joined_the_launch_it_first_saw_ends_with_the_run(tmp_path, monkeypatch):
    """Node 1 started late (a busy machine, a slow Slurm step): the launch was already
    announced at its first look, so it joined at once, and the run's lock was gone by the
    time the launch ended. It must end then too, not wait for a lock it never saw."""
    import threading

    from spin_core.storage.files import write_json_atomic
    from spin_core.training import launch

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.lock.write_text("{}")
    write_json_atomic({"id": "launch-1", "args_file": "unused"}, run.launch_request)

    def join_launch(request, node_rank, **kwargs):  # node 0's launch runs and the run ends
        run.launch_request.unlink()
        run.lock.unlink()

    monkeypatch.setattr(launch, "join_launch", join_launch)
    follower = threading.Thread(
        target=launch.follow, args=(run.root, 1), kwargs={"poll": 0.01}, daemon=True
    )
    follower.start()
    follower.join(timeout=10)
    assert not follower.is_alive()
