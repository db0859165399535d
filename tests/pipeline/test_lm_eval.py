"""eval.lm_eval: lm-evaluation-harness on the toy θ0, offline, with a custom task over local
data; its scores in lm_eval.json, metrics.parquet and the report."""

from __future__ import annotations

import importlib.util
import json
import random
import socket

import pandas as pd
import pytest

from spin_core import lm_eval
from spin_core.config import ConfigError, LmEvalConfig, load_config
from spin_core.reports.report import write_report
from spin_core.storage.files import write_json_atomic
from spin_core.storage.rundir import RunDir

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="needs the lm-eval extra: pip install 'spin[lm-eval]'",
)

TASK = "toy_add"
TASK_YAML = """\
task: toy_add
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "<|user|>{{{{prompt}}}}<|assistant|>"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task over the toy's arithmetic ("add: 2+3" → one of four sums)."""
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = random.Random(0)
    rows = []
    for _ in range(16):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        choices = [str(a + b + d) for d in (0, 1, 2, 3)]
        rng.shuffle(choices)
        rows.append(
            {"prompt": f"add: {a}+{b}", "choices": choices, "label": choices.index(str(a + b))}
        )
    data = directory / "add.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    yaml = TASK_YAML.format(data=data, cache=tmp_path_factory.mktemp("hf_datasets_cache"))
    (directory / f"{TASK}.yaml").write_text(yaml)
    return directory


@pytest.fixture
def offline(monkeypatch):
    """No hub, no network: only loopback connections (the Prefect test server) are allowed."""
    import datasets
    import huggingface_hub

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            raise OSError(f"network access in an offline test: {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


def test_config_parses_per_task_fewshot():
    settings = load_config(
        None,
        ["eval.lm_eval.tasks=[arc_challenge:25, hellaswag, mmlu:5]", "eval.lm_eval.num_fewshot=3"],
    ).eval.lm_eval
    assert settings.task_shots() == [("arc_challenge", 25), ("hellaswag", 3), ("mmlu", 5)]
    assert not lm_eval.enabled(load_config(None).eval.lm_eval)  # off by default
    assert not lm_eval.enabled(LmEvalConfig())
    for bad in ("[arc:x]", "[':5']", "[arc:1, arc:2]"):
        with pytest.raises(ConfigError, match="eval.lm_eval.tasks"):
            load_config(None, [f"eval.lm_eval.tasks={bad}"])


def test_parse_metrics_names_filters_and_drops_non_numbers():
    raw = {
        "alias": "gsm8k",
        "exact_match,strict-match": 0.25,
        "exact_match_stderr,strict-match": 0.01,
        "exact_match,flexible-extract": 0.3,
        "exact_match_stderr,flexible-extract": "N/A",
        "acc,none": float("nan"),
    }
    assert lm_eval.parse_metrics(raw) == {
        "exact_match/strict-match": {"value": 0.25, "stderr": 0.01},
        "exact_match/flexible-extract": {"value": 0.3, "stderr": None},
    }


@needs_lm_eval
def test_library_scores_the_toy_model_offline(toy_build, task_dir, offline, tmp_path):
    import random

    import numpy as np
    import torch

    settings = LmEvalConfig(tasks=[f"{TASK}:2"], include_path=str(task_dir), batch_size=16)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    result = lm_eval.harness_scores(toy_build.model_dir, settings)
    # lm-eval seeds the global generators (1234): the pipeline's seeding is restored.
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    lm_eval.harness_scores(toy_build.model_dir, settings)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert result["lm_eval_version"] == lm_eval.installed_version()
    assert result["paper_lm_eval_version"] == "0.4.0"
    score = result["scores"][TASK]
    assert score["num_fewshot"] == 2
    assert 0.0 <= score["metrics"]["acc"]["value"] <= 1.0
    assert score["metrics"]["acc"]["stderr"] > 0
    assert result["runs"][0]["n-samples"][TASK]["effective"] == 16
    lm_eval.write_result(result, tmp_path)
    assert lm_eval.read_result(tmp_path, settings)["scores"] == result["scores"]
    # a file answers for its own tasks and settings only
    assert lm_eval.read_result(tmp_path, settings.model_copy(update={"tasks": [TASK]})) is None


# A child job's ranks see this many GPUs: lm-eval shares requests among ranks only when the
# machine has more than one, and a CPU shows how the shares are run and joined.
TWO_GPUS = "import torch\ntorch.cuda.device_count = lambda: 2\n"


@needs_lm_eval
@pytest.mark.slow  # a child job / a real flow
def test_two_ranks_share_the_requests_and_score_as_one_process(
    toy_build, task_dir, offline, tmp_path, monkeypatch
):
    settings = LmEvalConfig(tasks=[TASK], include_path=str(task_dir), batch_size=4)
    one = lm_eval.run(toy_build.model_dir, settings, tmp_path / "one")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "sitecustomize.py").write_text(TWO_GPUS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    lines = []
    two = lm_eval.run(
        toy_build.model_dir, settings, tmp_path / "two", ranks=2, on_line=lines.append
    )
    # lm-eval's own world size: 2 only when its ranks shared the requests
    assert (one["processes"], two["processes"]) == (1, 2), "\n".join(lines[-30:])
    assert two["runs"][0]["n-samples"][TASK]["effective"] == 16
    assert two["scores"] == one["scores"]
    assert lm_eval.read_result(tmp_path / "two", settings)["scores"] == one["scores"]
    assert not (tmp_path / "two" / "lm_eval.job.json").exists()


def test_lm_eval_runs_one_process_per_gpu(monkeypatch):
    from spin_core.runtime import devices

    settings = LmEvalConfig(tasks=[TASK])
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    assert lm_eval.processes(settings) == 1
    assert lm_eval.processes(settings.model_copy(update={"processes": 4})) == 1
    monkeypatch.setattr(devices, "visible_gpus", lambda: [str(i) for i in range(8)])
    assert lm_eval.processes(settings) == 8
    assert lm_eval.processes(settings.model_copy(update={"processes": 4})) == 4


@needs_lm_eval
@pytest.mark.slow  # a child job / a real flow
def test_task_writes_lm_eval_json_and_a_rerun_is_cached(toy_build, task_dir, offline, tmp_path):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.dispatch import PrefectRunner
    from spin_core.pipeline import run_lm_eval
    from spin_core.storage.journal import read_journal

    @flow
    def benchmark(config, run_dir: str, model: str, out_dir: str) -> dict | None:
        # as spin_pipeline calls it for θ0
        return run_lm_eval(PrefectRunner(), config, run_dir, model, out_dir)

    config = load_config(
        "configs/demo.yaml",
        [
            *toy_build.config_overrides(),
            f"eval.lm_eval.tasks=[{TASK}:1]",
            f"eval.lm_eval.include_path={task_dir}",
            "eval.lm_eval.batch_size=16",
        ],
    )
    run = RunDir(tmp_path / "run")
    args = (config, str(run.root), str(toy_build.model_dir), str(run.theta0()))
    path = run.theta0() / lm_eval.RESULT_FILE
    with prefect_test_harness():
        first = benchmark(*args)
        written = json.loads(path.read_text())
        mtime = path.stat().st_mtime_ns
        second = benchmark(*args)  # a new flow run: the task's cache
        off = config.model_copy(deep=True)
        off.eval.lm_eval.tasks = []
        assert benchmark(off, *args[1:]) is None
    assert written["lm_eval_version"] == lm_eval.installed_version()
    assert written["scores"][TASK]["num_fewshot"] == 1
    assert 0.0 <= written["scores"][TASK]["metrics"]["acc"]["value"] <= 1.0
    assert first == second == {k: written[k] for k in ("model", "lm_eval_version", "scores")}
    assert path.stat().st_mtime_ns == mtime  # not recomputed
    events = [(e["step"], e["event"]) for e in read_journal(run.root)]
    assert events == [("lm-eval", "started"), ("lm-eval", "finished")]


def _scores(acc: float, stderr: float, version: str = "0.4.13") -> dict:
    return {
        "model": "m",
        "lm_eval_version": version,
        "spec": {
            "tasks": [["arc_challenge", 25], ["gsm8k", 5]],
            "limit": None,
            "include_path": None,
        },
        "scores": {
            "arc_challenge": {
                "num_fewshot": 25,
                "metrics": {
                    "acc": {"value": acc, "stderr": stderr},
                    "acc_norm": {"value": acc + 0.05, "stderr": stderr},
                },
            },
            "gsm8k": {
                "num_fewshot": 5,
                "metrics": {"exact_match/strict-match": {"value": acc / 2, "stderr": None}},
            },
        },
    }


def test_report_picks_up_lm_eval_scores(tmp_path):
    run = RunDir(tmp_path / "run")
    for directory, acc in ((run.theta0(), 0.5), (run.iteration(0), 0.6)):
        directory.mkdir(parents=True)
        write_json_atomic(_scores(acc, 0.01), directory / lm_eval.RESULT_FILE)
    base = {"eval_pairs": 10, "exact_match": 0.3, "real_loglik_per_token": -1.0}
    write_json_atomic(base, run.theta0() / "metrics.json")
    write_json_atomic(base | {"margin": 0.2, "collapsed": False}, run.iteration_metrics(0))
    (run.iteration(1)).mkdir()
    write_json_atomic(_scores(0.9, 0.01), run.iteration(1) / lm_eval.RESULT_FILE)  # no metrics

    path, _ = write_report(run.root)
    metrics = pd.read_parquet(run.metrics).set_index("iteration")
    assert list(metrics.index) == [0, 1]
    assert metrics["lm_eval/arc_challenge/acc"].tolist() == [0.5, 0.6]
    assert metrics["lm_eval_stderr/arc_challenge/acc"].tolist() == [0.01, 0.01]
    assert metrics["lm_eval/gsm8k/exact_match/strict-match"].tolist() == [0.25, 0.3]
    assert metrics["lm_eval_fewshot/arc_challenge"].tolist() == [25, 25]
    assert metrics["lm_eval_version"].tolist() == ["0.4.13", "0.4.13"]
    text = path.read_text()
    section = text.split("## lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    assert "lm-evaluation-harness 0.4.13" in section and "v0.4.0" in section
    assert "| task | metric | n-shot | θ0 | θ1 |" in section
    assert "| arc_challenge | acc | 25 | 0.5000 ± 0.0100 | 0.6000 ± 0.0100 |" in section
    assert "| arc_challenge | acc_norm | 25 | 0.5500 ± 0.0100 | 0.6500 ± 0.0100 |" in section
    assert "| gsm8k | exact_match/strict-match | 5 | 0.2500 | 0.3000 |" in section
    for task in ("arc_challenge", "gsm8k"):
        assert (run.plots / f"lm_eval_{task}.png").exists()
        assert f"(plots/lm_eval_{task}.png)" in section


def test_report_without_lm_eval_has_no_section(tmp_path):
    run = RunDir(tmp_path / "run")
    base = {"eval_pairs": 10, "exact_match": 0.3, "real_loglik_per_token": -1.0}
    write_json_atomic(base, run.theta0() / "metrics.json")
    path, metrics = write_report(run.root)
    assert "lm-evaluation-harness" not in path.read_text()
    assert not any(column.startswith("lm_eval") for column in metrics)
