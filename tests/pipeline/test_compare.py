"""spin compare: recipes over seeds (flows/compare.py, spin_core/reports/compare.py).

Fast: the interval maths and compare.md on synthetic run directories. Slow: two toy
recipes × two seeds through the real flows, then a third seed, which runs only the two
new runs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from spin_core.config import ConfigError, load_config
from spin_core.errors import InputError
from spin_core.reports import compare, compare_report
from spin_core.reports import significance as sig
from spin_core.storage.files import write_json_atomic
from spin_core.storage.rundir import RunDir, save_config
from tests.overrides import overrides, set_args

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


# --- intervals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "df, expected",
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (10, 2.2281), (30, 2.0423)],
)
def test_t_quantile_matches_the_t_table(df, expected):
    assert sig.t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_other_confidences():
    assert sig.t_quantile(0.99, 5) == pytest.approx(4.0321, abs=1e-4)
    assert sig.t_quantile(0.90, 1) == pytest.approx(6.3138, abs=1e-4)
    with pytest.raises(ValueError):
        sig.t_quantile(0.95, 0)


def test_mean_interval_is_the_t_interval_and_none_for_one_seed():
    mean, low, high = sig.mean_interval([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)  # s = 1
    assert mean == 2.0
    assert (low, high) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, abs=1e-5))
    mean, low, high = sig.mean_interval([0.4])
    assert mean == 0.4 and math.isnan(low) and math.isnan(high)
    assert sig.mean_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in sig.mean_interval([]))


def _evals(n: int, rng: np.random.Generator, p_a: float, p_b: float, shift: float = 0.0):
    ids = [f"p{i}" for i in range(n)]
    tokens = rng.integers(5, 30, size=n)
    a = pd.DataFrame(
        {
            "id": ids,
            "exact_match": rng.random(n) < p_a,
            "real_logps": -1.0 * tokens + rng.normal(0, 1, n),
            "real_tokens": tokens,
        }
    )
    b = a.assign(
        exact_match=rng.random(n) < p_b, real_logps=a["real_logps"] + shift * tokens
    ).sample(frac=1, random_state=0)  # another row order: pairing is by id
    return a, b


def test_one_stratum_is_the_plain_paired_bootstrap():
    a, b = _evals(80, np.random.default_rng(1), 0.4, 0.6, shift=0.05)
    paired = sig.paired_frames(a, b)
    got = sig.stratified_paired_bootstrap([paired], sig.EXACT_MATCH, n_resamples=2000)
    want = sig.paired_bootstrap_ci(
        paired["exact_match_a"].astype(float),
        paired["exact_match_b"].astype(float),
        n_resamples=2000,
    )
    assert got == pytest.approx(want)
    got = sig.stratified_paired_bootstrap([paired], sig.REAL_LOGLIK, n_resamples=2000)
    want = sig.paired_bootstrap_ratio_ci(
        paired["real_logps_a"],
        paired["real_tokens_a"],
        paired["real_logps_b"],
        paired["real_tokens_b"],
        n_resamples=2000,
    )
    assert got == pytest.approx(want)


def test_pooled_delta_is_the_mean_of_the_seeds_deltas_and_resamples_within_seeds():
    rng = np.random.default_rng(2)
    strata = []
    for n, shift in ((50, 0.1), (70, 0.3)):
        a, b = _evals(n, rng, 0.5, 0.5, shift=shift)
        strata.append(sig.paired_frames(a, b))
    delta, low, high = sig.stratified_paired_bootstrap(strata, sig.REAL_LOGLIK, n_resamples=1000)
    assert delta == pytest.approx(0.2)  # Σ(logp + shift·tokens)/Σtokens − Σlogp/Σtokens = shift
    assert low == pytest.approx(0.2) and high == pytest.approx(0.2)  # every resample: exactly
    # exact match: each seed's prompts are drawn from that seed only
    same = pd.DataFrame({"exact_match_a": [False] * 10, "exact_match_b": [True] * 10})
    other = pd.DataFrame({"exact_match_a": [False] * 40, "exact_match_b": [False] * 40})
    assert sig.stratified_paired_bootstrap([same, other], sig.EXACT_MATCH) == (0.5, 0.5, 0.5)


def test_pooled_comparison_uses_every_seed_and_agrees_with_per_seed_tests():
    rng = np.random.default_rng(3)
    evaluations = {s: _evals(60, rng, 0.3, 0.7, shift=0.02) for s in (0, 1, 2)}
    exact, real = compare.pooled_comparison("r", 2, evaluations, n_resamples=1000)
    assert exact.metric == sig.EXACT_MATCH and real.metric == sig.REAL_LOGLIK
    assert exact.pooled.name == "θ2 vs SFT baseline 2" and exact.pooled.n == 180
    assert exact.seeds == [0, 1, 2]
    per_seed = [exact.per_seed[s].delta for s in (0, 1, 2)]
    assert exact.pooled.delta == pytest.approx(np.mean(per_seed))
    assert exact.across[0] == pytest.approx(np.mean(per_seed))
    assert exact.across[1] < exact.pooled.delta < exact.across[2]
    a = np.concatenate([sig.paired_frames(*evaluations[s])["exact_match_a"] for s in (0, 1, 2)])
    b = np.concatenate([sig.paired_frames(*evaluations[s])["exact_match_b"] for s in (0, 1, 2)])
    assert exact.pooled.p_value == sig.mcnemar_exact_p(a, b)
    assert exact.pooled.significant and exact.pooled.low > 0
    assert real.pooled.p_value is None and real.pooled.significant


# --- recipes, seeds, reuse ------------------------------------------------------------------


def test_recipes_are_named_by_file_stem_or_run_name(tmp_path):
    other = tmp_path / "low-beta.yaml"
    other.write_text(DEMO.read_text())
    recipes = compare.load_recipes([str(DEMO), other], ["training.beta=0.3"])
    assert [r.name for r in recipes] == ["demo", "low-beta"]
    assert all(r.config.training.beta == 0.3 for r in recipes)
    config = load_config(DEMO, ["run.name=mine"])
    assert [r.name for r in compare.load_recipes([config])] == ["mine"]
    with pytest.raises(ConfigError, match="demo appears more than once"):
        compare.load_recipes([DEMO, load_config(DEMO)])
    with pytest.raises(ConfigError, match="directory name"):
        compare.load_recipes([load_config(DEMO, ["run.name=../x"])])
    with pytest.raises(ConfigError, match="training.beta"):
        compare.load_recipes([DEMO], ["training.beta=-1"])


def test_seed_k_sets_the_three_seeds_and_keeps_the_toy_theta0(tmp_path):
    (recipe,) = compare.load_recipes([DEMO])
    planned = compare.plan_runs([recipe], 3, tmp_path / "out")
    assert [p.run_dir for p in planned] == [
        (tmp_path / "out" / "demo" / f"seed-{k}").resolve() for k in range(3)
    ]
    for k, p in enumerate(planned):
        c = p.config
        assert (c.data.seed, c.generation.seed, c.training.seed) == (k, k, k)
        assert c.toy == recipe.config.toy and c.training.beta == recipe.config.training.beta
    with pytest.raises(ConfigError, match="seeds must be at least 1"):
        compare.plan_runs([recipe], 0, tmp_path)


def _finish(run_dir: Path, config, iterations: int, **iteration_metrics) -> RunDir:
    run = RunDir(run_dir)
    save_config(run, config)
    for t in range(iterations):
        metrics = {"margin": 0.1, "real_loglik_per_token": -1.0}
        metrics |= {"opponent_real_loglik_per_token": -0.9}
        write_json_atomic(metrics | iteration_metrics, run.iteration_metrics(t))
        if config.run.baseline == "sft":
            write_json_atomic({}, run.baseline(t) / "metrics.json")
    run.report.write_text("# report\n")
    os.utime(run.config, ns=(1, 1))  # spin.yaml written before the report
    return run


def test_a_run_is_finished_only_with_its_config_all_iterations_and_a_later_report(tmp_path):
    config = load_config(DEMO, ["run.iterations=2"])
    run = _finish(tmp_path / "run", config, 2)
    assert compare.is_finished(run.root, config)
    assert not compare.is_finished(run.root, load_config(DEMO, ["run.iterations=3"]))
    assert not compare.is_finished(
        run.root, load_config(DEMO, ["run.iterations=2", "run.sample_rows=3"])
    )
    (run.baseline(1) / "metrics.json").unlink()
    assert not compare.is_finished(run.root, config)  # the baseline of iteration 1 is missing
    run = _finish(tmp_path / "restarted", config, 2)
    os.utime(run.report, ns=(10**9, 10**9))
    os.utime(run.config, ns=(2 * 10**9, 2 * 10**9))  # started again after the report
    assert not compare.is_finished(run.root, config)
    assert not compare.is_finished(tmp_path / "absent", config)


def test_a_run_that_stopped_early_is_finished(tmp_path):
    stop = load_config(DEMO, ["run.iterations=3", "run.early_stop_margin=0.5"])
    assert compare.is_finished(_finish(tmp_path / "early", stop, 1).root, stop)
    collapse = load_config(DEMO, ["run.iterations=3"])
    assert compare.is_finished(_finish(tmp_path / "c", collapse, 1, collapsed=True).root, collapse)
    retry = load_config(DEMO, ["run.iterations=3", "run.on_collapse=retry_half_lr"])
    run = _finish(tmp_path / "retry", retry, 1, collapsed=True)
    assert not compare.is_finished(run.root, retry)  # the retry has not run yet
    write_json_atomic({"lr_scale": 0.5}, run.retry(0))
    assert compare.is_finished(run.root, retry)


def test_compare_follows_the_pipelines_stop_rule_when_it_changes(tmp_path, monkeypatch):
    """The rule lives in `pipeline.after_iteration` only: change it there and `spin compare`
    sees a run stopped by the new rule as finished, and one the rule continues as not."""
    from spin_core import pipeline

    config = load_config(DEMO, ["run.iterations=3"])
    run = _finish(tmp_path / "run", config, 1)
    assert not compare.is_finished(run.root, config)  # 1 of 3 iterations, nothing stopped it

    def stop_after_the_first(config, run, iteration, metrics):
        return pipeline.Decision("stop", "a new rule")

    monkeypatch.setattr(pipeline, "after_iteration", stop_after_the_first)
    assert compare.is_finished(run.root, config)

    def always_retry(config, run, iteration, metrics):
        return pipeline.Decision("retry", "another rule")

    monkeypatch.setattr(pipeline, "after_iteration", always_retry)
    complete = _finish(tmp_path / "complete", config, 3)
    assert not compare.is_finished(complete.root, config)  # the rule would retry iteration 0


def test_a_run_directory_made_with_another_config_is_refused_before_anything_runs(tmp_path):
    (recipe,) = compare.load_recipes([DEMO])
    planned = compare.plan_runs([recipe], 2, tmp_path)
    compare.refuse_changed_configs(planned)  # nothing there yet
    save_config(
        RunDir(planned[1].run_dir),
        compare.seeded_config(load_config(DEMO, ["training.beta=0.7"]), 1),
    )
    with pytest.raises(
        InputError, match=r"demo/seed-1 was made with a different config \(training.beta"
    ):
        compare.refuse_changed_configs(planned)
    neutral = compare.seeded_config(load_config(DEMO, ["run.sample_rows=2"]), 1)
    save_config(RunDir(planned[1].run_dir), neutral)
    compare.refuse_changed_configs(planned)  # a neutral field: resumed, not refused


# --- compare.md on synthetic runs -----------------------------------------------------------


def _synthetic_run(run_dir: Path, seed: int, iterations: int, baseline: bool) -> None:
    """metrics.parquet and per-prompt eval files as the pipeline writes them."""
    rng = np.random.default_rng(seed + 10 * iterations + 100 * baseline)
    run = RunDir(run_dir)
    rows = []
    for t in range(iterations + 1):
        a, b = _evals(40, rng, 0.3 + 0.02 * seed, 0.5 + 0.1 * t, shift=0.05 * t)
        path = run.theta0() / "eval.parquet" if t == 0 else run.eval_file(t - 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        b.to_parquet(path)
        row = {
            "iteration": t,
            "model_name": f"θ{t}",
            "exact_match": b["exact_match"].mean(),
            "real_loglik_per_token": b["real_logps"].sum() / b["real_tokens"].sum(),
        }
        if baseline and t > 0:
            run.baseline(t - 1).mkdir(parents=True, exist_ok=True)
            a.to_parquet(run.baseline(t - 1) / "eval.parquet")
            row |= {
                "sft_exact_match": a["exact_match"].mean(),
                "sft_real_loglik_per_token": a["real_logps"].sum() / a["real_tokens"].sum(),
            }
        rows.append(row)
    run.root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(run.metrics)


def test_compare_md_holds_every_run_the_intervals_and_the_tests(tmp_path):
    out = tmp_path / "out"
    results = []
    for recipe, baseline, seeds in (("spin-sft", True, (0, 1, 2)), ("plain", False, (0,))):
        for s in seeds:
            run_dir = compare.run_dir_for(out, recipe, s)
            _synthetic_run(run_dir, s, 2, baseline)
            results.append(compare.RunResult(recipe, s, run_dir))
    path, comparison = compare_report.write_compare(
        out, results, missing=["plain/seed-1: failed (boom)"], n_resamples=500
    )
    text = path.read_text()
    assert path == out.resolve() / "compare.md"
    for r in results:
        assert f"| {r.recipe} | {r.seed} | `{r.run_dir}` |" in text
    assert "plain/seed-1: failed (boom)" in text
    assert (out / "plots" / "compare_metrics.png").exists()
    assert "![compare_metrics](plots/compare_metrics.png)" in text

    summary = comparison.summary
    assert list(summary.loc[summary["recipe"] == "spin-sft", "model"]) == [
        "θ0",
        "θ1",
        "SFT baseline 1",
        "θ2",
        "SFT baseline 2",
    ]
    row = summary[(summary["recipe"] == "spin-sft") & (summary["model"] == "θ2")].iloc[0]
    values = [
        pd.read_parquet(compare.run_dir_for(out, "spin-sft", s) / "metrics.parquet")
        .set_index("iteration")
        .loc[2, "exact_match"]
        for s in (0, 1, 2)
    ]
    mean, low, high = sig.mean_interval(values)
    assert (row["exact_match"], row["exact_match_ci_low"], row["exact_match_ci_high"]) == (
        pytest.approx(mean),
        pytest.approx(low),
        pytest.approx(high),
    )
    assert row["n_seeds"] == 3 and row["seeds"] == "0, 1, 2"
    assert row["exact_match_per_seed"] == ", ".join(
        f"{s}: {v:.4f}" for s, v in zip((0, 1, 2), values, strict=True)
    )
    assert f"| spin-sft | θ2 | 3 | {mean:.3f} | {low:.3f} … {high:.3f} |" in text
    plain = summary[(summary["recipe"] == "plain") & (summary["model"] == "θ1")].iloc[0]
    assert plain["n_seeds"] == 1 and math.isnan(plain["exact_match_ci_low"])
    assert "| plain | θ1 | 1 |" in text and "| – |" in text

    # θ1 and θ2 vs their baselines, both metrics, pooled over the three seeds
    tested = [(t.recipe, t.iteration, t.metric, t.seeds) for t in comparison.tests]
    assert tested == [
        ("spin-sft", t, m, [0, 1, 2]) for t in (1, 2) for m in (sig.EXACT_MATCH, sig.REAL_LOGLIK)
    ]
    assert (
        "- spin-sft, θ2 vs SFT baseline 2, real log-lik/token (seeds 0, 1, 2): significantly higher"
        in text
    )
    assert "plain: no SFT baseline (run.baseline: none), nothing to test" in text
    assert "stratified paired bootstrap" in text and "Student-t interval" in text
    rows = comparison.significance_rows()
    assert len(rows) == 4 and {r["seeds"] for r in rows} == {"0, 1, 2"}
    table = pd.read_parquet(out / "compare.parquet")
    assert len(table) == len(summary)


def test_one_seed_says_there_is_no_interval(tmp_path):
    run_dir = compare.run_dir_for(tmp_path, "solo", 0)
    _synthetic_run(run_dir, 0, 1, True)
    path, comparison = compare_report.write_compare(
        tmp_path, [compare.RunResult("solo", 0, run_dir)], n_resamples=200
    )
    text = path.read_text()
    assert "With one seed there is no interval across seeds" in text
    assert "across seeds Δ" not in text  # no t-interval of the per-seed deltas either
    assert "(seeds 0)" in text


def test_artifact_rows_are_plain_values():
    rows = compare_report.artifact_rows(pd.DataFrame({"a": [1.5, float("nan")], "b": ["x", "y"]}))
    assert rows == [{"a": 1.5, "b": "x"}, {"a": None, "b": "y"}]
    json.dumps(rows)


@pytest.fixture
def sigterm_restored():
    """main() installs a SIGTERM handler; the test process gets its own back."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.yaml"], "missing.yaml: config file not found"),
        ([str(DEMO), "--seeds", "0"], "seeds must be at least 1"),
        ([str(DEMO), "--max-parallel", "0"], "--max-parallel must be at least 1"),
        ([str(DEMO), "--set", "training.beta=-1"], "training.beta"),
        ([str(DEMO), str(DEMO)], "demo appears more than once"),
    ],
)
def test_compare_refuses_bad_arguments_before_anything_runs(
    args, message, tmp_path, capsys, sigterm_restored
):
    from flows.cli import main

    assert main(["compare", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- the flow on the toy model --------------------------------------------------------------

TINY = {
    "data.eval_size": 20,
    "run.iterations": 1,
    "training.global_batch_size": 16,
    "training.micro_batch_size": 8,
    "training.num_epochs": 1,
    "generation.max_new_tokens": 16,
}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Two recipe files: the demo with its SFT baseline, and 3× its learning rate without one."""
    folder = tmp_path_factory.mktemp("recipes")
    demo = yaml.safe_load(DEMO.read_text())
    sft = folder / "with-sft.yaml"
    sft.write_text(yaml.safe_dump(demo | {"run": demo["run"] | {"baseline": "sft"}}))
    faster = folder / "lr-3x.yaml"
    faster.write_text(
        yaml.safe_dump(
            demo
            | {
                "run": demo["run"] | {"baseline": "none"},
                "training": demo["training"] | {"learning_rate": 3.0e-5},
            }
        )
    )
    return [str(sft), str(faster)]


def _pids(run_dir: Path) -> frozenset[int]:
    """The processes that ran the run's steps (its steps.jsonl journal)."""
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return frozenset(json.loads(line)["pid"] for line in lines if line.strip())


def _report_stamps(out: Path) -> dict[Path, int]:
    return {p.parent: p.stat().st_mtime_ns for p in out.glob("*/seed-*/report.md")}


@pytest.fixture(scope="module")
def first_compare(harness, toy_build, recipes, tmp_path_factory):
    from flows.compare import spin_compare

    out = tmp_path_factory.mktemp("compare") / "out"
    path = spin_compare(
        recipes,
        seeds=2,
        out_dir=str(out),
        max_parallel=1,
        overrides=overrides(toy_build, TINY),
    )
    return out, Path(path)


@pytest.mark.slow
def test_two_recipes_two_seeds_run_in_their_own_directories(first_compare):
    out, path = first_compare
    assert path == out.resolve() / "compare.md"
    stamps = _report_stamps(out)
    assert sorted(p.relative_to(out) for p in stamps) == [
        Path(f"{r}/seed-{k}") for r in ("lr-3x", "with-sft") for k in (0, 1)
    ]
    for run_dir in stamps:
        config = yaml.safe_load((run_dir / "spin.yaml").read_text())
        k = int(run_dir.name.removeprefix("seed-"))
        assert config["data"]["seed"] == config["generation"]["seed"] == k
        assert config["training"]["seed"] == k and config["toy"]["seed"] == 0
        assert (run_dir / "iter_0" / "eval.parquet").exists()
        assert (run_dir / "iter_0" / "baseline" / "eval.parquet").exists() == (
            run_dir.parent.name == "with-sft"
        )
        assert not (run_dir / ".lock").exists()
    # Seed k draws the same held-out prompts in both recipes, and θ0 is shared: the same
    # θ0 evaluation; another seed draws other prompts.
    theta0 = {d: pd.read_parquet(d / "theta0" / "eval.parquet") for d in stamps}
    for k in (0, 1):
        a, b = (theta0[out.resolve() / r / f"seed-{k}"] for r in ("with-sft", "lr-3x"))
        pd.testing.assert_frame_equal(a[["id", "generated"]], b[["id", "generated"]])
    seed_0, seed_1 = (theta0[out.resolve() / "with-sft" / f"seed-{k}"] for k in (0, 1))
    assert set(seed_0["id"]) != set(seed_1["id"])
    # max_parallel 1: one run after another, in this process
    assert {_pids(d) for d in stamps} == {frozenset({os.getpid()})}
    text = path.read_text()
    for run_dir in stamps:
        assert f"`{run_dir}`" in text
    assert "with-sft, θ1 vs SFT baseline 1, exact match (seeds 0, 1)" in text
    assert "lr-3x: no SFT baseline" in text


@pytest.mark.slow
def test_a_third_seed_runs_only_the_two_new_runs(
    first_compare, toy_build, recipes, sigterm_restored
):
    from prefect.artifacts import Artifact

    from flows.cli import main

    out, path = first_compare
    before = _report_stamps(out)
    journals = {d: (d / "steps.jsonl").read_text() for d in before}
    sets = set_args(overrides(toy_build, TINY))
    # The two new runs at once, each in a worker process.
    args = ["compare", *recipes, "--seeds", "3", "--out", str(out), "--max-parallel", "2"]
    assert main([*args, *sets]) == 0
    after = _report_stamps(out)
    fresh = sorted(d.relative_to(out) for d in after if before.get(d) != after[d])
    assert fresh == [Path("lr-3x/seed-2"), Path("with-sft/seed-2")]
    assert {d: (d / "steps.jsonl").read_text() for d in before} == journals  # untouched
    new = [out.resolve() / f for f in fresh]
    pids = [_pids(d) for d in new]
    assert all(len(p) == 1 and os.getpid() not in p for p in pids) and pids[0] != pids[1]

    text = path.read_text()
    for run_dir in after:
        assert f"`{run_dir}`" in text
    assert "with-sft, θ1 vs SFT baseline 1, exact match (seeds 0, 1, 2)" in text
    summary = json.loads(Artifact.get("spin-compare").data)
    models = {(r["recipe"], r["model"]) for r in summary}
    assert models == {
        ("with-sft", "θ0"),
        ("with-sft", "θ1"),
        ("with-sft", "SFT baseline 1"),
        ("lr-3x", "θ0"),
        ("lr-3x", "θ1"),
    }
    assert {r["seeds"] for r in summary} == {"0, 1, 2"}
    table = pd.read_parquet(out / "compare.parquet")
    for row in summary:
        match = table[(table["recipe"] == row["recipe"]) & (table["model"] == row["model"])]
        assert row["exact_match"] == pytest.approx(match["exact_match"].iloc[0])
        assert row["exact_match_ci_low"] is not None
    runs = json.loads(Artifact.get("spin-compare-runs").data)
    assert sorted((r["recipe"], r["seed"], r["this_run"]) for r in runs) == sorted(
        [(r, k, "reused") for r in ("with-sft", "lr-3x") for k in (0, 1)]
        + [(r, 2, "ran") for r in ("with-sft", "lr-3x")]
    )
    tests = json.loads(Artifact.get("spin-compare-significance").data)
    assert {(r["recipe"], r["metric"], r["seeds"]) for r in tests} == {
        ("with-sft", sig.EXACT_MATCH, "0, 1, 2"),
        ("with-sft", sig.REAL_LOGLIK, "0, 1, 2"),
    }


def test_recipes_on_the_embedded_default_share_one_build(tmp_path):
    """θ0 is built once per distinct toy section, in OUT/toy/, not once per run."""
    recipes = compare.load_recipes(
        [DEMO, "configs/regime/spin.yaml", "configs/regime/spin-sft.yaml"], []
    )
    dirs = {r.name: compare.shared_toy_dir(r.config, tmp_path) for r in recipes}
    assert dirs["spin"] == dirs["spin-sft"] != dirs["demo"]  # same toy section, one build
    assert all(d.parent == (tmp_path / "toy").resolve() for d in dirs.values())
    shared = compare.with_shared_toy(recipes[1], dirs["spin"])
    assert shared.config.model.name_or_path == str(dirs["spin"] / "theta0")
    assert shared.config.data.dataset == str(dirs["spin"] / "data" / "train.parquet")
    assert shared.config.data.eval_dataset == str(dirs["spin"] / "data" / "eval.parquet")
    assert shared.config.training == recipes[1].config.training
    own = load_config(DEMO, ["model.name_or_path=/models/mine", "data.dataset=/data/mine.parquet"])
    assert compare.shared_toy_dir(own, tmp_path) is None


def test_parallel_runs_get_their_own_gpus(monkeypatch):
    """max_parallel K > 1: each worker process sees its share of the GPUs, not all of cuda:0."""
    import multiprocessing

    import torch

    from flows.compare import _one_rank_worker, gpu_shares

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert gpu_shares(2) == ["0,1,2,3", "4,5,6,7"]
    assert gpu_shares(3) == ["0,1", "2,3", "4,5"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpu_shares(2) == ["0", "0"]  # fewer GPUs than runs: they share
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert gpu_shares(2) == [None, None]  # no GPU: the variable is left alone
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert gpu_shares(2) == ["3", "5"]  # the GPUs this process was given

    # What a worker process's initializer does with its share.
    shares = multiprocessing.get_context("spawn").Queue()
    shares.put("5")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, "0")  # restored after the test
    _one_rank_worker(shares)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["RANK"] == os.environ["LOCAL_RANK"] == "0"


def test_the_real_model_sft_anchor_recipe_differs_only_in_its_anchor(tmp_path):
    """docs/EXPERIMENTS.md compares configs/smollm2-chat.yaml with its SFT-anchored variant:
    the two differ in training.sft_weight (and the run name) alone, and share one θ0."""
    spin, anchored = compare.load_recipes(
        ["configs/smollm2-chat.yaml", "configs/smollm2-chat-sft-anchor.yaml"], []
    )
    a, b = spin.config.model_dump(mode="json"), anchored.config.model_dump(mode="json")
    assert (a["training"]["sft_weight"], b["training"]["sft_weight"]) == (0.0, 1.0)
    for dump in (a, b):
        dump["training"].pop("sft_weight"), dump["run"].pop("name")
    assert a == b
    assert compare.shared_toy_dir(spin.config, tmp_path) == compare.shared_toy_dir(
        anchored.config, tmp_path
    )
