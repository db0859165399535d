"""report.md and metrics.parquet from a run directory of small hand-made evaluation files."""

import json

import numpy as np
import pandas as pd
import pytest

from spin_core.reports.report import write_report
from spin_core.storage.files import write_json_atomic
from spin_core.storage.rundir import RunDir

N = 40
IDS = [f"p{i:02d}" for i in range(N)]
TOKENS = np.full(N, 10)


def write_eval(directory, right: int, loglik_per_token: float) -> dict:
    """eval.parquet where the first `right` prompts are exact matches; returns metrics.json."""
    exact = np.arange(N) < right
    frame = pd.DataFrame(
        {
            "id": IDS,
            "prompt": [f"prompt {i}" for i in range(N)],
            "real": [f"real {i}" for i in range(N)],
            "generated": [f"real {i}" if e else "other" for i, e in enumerate(exact)],
            "exact_match": exact,
            "real_logps": loglik_per_token * TOKENS,
            "real_tokens": TOKENS,
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(directory / "eval.parquet")
    metrics = {
        "eval_pairs": N,
        "exact_match": right / N,
        "real_loglik_per_token": loglik_per_token,
    }
    write_json_atomic(metrics, directory / "metrics.json")
    return metrics


@pytest.fixture
def run(tmp_path) -> RunDir:
    """θ0 right on 20 prompts; θ1 on 32 (b01 = 12); its SFT baseline on 21 (b01 = 1);
    θ2 from an older run with metrics.json but no eval.parquet."""
    run = RunDir(tmp_path / "run")
    write_eval(run.theta0(), right=20, loglik_per_token=-1.0)
    theta1 = write_eval(run.iteration(0), right=32, loglik_per_token=-0.9)
    theta1 |= {"margin": 0.3, "reward_accuracy": 0.8, "collapsed": False}
    write_json_atomic(theta1, run.iteration_metrics(0))
    write_eval(run.baseline(0), right=21, loglik_per_token=-1.0)
    write_json_atomic(theta1 | {"exact_match": 0.5}, run.iteration_metrics(1))
    return run


def test_report_states_significance_from_files(run):
    path, metrics = write_report(run.root)
    text = path.read_text()
    section = text.split("## Significance", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert lines[0].startswith(
        "- θ1 vs θ0, exact match: significantly higher (Δ +30.0 points, 95% CI +"
    )
    assert lines[0].endswith(", McNemar p < 0.001)")  # 2·2^-12
    assert lines[1] == (
        "- θ1 vs θ0, real log-lik/token: significantly higher "
        "(Δ +0.100 nats/token, 95% CI +0.100…+0.100)"
    )
    assert lines[2].startswith(
        "- SFT baseline 1 vs θ0, exact match: no significant difference (Δ +2.5 points, 95% CI 0.0…"
    )
    assert lines[2].endswith(", McNemar p = 1.000)")  # one discordant prompt
    assert lines[3] == (
        "- SFT baseline 1 vs θ0, real log-lik/token: no significant difference "
        "(Δ 0.000 nats/token, 95% CI 0.000…0.000)"
    )
    assert lines[4].startswith("- θ1 vs SFT baseline 1, exact match: significantly higher (Δ +27.5")
    assert lines[5].startswith("- θ1 vs SFT baseline 1, real log-lik/token: significantly higher")
    # θ2 has no eval.parquet: skipped, and said so
    assert lines[6] == "- θ2 vs θ0: not compared (no per-prompt evaluation eval.parquet for θ2)"
    assert len(lines) == 7
    verdict = text.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "raised" not in verdict and "lowered" not in verdict
    assert "to 0.500 (θ2); not tested for significance" in verdict
    assert (run.plots / "metrics_per_iteration.png").exists()


def test_metrics_parquet_has_the_significance_columns(run):
    write_report(run.root)
    metrics = pd.read_parquet(run.metrics).set_index("iteration")
    theta0, theta1, theta2 = metrics.loc[0], metrics.loc[1], metrics.loc[2]
    assert theta1["exact_match_delta_vs_theta0"] == pytest.approx(12 / 40)
    assert theta1["exact_match_p_vs_theta0"] == pytest.approx(2 / 2**12)
    assert theta1["exact_match_ci_low_vs_theta0"] < 0.3 < theta1["exact_match_ci_high_vs_theta0"]
    assert theta1["real_loglik_delta_vs_theta0"] == pytest.approx(0.1)
    assert theta1["real_loglik_ci_low_vs_theta0"] == pytest.approx(0.1)
    assert theta1["sft_exact_match_delta_vs_theta0"] == pytest.approx(1 / 40)
    assert theta1["sft_exact_match_p_vs_theta0"] == 1.0
    assert theta1["sft_real_loglik_delta_vs_theta0"] == 0.0
    assert theta1["exact_match_delta_vs_sft"] == pytest.approx(11 / 40)
    assert theta1["exact_match_p_vs_sft"] == pytest.approx(2 / 2**11)
    assert theta1["real_loglik_delta_vs_sft"] == pytest.approx(0.1)
    # each model's own exact-match interval, the plots' error bars
    for row, prefix, mean in ((theta0, "", 0.5), (theta1, "", 0.8), (theta1, "sft_", 21 / 40)):
        assert row[f"{prefix}exact_match_ci_low"] < mean < row[f"{prefix}exact_match_ci_high"]
    assert pd.isna(theta0["exact_match_delta_vs_theta0"])
    assert theta2[["exact_match_delta_vs_theta0", "exact_match_ci_low"]].isna().all()
    assert json.loads(run.iteration_metrics(1).read_text())["exact_match"] == 0.5


def test_report_without_any_eval_parquet_still_builds(run):
    for path in run.root.rglob("eval.parquet"):
        path.unlink()
    path, metrics = write_report(run.root)
    text = path.read_text()
    assert "θ1 vs θ0: not compared (no per-prompt evaluation eval.parquet for θ0)" in text
    assert "not tested for significance" in text
    assert not any(c.endswith("_vs_theta0") for c in metrics.columns)


def test_the_report_prints_counts_as_integers_and_plots_whole_models(run):
    """ "train pairs 47.0000" and "lr scale 1.0000" read as measurements, not counts; the x axis
    had ticks at θ0.5 and θ1.5."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from spin_core.reports import report

    for t in (0, 1):
        metrics = json.loads(run.iteration_metrics(t).read_text())
        metrics |= {"train_pairs": 47, "lr_scale": 1.0 if t == 0 else 0.5, "unhealthy_checks": 0}
        write_json_atomic(metrics, run.iteration_metrics(t))
    path, _ = write_report(run.root)
    table = path.read_text().split("## Held-out metrics per model", 1)[1].split("\n## ", 1)[0]
    header, _, _, theta1, theta2 = [r for r in table.splitlines() if r.startswith("|")][:5]
    cells = dict(zip(header.split("|"), theta1.split("|"), strict=True))
    assert cells[" train pairs "].strip() == "47" and cells[" lr scale "].strip() == "1"
    assert dict(zip(header.split("|"), theta2.split("|"), strict=True))[" lr scale "] == " 0.5 "

    ticks = []
    real_save = report.save_figure

    def keep_ticks(fig, out):
        ticks.extend(
            [t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes if ax.get_xticklabels()
        )
        return real_save(fig, out)

    report.save_figure = keep_ticks
    try:
        write_report(run.root)
    finally:
        report.save_figure = real_save
        plt.close("all")
    assert ticks and all(labels == ["θ0", "θ1", "θ2"] for labels in ticks[:1])


def test_the_report_artifact_carries_its_plots_inline(run):
    """The Prefect UI shows the report from its own server: `plots/x.png` would not load."""
    import base64
    import re

    from spin_core.reports.report import embed_images

    path, _ = write_report(run.root)
    text = path.read_text()
    assert "](plots/metrics_per_iteration.png)" in text  # the file on disk links the files
    inline = embed_images(text, path.parent)
    assert "](plots/" not in inline
    images = re.findall(r"!\[([^\]]*)\]\(data:image/png;base64,([^)]+)\)", inline)
    assert {name for name, _ in images} >= {"metrics_per_iteration"}
    for _, data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
