"""Multi-rank training as a child process group: launch, stream, fail, cancel.

With `training.num_processes > 1` (or a hostfile) training runs as a DeepSpeed
job: `torchrun` on one node; on several, the `deepspeed` launcher over SSH to the
hosts of a hostfile, or torchrun on every node (a static rendezvous at node 0,
for Slurm and Kubernetes: the other nodes run `python -m spin_core.training.node`).
Both launchers run from this interpreter, so no activated virtualenv is needed.
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

import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from spin_core.config import ConfigError, SpinConfig, TrainingConfig
from spin_core.runtime.processes import LaunchError, child_env, free_port, run_group
from spin_core.storage.files import write_json_atomic
from spin_core.storage.rundir import RunDir
from spin_core.training.job import TrainJob

STEP_PREFIX = "SPIN_STEP "  # rank 0 prints each step record after this prefix


def launcher_kind(training: TrainingConfig) -> str:
    """ "deepspeed" (the hostfile's hosts, over SSH) or "torchrun" (one node, or a rendezvous)."""
    if training.launcher == "auto":
        return "deepspeed" if training.hostfile else "torchrun"
    return training.launcher


def launcher_command(
    training: TrainingConfig,
    args_file: Path,
    *,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """The command that starts this node's ranks of `spin_core.training.rank ARGS_FILE`.

    Both launchers run from this interpreter (`python -m ...`), so `.venv/bin/spin` works
    without an activated virtualenv. torchrun on several nodes uses a static rendezvous:
    node `node_rank` holds ranks node_rank·P … node_rank·P + P − 1, so global rank 0 (whose
    step records the pipeline reads) is on node 0, the node that runs the pipeline.
    """
    module = ["-m", "spin_core.training.rank", str(args_file)]
    per_node = training.num_processes // training.num_nodes
    if launcher_kind(training) == "deepspeed":
        hosts = ["--hostfile", training.hostfile] if training.hostfile else []
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            *hosts,
            "--num_nodes",
            str(training.num_nodes),
            "--num_gpus",
            str(per_node),
            "--master_port",
            str(deepspeed_master_port(training.hostfile)),
            "--no_local_rank",  # train_entry takes the args file only; LOCAL_RANK is in the env
            "--module",
            *module[1:],
        ]
    if training.num_nodes > 1:
        if rdzv_endpoint is None:
            raise ValueError("a multi-node torchrun command needs the rendezvous endpoint")
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(training.num_nodes),
            "--nproc_per_node",
            str(per_node),
            "--node_rank",
            str(node_rank),
            "--rdzv_backend",
            "static",
            "--rdzv_endpoint",
            rdzv_endpoint,
            *module,
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


DEFAULT_MASTER_PORT = 29500  # torch's and DeepSpeed's default


def deepspeed_master_port(hostfile: str | None) -> int:
    """The port rank 0 listens on: DeepSpeed puts rank 0 on the hostfile's first host, so a
    port found free here is only known free there when that host is this one. Otherwise
    $MASTER_PORT, or DeepSpeed's default 29500."""
    first = _first_host(hostfile) if hostfile else None
    here = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
    if first is None or first in here:
        return free_port()
    return int(os.environ.get("MASTER_PORT") or DEFAULT_MASTER_PORT)


def _first_host(hostfile: str) -> str | None:
    """The first host named in a DeepSpeed hostfile (`host slots=N` lines, # comments)."""
    try:
        lines = Path(hostfile).expanduser().read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words:
            return words[0]
    return None


def rendezvous_endpoint(training: TrainingConfig) -> str:
    """Node 0's host:port for a multi-node torchrun job: `training.rdzv_endpoint`, else
    $MASTER_ADDR:$MASTER_PORT (29500 if unset; what Slurm and Kubernetes job scripts export),
    else this host's name and a free port (the other nodes read it from the run directory)."""
    if training.rdzv_endpoint:
        return training.rdzv_endpoint
    if os.environ.get("MASTER_ADDR"):
        return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT') or DEFAULT_MASTER_PORT}"
    return f"{socket.getfqdn()}:{free_port()}"


# Variables the remote ranks of a deepspeed (pdsh) launch need but DeepSpeed forwards only
# by prefix PYTHON/NCCL/UCX/MLFLOW: the Hugging Face cache, offline mode and quiet progress.
FORWARDED_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TQDM_")
# Never written to disk: remote nodes find a token in $HF_HOME/token (`hf auth login`).
_SECRET = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|API_KEY)($|_)")


def _existing_deepspeed_env() -> list[str]:
    """The lines of the env files DeepSpeed would read without us (~ and the cwd)."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    lines = []
    for folder in (os.path.expanduser("~"), "."):
        path = Path(folder, name)
        if path.is_file():
            lines += [line.rstrip("\n") for line in path.read_text().splitlines() if "=" in line]
    return lines


def write_deepspeed_env(path: Path, env: dict[str, str]) -> Path:
    """A `.deepspeed_env` for the remote ranks: the user's own (~/.deepspeed_env, or the
    file DS_ENV_FILE names) first, then the forwarded variables of `env` it does not set.

    Tokens and other secrets are left out (they would be written to the shared run
    directory and put on the pdsh command line of every node).
    """
    lines = _existing_deepspeed_env()
    keys = {line.split("=", 1)[0].strip() for line in lines}
    for key in sorted(env):
        value = env[key]
        if (
            key.startswith(FORWARDED_PREFIXES)
            and key not in keys
            and not _SECRET.search(key)
            and "\n" not in value
        ):
            lines.append(f"{key}={value}")
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _run_root(state_dir: Path) -> Path:
    """The run directory holding `state_dir` (the directory with spin.yaml)."""
    for folder in (state_dir, *state_dir.parents):
        if RunDir(folder).config.is_file():
            return folder
    raise ConfigError(
        f"training.num_nodes: a multi-node torchrun job needs {state_dir} inside a run "
        "directory (with spin.yaml) on a filesystem every node shares"
    )


def launch_training(
    cfg: SpinConfig,
    job: TrainJob,
    *,
    on_step: Callable[[dict], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> None:
    """Run `spin_core.training.rank` on `job` on `training.num_processes` ranks.

    This is node 0. With torchrun on several nodes the launch is announced in the run
    directory (`.train-launch.json`), where `python -m spin_core.training.node RUN_DIR` on every
    other node picks it up and starts that node's ranks; with the deepspeed launcher the
    forwarded variables go to the remote ranks in a `.deepspeed_env` (DS_ENV_FILE).
    """
    training = cfg.training
    state_dir = Path(job.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", prefix=".launch-", dir=state_dir, delete=False
    ) as handle:
        json.dump({"config": cfg.model_dump(mode="json"), "job": job.to_json()}, handle)
        args_file = Path(handle.name)
    env = child_env()
    request = None
    if launcher_kind(training) == "deepspeed" and training.num_nodes > 1:
        env["DS_ENV_FILE"] = str(write_deepspeed_env(state_dir / ".deepspeed_env", env).resolve())
    if launcher_kind(training) == "torchrun" and training.num_nodes > 1:
        endpoint = rendezvous_endpoint(training)
        request = RunDir(_run_root(state_dir)).launch_request
        announced = {"id": args_file.name, "args_file": str(args_file.resolve())}
        write_json_atomic(announced | {"rdzv_endpoint": endpoint}, request)
        command = launcher_command(training, args_file, rdzv_endpoint=endpoint)
        if on_log is not None:
            on_log(f"node 0 of {training.num_nodes}: rendezvous at {endpoint} ({request})")
    else:
        command = launcher_command(training, args_file)

    def route(line: str) -> None:
        record, rest = split_step_line(line)
        if record is not None and on_step is not None:
            on_step(record)
        if rest.strip() and on_log is not None:
            on_log(rest)

    try:
        run_group(command, on_line=route, env=env)
    finally:
        if request is not None:
            request.unlink(missing_ok=True)
        args_file.unlink(missing_ok=True)


def split_step_line(line: str) -> tuple[dict | None, str]:
    """The step record on one line of the ranks' merged output, and the rest of the line.

    The launcher may prefix rank output ("[rank0]:"), and another rank's output can share the
    line (all ranks write to one pipe): whatever is not the record is returned to be logged.
    """
    at = line.find(STEP_PREFIX)
    if at < 0:
        return None, line
    start = at + len(STEP_PREFIX)
    try:
        record, end = json.JSONDecoder().raw_decode(line, start)
    except json.JSONDecodeError:
        return None, line
    return record, line[:at] + line[end:]


NODE_RANK_VARIABLES = ("SLURM_NODEID", "NODE_RANK", "JOB_COMPLETION_INDEX")


def node_rank_from_env() -> int | None:
    """This node's rank as Slurm (SLURM_NODEID), a NODE_RANK export or a Kubernetes
    Indexed Job (JOB_COMPLETION_INDEX) gives it; None when none is set."""
    for name in NODE_RANK_VARIABLES:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return None


def _read_request(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none now, or being replaced


def join_launch(request: dict, node_rank: int, *, on_line: Callable[[str], None] = print) -> None:
    """Start this node's ranks of the launch node 0 announced (`request`) and wait for them."""
    args = json.loads(Path(request["args_file"]).read_text())
    training = TrainingConfig.model_validate(args["config"]["training"])
    if not 0 < node_rank < training.num_nodes:
        raise ConfigError(
            f"node rank {node_rank}: this job has nodes 1 … {training.num_nodes - 1} besides "
            "node 0 (training.num_nodes)"
        )
    command = launcher_command(
        training,
        Path(request["args_file"]),
        node_rank=node_rank,
        rdzv_endpoint=request["rdzv_endpoint"],
    )
    run_group(command, on_line=on_line, env=child_env())


def follow(run_dir: str | Path, node_rank: int, *, once: bool = False, poll: float = 1.0) -> None:
    """Node `node_rank` (≥ 1) of a multi-node torchrun job: join every training launch of
    the run at `run_dir` as node 0 announces it, until the run ends (its .lock is gone
    after it was seen), or after one launch with `once`."""
    request_path = RunDir(run_dir).launch_request
    joined: set[str] = set()
    lock_seen = False
    while True:
        request = _read_request(request_path)
        if request is not None and request["id"] not in joined:
            # Only a live run announces a launch: without this, a node that started after the
            # announcement and joined at once never saw the lock, and outlived the run forever.
            lock_seen = True
            joined.add(request["id"])
            try:
                join_launch(request, node_rank)
            except (LaunchError, OSError) as error:  # OSError: node 0 ended the launch first
                if once:
                    raise
                print(f"node {node_rank}: {error}", flush=True)  # node 0's step fails too
            if once:
                return
        locked = RunDir(run_dir).lock.exists()
        if lock_seen and not locked and _read_request(request_path) is None:
            return
        lock_seen |= locked
        time.sleep(poll)
