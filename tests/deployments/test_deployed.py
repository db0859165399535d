"""flows/dispatch.py, flows/scheduled.py and deployments/prefect.yaml without a server."""

from __future__ import annotations

import inspect

import pytest
import yaml

from flows.dispatch import REMOTE_STEPS, spin_evaluate, spin_generate, spin_lm_eval, spin_train
from flows.scheduled import next_iteration_config, spin_next_iteration
from spin_core.config import load_config
from spin_core.errors import InputError
from spin_core.steps import evaluate, generate_responses, lm_eval_model, train_policy
from spin_core.storage.files import write_json_atomic
from spin_core.storage.rundir import RunDir, check_or_save_config
from tests.deployments.conftest import ROOT, scaling_out_commands

PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def _parameters(signature: inspect.Signature) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in signature.parameters.values()]


def test_deployed_flows_take_exactly_the_parameters_of_their_steps():
    # PrefectRunner binds the step's arguments by the step's signature and sends them as
    # they are.
    assert _parameters(inspect.signature(spin_generate.fn)) == _parameters(
        generate_responses.signature
    )
    assert _parameters(inspect.signature(spin_train.fn)) == _parameters(train_policy.signature)
    assert _parameters(inspect.signature(spin_evaluate.fn)) == _parameters(evaluate.signature)
    assert _parameters(inspect.signature(spin_lm_eval.fn)) == _parameters(lm_eval_model.signature)


def test_prefect_yaml_puts_the_heavy_steps_on_the_gpu_pool():
    deployments = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert pools == {
        "spin-pipeline": "cpu",
        "spin-next-iteration": "cpu",
        "spin-generate": "gpu",
        "spin-train": "gpu",
        "spin-evaluate": "gpu",  # held-out generation and lm-eval need the GPUs too
        "spin-lm-eval": "gpu",
        "spin-compare": "cpu",
    }
    flows = {
        "spin-generate": spin_generate,
        "spin-train": spin_train,
        "spin-evaluate": spin_evaluate,
        "spin-lm-eval": spin_lm_eval,
    }
    for remote in REMOTE_STEPS.values():
        flow_name, deployment = remote.split("/")
        assert flows[deployment].name == flow_name
        assert deployments[deployment]["entrypoint"].endswith(flows[deployment].fn.__name__)
    config = deployments["spin-pipeline"]["parameters"]["config"]
    assert config["run"]["execution"] == "deployments"
    load_config(None, [f"run.{k}={v}" for k, v in config["run"].items()])  # a valid partial config
    assert deployments["spin-next-iteration"]["entrypoint"].endswith(
        spin_next_iteration.fn.__name__
    )
    (schedule,) = deployments["spin-next-iteration"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["active"] is False


def test_readme_gives_each_gpu_worker_one_heavy_step_at_a_time():
    commands = scaling_out_commands()
    assert "prefect deploy --all --prefect-file deployments/prefect.yaml" in commands
    assert "prefect worker start --pool gpu --limit 1" in commands


def test_next_iteration_asks_for_one_more_than_finished(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(InputError, match="not a run directory"):
        next_iteration_config(run, max_iterations=3)
    config = load_config("configs/demo.yaml", ["training.beta=0.3", "run.iterations=1"])
    check_or_save_config(run, config)
    assert next_iteration_config(run, max_iterations=3).run.iterations == 1
    write_json_atomic({"margin": 0.1}, run.iteration_metrics(0))
    following = next_iteration_config(run, max_iterations=3)
    assert following.run.iterations == 2 and following.training.beta == 0.3
    write_json_atomic({"margin": 0.1}, run.iteration_metrics(1))
    write_json_atomic({"margin": 0.1}, run.iteration_metrics(2))
    assert next_iteration_config(run, max_iterations=3) is None
