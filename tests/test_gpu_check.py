"""`make gpu-check` tells the truth: a GPU machine whose torch cannot use the GPU is an
error (exit 2, saying why), not "skipped"; with the CPU build it installs the CUDA one."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from benchmarks import gpu_check


@pytest.fixture
def gpu_nodes(tmp_path, monkeypatch):
    """/dev/nvidia0 and /dev/nvidia1 (and the control node, which is no GPU) in a fake /dev."""
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    monkeypatch.setattr(gpu_check, "DEVICE_NODES", str(tmp_path / "nvidia[0-9]*"))
    return [str(tmp_path / "nvidia0"), str(tmp_path / "nvidia1")]


def test_the_verdict_for_each_kind_of_machine(gpu_nodes):
    assert gpu_check.device_nodes() == gpu_nodes
    # No GPU at all: nothing to check, and it says so.
    code, message = gpu_check.cuda_verdict([], "2.13.0+cpu", None, False)
    assert code == 0 and "skipped" in message
    # A GPU and the CPU build of torch: an error that says how to get the CUDA build.
    code, message = gpu_check.cuda_verdict(gpu_nodes, "2.13.0+cpu", None, False)
    assert code == 2
    assert "CPU build" in message and "--install-cuda-torch" in message
    assert "torch==2.13.0" in message and gpu_nodes[0] in message
    # A GPU, the CUDA build, but no usable device (driver, CUDA_VISIBLE_DEVICES).
    code, message = gpu_check.cuda_verdict(gpu_nodes, "2.13.0", "12.8", False)
    assert code == 2 and "no usable GPU" in message and "CUDA 12.8" in message
    # A usable GPU: the check runs.
    assert gpu_check.cuda_verdict(gpu_nodes, "2.13.0", "12.8", True) == (None, "")


def test_a_gpu_machine_with_cpu_torch_fails_instead_of_skipping(gpu_nodes, monkeypatch, capsys):
    assert torch.version.cuda is None and not torch.cuda.is_available()  # this machine's torch
    monkeypatch.setattr(sys, "argv", ["gpu_check"])
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main()
    assert exit_info.value.code == 2
    assert "is the CPU build" in capsys.readouterr().err


def test_install_cuda_torch_reinstalls_the_same_version_then_restarts(gpu_nodes, monkeypatch):
    commands, restarted = [], []

    def run(command, **kwargs):
        commands.append(command)
        return types.SimpleNamespace(returncode=0, stdout="12.8\n")

    def execv(path, argv):
        restarted.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(gpu_check.os, "execv", execv)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--install-cuda-torch", "--threads=4"])
    with pytest.raises(SystemExit):
        gpu_check.main()
    pip, missing = commands[0], commands[1]
    assert pip[:4] == [sys.executable, "-m", "pip", "install"] and "--force-reinstall" in pip
    # torch alone, so no other package's pin moves, and the user's find-links (a local
    # "+cpu" wheel) ignored; then only the CUDA libraries it lacks.
    assert "--no-deps" in pip and "--isolated" in pip
    assert "--no-deps" not in missing and "--force-reinstall" not in missing
    assert pip[-1] == missing[-1] == "torch==2.13.0"  # the same version, without "+cpu"
    assert pip[pip.index("--index-url") + 1] == gpu_check.TORCH_INDEX_URL
    # Then the check starts again in a fresh interpreter, which imports the new torch.
    assert restarted == [[sys.executable, "-m", "benchmarks.gpu_check", "--threads=4"]]


def test_peak_flops_of_the_h200_nvl_is_not_the_sxm_figure():
    assert gpu_check.peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert gpu_check.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12


def test_a_driver_too_old_for_the_cuda_build_is_one_message_saying_so(gpu_nodes, monkeypatch):
    def run(command, **kwargs):
        usable = "is_available" in command[-1]
        return types.SimpleNamespace(returncode=1 if usable else 0, stdout="12.8\n")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(SystemExit) as stop:
        gpu_check.install_cuda_torch("2.13.0+cpu")
    assert "driver is probably too old" in str(stop.value) and "SPIN_TORCH_INDEX_URL" in str(
        stop.value
    )
