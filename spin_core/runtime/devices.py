"""This rank's device and dtype, the collectives every rank goes through, devices for worker
processes, and GPU memory between steps.

A generation worker is a process with devices of its own, chosen here before it starts:
on a GPU node, `tensor_parallel_size` GPUs each (`CUDA_VISIBLE_DEVICES`); on a CPU, its own
cores (`SPIN_CPU_CORES`, which the worker pins itself to, with as many threads). A node
with fewer devices than workers is shared round robin, with a warning from the caller.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def compute_dtype(precision: str) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU for 'auto' (docs/DESIGN.md §4)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# What NCCL, the backend on GPUs, can reduce: it has no bool or complex type.
COLLECTIVE_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; every collective of spin goes through here.

    It must be on this rank's `device()` in a dtype NCCL reduces: NCCL rejects a CPU
    tensor ("No backend type associated with device type cpu"), which gloo on a CPU
    would accept, so the check stops on a CPU what would break only on GPUs.
    """
    import torch.distributed as dist

    if tensor.device != device() or tensor.dtype not in COLLECTIVE_DTYPES:
        raise RuntimeError(
            f"a collective got a {tensor.dtype} tensor on {tensor.device}; expected it on "
            f"{device()} in one of {[str(d).removeprefix('torch.') for d in COLLECTIVE_DTYPES]}"
        )
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank0_decides(read: Callable[[], T]) -> T:
    """What `read()` returns on rank 0, on every rank (it must pickle); only rank 0 reads.

    Ranks on several nodes can see different states of a shared filesystem (NFS caches
    attributes for up to a minute), so a decision read from files there (which checkpoint to
    resume, whether the pairs are scored) is taken on rank 0 alone and sent to the others.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return read()
    box = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device())  # NCCL sends from the GPU
    return box[0]


def release_memory() -> None:
    """Collect unreachable objects (models in reference cycles), then hand PyTorch's cached
    CUDA blocks back to the driver (a no-op where CUDA never started): the next GPU step in
    this process (training after evaluation, on one GPU) sees the memory free."""
    gc.collect()
    torch.cuda.empty_cache()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them (empty on a CPU)."""
    if not torch.cuda.is_available():
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named:
        return [d.strip() for d in named.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def cpu_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class WorkerDevices:
    """What one worker process gets: GPUs (by name) or CPU cores."""

    gpus: tuple[str, ...] = ()
    cores: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        """The variables that give a child process these devices."""
        if self.gpus:
            # Its first GPU is cuda:0 whatever this process's rank (`device()` reads
            # LOCAL_RANK, which a launcher may have set in the environment it inherits).
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus), "LOCAL_RANK": "0"}
        cores = ",".join(map(str, self.cores))
        return {
            "CUDA_VISIBLE_DEVICES": "",
            "SPIN_CPU_CORES": cores,
            "OMP_NUM_THREADS": str(len(self.cores)),
            "VLLM_CPU_OMP_THREADS_BIND": cores,  # vLLM's CPU engine pins its own threads
        }


def plan_workers(
    num_workers: int, per_worker: int = 1, *, gpus: list[str] | None = None, cores=None
) -> tuple[list[WorkerDevices], bool]:
    """Devices for `num_workers` workers of `per_worker` GPUs each (vLLM's tensor parallel
    size), and whether they fit without sharing. Without GPUs the cores are split evenly."""
    gpus = visible_gpus() if gpus is None else list(gpus)
    if gpus:
        need = num_workers * per_worker
        plan = [
            WorkerDevices(
                gpus=tuple(gpus[(w * per_worker + i) % len(gpus)] for i in range(per_worker))
            )
            for w in range(num_workers)
        ]
        return plan, need <= len(gpus)
    cores = cpu_cores() if cores is None else list(cores)
    if num_workers > len(cores):
        return [WorkerDevices(cores=(cores[w % len(cores)],)) for w in range(num_workers)], False
    share, extra = divmod(len(cores), num_workers)
    plan, start = [], 0
    for w in range(num_workers):
        size = share + (w < extra)
        plan.append(WorkerDevices(cores=tuple(cores[start : start + size])))
        start += size
    return plan, True


def pin_to_assigned_cores() -> None:
    """In a worker process: run on the cores `SPIN_CPU_CORES` names, with one torch thread
    each (no-op when unset, as on a GPU node)."""
    named = os.environ.get("SPIN_CPU_CORES")
    if not named:
        return
    cores = {int(c) for c in named.split(",")}
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def check_device_counts(config, gpus: int | None = None, share: str = "this machine") -> list[str]:
    """Before hours of work: raise ConfigError, naming the field, when training needs more
    GPUs per node than `gpus` (this machine's, by default); return a warning when the
    generation workers do (they then share GPUs). Nothing on a machine without GPUs, where
    ranks and workers are CPU processes."""
    from spin_core.config import ConfigError

    if gpus is None:
        gpus = len(visible_gpus())
    if gpus == 0:
        return []
    training, generation = config.training, config.generation
    per_node = training.num_processes // training.num_nodes
    if per_node > gpus:
        raise ConfigError(
            f"training.num_processes: {training.num_processes} ranks on {training.num_nodes} "
            f"node(s) need {per_node} GPUs on each; {share} has {gpus}"
        )
    per_worker = generation.tensor_parallel_size if generation.backend == "vllm" else 1
    if generation.num_workers * per_worker > gpus:
        return [
            f"generation.num_workers: {generation.num_workers} workers × {per_worker} GPU(s) "
            f"is more than the {gpus} GPUs of {share}; workers will share GPUs"
        ]
    return []
