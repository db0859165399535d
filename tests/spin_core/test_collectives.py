"""Every collective runs on the rank's device in a dtype NCCL reduces (gloo would take anything).

On a CPU the rank's device is the CPU, so a CPU tensor would pass unnoticed; these tests
pretend the rank's device is another one (`meta`) and look at what reaches all_reduce.
"""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import spin_core.runtime.devices
from spin_core.runtime.devices import COLLECTIVE_DTYPES


class _Reached(Exception):
    """Raised by the fake all_reduce once it has seen its tensor: the rest needs real ranks."""


@pytest.fixture
def handed(monkeypatch):
    """The tensors handed to dist.all_reduce, while the rank's device is `meta`."""
    seen: list[torch.Tensor] = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor)
        raise _Reached

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(spin_core.runtime.devices, "device", lambda: torch.device("meta"))
    return seen


def _on_rank_device(seen):
    assert seen, "nothing reached all_reduce"
    for tensor in seen:
        assert tensor.device == torch.device("meta"), f"all_reduce got a tensor on {tensor.device}"
        assert tensor.dtype in COLLECTIVE_DTYPES


def test_step_metric_sums_are_reduced_on_the_rank_device(handed, monkeypatch):
    import spin_core.training.train

    monkeypatch.setattr(spin_core.training.train, "device", spin_core.runtime.devices.device)
    with pytest.raises(_Reached):
        spin_core.training.train._reduce_sums(
            {"loss": 0.7, "pairs": 4.0, "tokens": 100.0}, world_size=2
        )
    _on_rank_device(handed)


def test_scored_logps_are_gathered_on_the_rank_device(handed, monkeypatch):
    """The weights sit on the CPU (as with ZeRO offload); the gathering sum must not."""
    import spin_core.score
    from spin_core.score import Examples, score_examples

    monkeypatch.setattr(spin_core.score, "rank_device", spin_core.runtime.devices.device)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)

    class Constant(torch.nn.Module):  # logits of a fixed distribution; no backbone/head split
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(7))

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return type("Out", (), {"logits": self.bias.expand(*input_ids.shape, 7)})()

    examples = Examples([[1, 2, 3], [1, 4]], [[-100, 2, 3], [-100, 4]])
    with pytest.raises(_Reached):
        score_examples(Constant(), examples, 0, batch_tokens=64, check=False, world_size=2)
    _on_rank_device(handed)


def test_a_tensor_off_the_rank_device_is_refused_before_it_reaches_nccl(handed):
    from spin_core.runtime.devices import all_reduce_sum

    with pytest.raises(RuntimeError, match="on cpu; expected it on meta"):
        all_reduce_sum(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="torch.bool"):
        all_reduce_sum(torch.zeros(3, dtype=torch.bool, device="meta"))
    assert not handed


def test_every_collective_in_the_package_goes_through_the_checked_helper():
    root = Path(spin_core.runtime.devices.__file__).parents[1]
    direct = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*)\(")
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
        and not (path.name == "devices.py" and ("all_reduce(tensor" in line or "(box" in line))
    ]
    assert not offenders, f"collectives that bypass runtime.devices' helpers: {offenders}"
