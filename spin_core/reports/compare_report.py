"""compare.md, its plot and compare.parquet: a comparison (spin_core/reports/compare.py) as a
reader sees it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spin_core.reports import report  # noqa: E402
from spin_core.reports import significance as sig  # noqa: E402
from spin_core.reports.compare import (  # noqa: E402
    METRICS,
    SFT,
    SPIN,
    PooledComparison,
    RecipeComparison,
    RunResult,
    compare_runs,
)
from spin_core.storage.files import write_parquet_atomic, write_text_atomic  # noqa: E402


def _value(metric: str, value: float) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.3f}" if metric == sig.EXACT_MATCH else f"{value:.4f}"


def _interval(metric: str, low: float, high: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return "–"
    return f"{_value(metric, low)} … {_value(metric, high)}"


def summary_table(summary: pd.DataFrame) -> str:
    lines = [
        "| recipe | model | seeds | exact match | 95% interval | real log-lik/token | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, row in summary.iterrows():
        cells = [row["recipe"], row["model"], str(row["n_seeds"])]
        for metric in METRICS:
            cells += [
                _value(metric, row[metric]),
                _interval(metric, row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(comparison: RecipeComparison) -> str:
    lines = [
        "| recipe | seed | run directory | models | exact match (last θ) | real log-lik/token (last θ) |",
        "|---|---|---|---|---|---|",
    ]
    values = comparison.values
    for r in comparison.results:
        mine = values[(values["recipe"] == r.recipe) & (values["seed"] == r.seed)]
        spin = mine[mine["kind"] == SPIN].sort_values("iteration")
        last = spin.iloc[-1] if len(spin) else None
        lines.append(
            f"| {r.recipe} | {r.seed} | `{r.run_dir}` | {', '.join(mine['model'])} | "
            + (
                f"{_value(sig.EXACT_MATCH, last[sig.EXACT_MATCH])} ({last['model']}) | "
                f"{_value(sig.REAL_LOGLIK, last[sig.REAL_LOGLIK])} |"
                if last is not None
                else "– | – |"
            )
        )
    return "\n".join(lines)


def _seed_phrase(test: PooledComparison) -> str:
    unit = sig.UNITS[test.metric]
    parts = [
        f"seed {s} {sig.direction(test.per_seed[s])} (Δ {sig.signed(test.per_seed[s].delta, unit)})"
        for s in test.seeds
    ]
    text = "; ".join(parts)
    mean, low, high = test.across
    if np.isfinite(low):
        text += (
            f"; across seeds Δ {sig.signed(mean, unit)}, 95% t-interval "
            f"{sig.signed(low, unit)}…{sig.signed(high, unit)}"
        )
    return text


def compare_markdown(
    comparison: RecipeComparison, *, title: str, plots: Sequence[Path] = ()
) -> str:
    results = comparison.results
    recipes = list(dict.fromkeys(r.recipe for r in results))
    seeds = sorted({r.seed for r in results})
    lines = [f"# SPIN comparison: {title}", ""]
    lines += [
        f"{len(recipes)} recipe(s) ({', '.join(recipes) or 'none'}) × seeds "
        f"{', '.join(map(str, seeds)) or 'none'}: {len(results)} finished run(s). "
        "Seed k sets data.seed, generation.seed and training.seed to k (the same k draws the "
        "same training and held-out prompts, sampling seeds and data order in every recipe); "
        "toy.seed is unchanged, so the embedded default's data and θ0 are shared by every run.",
        "",
    ]
    if comparison.missing:
        lines += ["Not finished, left out:", ""]
        lines += [f"- {m}" for m in comparison.missing] + [""]
    lines += ["## Runs", "", runs_table(comparison), ""]
    lines += ["## Held-out metrics per iteration over seeds", ""]
    if len(seeds) < 2:
        interval_text = "With one seed there is no interval across seeds (shown as –)."
    else:
        interval_text = (
            "The 95% interval is the Student-t interval of the mean over seeds, "
            "mean ± t(0.975, n−1)·s/√n with n the seeds that reached that model: "
            "it measures seed-to-seed variation (training, sampling, and which prompts are "
            "drawn for training and for the held-out set); – where only one seed has the model."
        )
    lines += [
        f"Mean over seeds of each model's held-out metrics. {interval_text} θ0 is shared by "
        "SPIN and its SFT baseline; SFT baseline t is continued SFT with θt's optimizer steps "
        "and learning rate.",
        "",
    ]
    if len(comparison.summary):
        lines += [summary_table(comparison.summary), ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "## SPIN vs continued SFT", ""]
    if comparison.tests:
        lines += [
            "For every recipe with an SFT baseline: θt against SFT baseline t, paired over the "
            "held-out prompts within each seed and pooled over seeds. Pooled Δ = the mean over "
            "seeds of each seed's Δ (model − baseline); its 95% CI is a stratified paired "
            f"bootstrap ({comparison.n_resamples:,} resamples: within each seed its prompts are "
            "drawn with replacement, both models' results on a prompt together). For exact "
            "match, McNemar's exact test counts the discordant prompts of all seeds together. "
            "Significant as in the run reports: the CI excludes 0 and, for exact match, also "
            "p < 0.05. This pooled test is conditional on the trained seeds (prompt noise); "
            "each seed's own verdict and, with two or more seeds, the t-interval of the "
            "per-seed Δ (seed-to-seed variation) are given after it. Exact match in "
            "percentage points, real log-lik/token in nats.",
            "",
        ]
        for test in comparison.tests:
            verdict = sig.verdict(test.pooled, unit=sig.UNITS[test.metric])
            lines.append(
                f"- {test.recipe}, {test.pooled.name}, {METRICS[test.metric]} "
                f"(seeds {', '.join(map(str, test.seeds))}): {verdict}. Per seed: "
                f"{_seed_phrase(test)}."
            )
        lines.append("")
    lines += [f"- {note}" for note in comparison.notes]
    if not comparison.tests and not comparison.notes:
        lines.append("No runs to compare.")
    return "\n".join(lines).rstrip() + "\n"


def plot_comparison(comparison: RecipeComparison, out_dir: Path) -> list[Path]:
    """plots/compare_metrics.png: exact match and real log-lik per iteration, one colour
    per recipe (SPIN solid, its SFT baseline dashed), error bars the across-seed interval."""
    summary = comparison.summary
    if not len(summary):
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    recipes = list(dict.fromkeys(summary["recipe"]))
    series = [(r, k) for r in recipes for k in (SPIN, SFT)]
    width = 0.3 / max(1, len(series))
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, (recipe, kind) in enumerate(series):
            rows = summary[(summary["recipe"] == recipe) & (summary["kind"] == kind)]
            if not len(rows):
                continue
            if kind == SFT:  # the baseline starts from the shared θ0
                theta0 = summary[
                    (summary["recipe"] == recipe)
                    & (summary["kind"] == SPIN)
                    & (summary["iteration"] == 0)
                ]
                rows = pd.concat([theta0, rows]).sort_values("iteration")
            rows = rows.sort_values("iteration")
            x = rows["iteration"].to_numpy() + (i - (len(series) - 1) / 2) * width
            y = rows[metric].to_numpy()
            low, high = rows[f"{metric}_ci_low"], rows[f"{metric}_ci_high"]
            yerr = np.vstack(
                [(y - low).clip(lower=0).fillna(0), (high - y).clip(lower=0).fillna(0)]
            )
            color = f"C{recipes.index(recipe) % 10}"
            style = (
                {"marker": "o", "linestyle": "-"}
                if kind == SPIN
                else {"marker": "s", "linestyle": "--"}
            )
            label = recipe if kind == SPIN else f"{recipe} (SFT baseline)"
            ax.errorbar(x, y, yerr=yerr, capsize=3, color=color, label=label, **style)
        ax.set_title(f"{METRICS[metric]} (mean over seeds, 95% interval)", fontsize=9)
        ax.set_xlabel("model θt / SFT baseline t")
        ax.set_xticks(sorted(set(summary["iteration"])))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return [report.save_figure(fig, out_dir / "compare_metrics.png")]


def write_compare(
    out_dir: str | Path,
    results: Sequence[RunResult],
    *,
    missing: Sequence[str] = (),
    n_resamples: int = sig.N_RESAMPLES,
) -> tuple[Path, RecipeComparison]:
    """Write OUT/compare.md, OUT/plots/compare_metrics.png and OUT/compare.parquet (the
    summary table); returns (compare.md, the comparison)."""
    out = Path(out_dir).expanduser().resolve()
    comparison = compare_runs(results, missing=missing, n_resamples=n_resamples)
    plots = plot_comparison(comparison, out / "plots")
    if len(comparison.summary):
        write_parquet_atomic(comparison.summary, out / "compare.parquet")
    text = compare_markdown(comparison, title=out.name, plots=plots)
    path = out / "compare.md"
    write_text_atomic(text, path)
    return path, comparison


def artifact_rows(frame: pd.DataFrame | list[dict]) -> list[dict]:
    """Rows for a Prefect table artifact: plain Python values, NaN as None."""
    frame = pd.DataFrame(frame)
    if not len(frame):
        return []
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
