"""metrics.parquet and report.md (with plots) from a run directory.

The report is rebuilt from files alone, so `spin report RUN_DIR` works on any
run, finished or not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from spin_core import lm_eval  # noqa: E402
from spin_core.reports import significance as sig  # noqa: E402
from spin_core.storage.files import atomic_path, write_parquet_atomic, write_text_atomic  # noqa: E402
from spin_core.storage.rundir import RunDir  # noqa: E402

COLUMNS = [
    (sig.EXACT_MATCH, sig.LABELS[sig.EXACT_MATCH]),
    ("sft_exact_match", "SFT baseline exact match"),
    ("sft_real_loglik_per_token", "SFT baseline log-lik/token"),
    (sig.REAL_LOGLIK, sig.LABELS[sig.REAL_LOGLIK]),
    ("reward_accuracy", "reward acc. (differing pairs)"),
    ("ties", "ties (y' = y)"),
    ("margin", "margin"),
    ("train_loss", "train loss"),
    ("identical_fraction", "identical pairs"),
    ("train_pairs", "train pairs"),
    ("unhealthy_checks", "unhealthy checks"),
    ("lr_scale", "lr scale"),
    ("weights_changed", "weights changed vs θt"),
    ("weights_changed_as_computed", "… in the compute dtype"),
]


def collect_metrics(run: RunDir) -> pd.DataFrame:
    """One row per evaluated model: iteration 0 is θ0, iteration t+1 the model of iter_t."""
    rows = []
    base = run.base_evaluation().metrics
    if base.exists():
        row = {"iteration": 0, "model_name": "θ0", **json.loads(base.read_text())}
        rows.append(row | _lm_eval_columns(run.theta0()))
    for t in run.finished_iterations():
        metrics = json.loads(run.iteration_metrics(t).read_text())
        row = {"iteration": t + 1, "model_name": f"θ{t + 1}", **metrics}
        row |= _lm_eval_columns(run.iteration(t))
        baseline = run.baseline_evaluation(t).metrics
        if baseline.exists():
            row |= {f"sft_{k}": v for k, v in json.loads(baseline.read_text()).items()}
        rows.append(row)
    frame = pd.DataFrame(rows)
    for prefix in ("", "sft_"):
        if f"{prefix}exact_match_by_group" in frame:
            column = frame.pop(f"{prefix}exact_match_by_group")
            groups = pd.json_normalize(
                column.map(lambda d: d if isinstance(d, dict) else {}).tolist()
            )
            frame = pd.concat([frame, groups.add_prefix(f"{prefix}exact_match/")], axis=1)
    return frame


def _lm_eval_columns(eval_dir: Path) -> dict:
    """The lm_eval/<task>/<metric> columns from eval_dir/lm_eval.json (eval.lm_eval), if any."""
    try:
        return lm_eval.columns(json.loads((eval_dir / lm_eval.RESULT_FILE).read_text()))
    except (OSError, ValueError, AttributeError):
        return {}


def step_logs(run: RunDir) -> pd.DataFrame:
    frames = []
    t = 0
    while run.iteration(t).exists():
        log = run.step_log(t)
        if log.exists() and log.stat().st_size:
            frames.append(pd.read_json(log, lines=True))
        t += 1
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@dataclass(frozen=True)
class EvaluatedModel:
    """A model with held-out metrics: its metrics.parquet row (iteration), column prefix,
    name in the report, and per-prompt evaluation file."""

    iteration: int
    prefix: str  # "" for θ0 and the SPIN models, "sft_" for the continued-SFT baselines
    name: str
    eval_path: Path


def baseline_name(iteration: int) -> str:
    """The continued-SFT baseline trained for the same optimizer steps as θ<iteration>."""
    return f"SFT baseline {iteration}"


def evaluated_models(run: RunDir) -> list[EvaluatedModel]:
    """θ0, then per iteration t: θ(t+1) and the SFT baseline trained for the same steps."""
    models = []
    if run.base_evaluation().metrics.exists():
        models.append(EvaluatedModel(0, "", "θ0", run.base_evaluation().eval))
    for t in run.finished_iterations():
        models.append(EvaluatedModel(t + 1, "", f"θ{t + 1}", run.eval_file(t)))
        baseline = run.baseline_evaluation(t)
        if baseline.metrics.exists():
            models.append(EvaluatedModel(t + 1, "sft_", baseline_name(t + 1), baseline.eval))
    return models


# metrics.parquet column stem of each compared metric
COLUMN_STEMS = {sig.EXACT_MATCH: "exact_match", sig.REAL_LOGLIK: "real_loglik"}
THETA0, SFT = "theta0", "sft"  # column suffixes: _vs_theta0, _vs_sft


@dataclass
class Significance:
    """Paired comparisons of a run's models, recomputed from their eval.parquet files."""

    comparisons: list[sig.Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # comparisons not made, and why
    rows: dict[int, dict] = field(default_factory=dict)  # iteration → metrics.parquet columns
    n_resamples: int = 10_000

    def find(self, model: str, reference: str, metric: str) -> sig.Comparison | None:
        key = (model, reference, metric)
        return next((c for c in self.comparisons if (c.model, c.reference, c.metric) == key), None)

    def columns(self) -> pd.DataFrame:
        return pd.DataFrame([{"iteration": t, **row} for t, row in sorted(self.rows.items())])


def _read_eval(model: EvaluatedModel) -> pd.DataFrame | str:
    """The columns of eval.parquet that comparisons need, or why it cannot be read."""
    if not model.eval_path.exists():
        return f"no per-prompt evaluation {model.eval_path.name} for {model.name}"
    try:
        names = pq.read_schema(model.eval_path).names
        return pd.read_parquet(model.eval_path, columns=[c for c in sig.EVAL_COLUMNS if c in names])
    except (OSError, ValueError, pa.ArrowException) as exc:
        return f"{model.eval_path} is unreadable ({str(exc).splitlines()[0]})"


def significance_tests(run: RunDir, *, n_resamples: int = 10_000, seed: int = 0) -> Significance:
    """Every model vs θ0, each SPIN θt vs the SFT baseline of the same iteration, and each
    model's own 95% exact-match interval (percentile bootstrap of the mean).

    Columns per metrics.parquet row, for stem exact_match / real_loglik:
    {prefix}{stem}_delta_vs_theta0, _ci_low_vs_theta0, _ci_high_vs_theta0 (+ _p_ for exact
    match), the same with _vs_sft for θt − SFT baseline, and {prefix}exact_match_ci_low/high.
    Models without a readable, pairable eval.parquet are skipped with a note.
    """
    result = Significance(n_resamples=n_resamples)
    resampling = {"n_resamples": n_resamples, "seed": seed}
    models = evaluated_models(run)
    frames = {m.name: _read_eval(m) for m in models}
    for model in models:
        frame = frames[model.name]
        if isinstance(frame, pd.DataFrame) and "exact_match" in frame and len(frame):
            _, low, high = sig.bootstrap_mean_ci(frame["exact_match"].astype(bool), **resampling)
            result.rows.setdefault(model.iteration, {}).update(
                {
                    f"{model.prefix}exact_match_ci_low": low,
                    f"{model.prefix}exact_match_ci_high": high,
                }
            )

    def compare(model: EvaluatedModel, reference: EvaluatedModel, against: str) -> None:
        name = f"{model.name} vs {reference.name}"
        for frame in (frames[reference.name], frames[model.name]):
            if isinstance(frame, str):
                result.notes.append(f"{name}: not compared ({frame})")
                return
        try:
            comparisons = sig.compare_models(
                frames[reference.name],
                frames[model.name],
                base_name=reference.name,
                other_name=model.name,
                **resampling,
            )
        except ValueError as exc:
            result.notes.append(f"{name}: not compared ({exc})")
            return
        result.comparisons += comparisons
        row = result.rows.setdefault(model.iteration, {})
        for c in comparisons:
            stem = model.prefix + COLUMN_STEMS[c.metric]
            row |= {
                f"{stem}_delta_vs_{against}": c.delta,
                f"{stem}_ci_low_vs_{against}": c.low,
                f"{stem}_ci_high_vs_{against}": c.high,
            }
            if c.p_value is not None:
                row[f"{stem}_p_vs_{against}"] = c.p_value

    if not models or models[0].name != "θ0":
        return result
    theta0 = models[0]
    spin = {m.iteration: m for m in models[1:] if not m.prefix}
    for model in models[1:]:
        compare(model, theta0, THETA0)
        if model.prefix == "sft_" and model.iteration in spin:
            compare(spin[model.iteration], model, SFT)
    return result


def with_significance(metrics: pd.DataFrame, result: Significance) -> pd.DataFrame:
    """metrics with the significance columns of each row's models (NaN where not compared)."""
    columns = result.columns()
    if not len(metrics) or not len(columns):
        return metrics
    return metrics.merge(columns, on="iteration", how="left")


def significance_section(result: Significance) -> list[str]:
    """The report's Significance section: one verdict line per comparison and metric."""
    lines = ["## Significance", ""]
    if not result.comparisons and not result.notes:
        return lines + ["No per-prompt evaluations (eval.parquet) to compare.", ""]
    n = {c.n for c in result.comparisons}
    prompts = f"the same {n.pop()} held-out prompts" if len(n) == 1 else "the same held-out prompts"
    lines += [
        "Each model against θ0, and each SPIN model θt against the continued-SFT baseline "
        f"trained for the same optimizer steps (SFT baseline t), paired over {prompts}. "
        f"Δ = model − reference; the 95% CI is a percentile bootstrap over prompts "
        f"({result.n_resamples:,} resamples); McNemar's exact test counts the prompts "
        "where only one of the two models is right. A difference is significant when the "
        "CI excludes 0 and, for exact match, also p < 0.05. Exact match in percentage "
        "points; real log-lik/token = Σ real log-probs / Σ real tokens, in nats.",
        "",
    ]
    lines += [
        f"- {c.name}, {sig.LABELS[c.metric]}: {sig.verdict(c, unit=sig.UNITS[c.metric])}"
        for c in result.comparisons
    ]
    lines += [f"- {note}" for note in result.notes]
    return lines + [""]


PROVENANCE_COLUMNS = [
    ("model_name", "model"),
    ("model_fingerprint", "fingerprint"),
    ("generation_backend", "generation backend"),
    ("torch_version", "torch"),
    ("transformers_version", "transformers"),
    ("deepspeed_version", "DeepSpeed"),
]


def provenance_section(metrics: pd.DataFrame) -> list[str]:
    """Which weights, generator and library versions produced each row (reproducibility)."""
    if "model_fingerprint" not in metrics:
        return []
    note = "Fingerprints: spin_core/storage/provenance.py (a model directory's files, weights by edges)."
    return ["## Provenance", "", markdown_table(metrics, PROVENANCE_COLUMNS), "", note, ""]


# Columns that count things (a float column only because other rows lack them) and a factor:
# printed as 47 and 0.5, not 47.0000 and 0.5000.
COUNT_COLUMNS = {"train_pairs", "train_steps", "unhealthy_checks"}
FACTOR_COLUMNS = {"lr_scale"}


def _fmt(value, key: str = "") -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in COUNT_COLUMNS and float(value).is_integer():
        return str(int(value))
    if key in FACTOR_COLUMNS:
        return f"{float(value):g}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, columns: list[tuple[str, str]]) -> str:
    present = [(key, label) for key, label in columns if key in frame]
    lines = ["| " + " | ".join(label for _, label in present) + " |"]
    lines.append("|" + "---|" * len(present))
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[key], key) for key, _ in present) + " |")
    return "\n".join(lines)


def metrics_table(metrics: pd.DataFrame) -> str:
    columns = [("model_name", "model")] + COLUMNS + [("collapsed", "collapsed")]
    return markdown_table(metrics, columns)


def group_table(metrics: pd.DataFrame) -> str | None:
    groups = [c for c in metrics if c.startswith("exact_match/")]
    if not groups:
        return None
    return markdown_table(
        metrics, [("model_name", "model")] + [(g, g.split("/", 1)[1]) for g in groups]
    )


def _lm_eval_scores(metrics: pd.DataFrame) -> dict[str, list[str]]:
    """task → its metrics, from the lm_eval/<task>/<metric> columns."""
    tasks: dict[str, list[str]] = {}
    for column in metrics:
        if column.startswith(lm_eval.SCORE_PREFIX):
            task, metric = column.removeprefix(lm_eval.SCORE_PREFIX).split("/", 1)
            tasks.setdefault(task, []).append(metric)
    return tasks


def lm_eval_section(metrics: pd.DataFrame, plots: list[Path]) -> list[str]:
    """lm-evaluation-harness scores: one row per task and metric, one column per model."""
    tasks = _lm_eval_scores(metrics)
    if not tasks:
        return []
    versions = sorted(set(metrics[lm_eval.VERSION_COLUMN].dropna().astype(str)))
    limits = sorted(set(metrics[lm_eval.LIMIT_COLUMN].dropna().astype(str)))
    lines = [
        "## lm-evaluation-harness",
        "",
        f"Scores from lm-evaluation-harness {', '.join(versions)} (value ± standard error). "
        f"The paper's Open LLM Leaderboard numbers come from v{lm_eval.PAPER_VERSION}; scores "
        "shift across harness versions, so compare them only at the same version and settings."
        + (
            f" Run on a subset of each task (limit {', '.join(limits)}): not comparable to "
            "full-task scores."
            if limits
            else ""
        ),
        "",
    ]
    names = metrics["model_name"].tolist()
    lines += ["| task | metric | n-shot | " + " | ".join(names) + " |"]
    lines += ["|" + "---|" * (3 + len(names))]
    for task, task_metrics in tasks.items():
        shots = metrics.get(f"{lm_eval.FEWSHOT_PREFIX}{task}", pd.Series(dtype=float)).dropna()
        shot = str(int(shots.iloc[0])) if len(shots) else "–"
        for metric in task_metrics:
            values = metrics[f"{lm_eval.SCORE_PREFIX}{task}/{metric}"]
            errors = metrics.get(f"{lm_eval.STDERR_PREFIX}{task}/{metric}", values * float("nan"))
            cells = [
                "–" if pd.isna(v) else f"{v:.4f}" + ("" if pd.isna(e) else f" ± {e:.4f}")
                for v, e in zip(values, errors, strict=True)
            ]
            lines.append(
                f"| {_cell(task)} | {_cell(metric)} | {shot} | " + " | ".join(cells) + " |"
            )
    lines.append("")
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return lines + [""]


def plot_lm_eval(metrics: pd.DataFrame, out_dir: Path) -> list[Path]:
    """plots/lm_eval_<task>.png: each of the task's metrics across iterations, ± stderr."""
    paths = []
    for task, task_metrics in _lm_eval_scores(metrics).items():
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for metric in task_metrics:
            values = metrics[f"{lm_eval.SCORE_PREFIX}{task}/{metric}"]
            errors = metrics.get(f"{lm_eval.STDERR_PREFIX}{task}/{metric}", values * 0)
            present = values.notna()
            ax.errorbar(
                metrics["iteration"][present],
                values[present],
                yerr=errors[present].fillna(0),
                capsize=3,
                marker="o",
                label=metric,
            )
        ax.set_title(f"lm-eval: {task}")
        ax.set_xticks(metrics["iteration"], metrics["model_name"])
        ax.set_xlabel("model")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task)
        paths.append(save_figure(fig, out_dir / f"lm_eval_{safe}.png"))
    return paths


def _cell(text: str, limit: int = 80) -> str:
    text = str(text).replace("|", "\\|").replace("\n", "⏎ ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def samples_table(run: RunDir, rows: int) -> str | None:
    """Held-out prompts with the real response and every model's greedy generation."""
    frames = [("θ0", run.base_evaluation().eval)]
    frames += [
        (f"θ{t + 1}", run.eval_file(t))
        for t in run.finished_iterations()
        if run.eval_file(t).exists()
    ]
    if rows == 0 or not frames[0][1].exists():
        return None
    base = pd.read_parquet(frames[0][1]).head(rows)
    table = base[["id", "prompt", "real"]].copy()
    for name, path in frames:
        table[name] = (
            pd.read_parquet(path, columns=["id", "generated"])
            .set_index("id")
            .loc[table["id"], "generated"]
            .to_numpy()
        )
    columns = ["prompt", "real"] + [name for name, _ in frames]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def plot_metrics(metrics: pd.DataFrame, steps: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    keys = [
        k
        for k in ("exact_match", "real_loglik_per_token", "reward_accuracy", "margin")
        if k in metrics
    ]
    if keys and len(metrics):
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
        for ax, key in zip(axes if len(keys) > 1 else [axes], keys, strict=True):
            _plot_line(ax, metrics, key, "", marker="o", label="SPIN")
            if f"sft_{key}" in metrics:
                _plot_line(ax, metrics, key, "sft_", dodge=0.06, marker="s", label="continued SFT")
                ax.legend()
            ax.set_title(dict(COLUMNS)[key])
            ax.set_xticks(metrics["iteration"], metrics["model_name"])  # whole models only
            ax.set_xlabel("model θt")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / "metrics_per_iteration.png"))
    if len(steps):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for iteration, group in steps.groupby("iteration"):
            axes[0].plot(group["step"], group["loss"], label=f"iter {iteration}")
            axes[1].plot(group["step"], group["margin"], label=f"iter {iteration}")
        axes[0].set_title("train loss per step")
        axes[1].set_title("train margin per step")
        for ax in axes:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / "train_steps.png"))
    return paths


def _plot_line(
    ax, metrics: pd.DataFrame, key: str, prefix: str, dodge: float = 0.0, **style
) -> None:
    """One model series; with error bars where {prefix}{key}_ci_low/high exist (exact match),
    shifted right by `dodge` so that two series' bars at one iteration do not overlap."""
    x = metrics["iteration"]
    y = metrics[f"{prefix}{key}"].fillna(metrics[key])  # θ0 starts both lines
    low, high = f"{prefix}{key}_ci_low", f"{prefix}{key}_ci_high"
    if low not in metrics or high not in metrics:
        ax.plot(x, y, **style)
        return
    # θ0's own interval stands in for the baseline's missing θ0 row, like its value
    lows = metrics[low].fillna(metrics.get(f"{key}_ci_low", metrics[low]))
    highs = metrics[high].fillna(metrics.get(f"{key}_ci_high", metrics[high]))
    yerr = [(y - lows).clip(lower=0).fillna(0), (highs - y).clip(lower=0).fillna(0)]
    ax.errorbar(x + dodge, y, yerr=yerr, capsize=3, **style)


IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(((?!data:|https?:)[^)\s]+\.png)\)")


def embed_images(markdown: str, base: Path) -> str:
    """`markdown` with its local PNG links (`![name](plots/x.png)`, relative to `base`)
    replaced by data URIs, for a viewer that cannot reach the files: the Prefect UI shows a
    report artifact from its own server, where `plots/x.png` is a broken image."""
    import base64

    def inline(match: re.Match) -> str:
        path = base / match.group(2)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return IMAGE_LINK.sub(inline, markdown)


def save_figure(fig, path: Path) -> Path:
    """`fig` as a PNG at `path`, written atomically; the figure is closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _tested(comparison: sig.Comparison | None) -> str:
    if comparison is None:
        return "; not tested for significance (no paired per-prompt evaluations)."
    return f": {sig.verdict(comparison, unit=sig.UNITS[comparison.metric])}."


def verdict_lines(metrics: pd.DataFrame, tests: Significance | None = None) -> list[str]:
    """Plain statements of what the numbers show, whatever they are.

    A change is called higher or lower only when it is significant (see `significance`).
    """
    tests = tests or Significance()
    lines = []
    if len(metrics) < 2:
        return ["No SPIN iteration has finished yet."]
    first, last = metrics.iloc[0], metrics.iloc[-1]
    name = last["model_name"]
    lines.append(
        f"Held-out exact match went from {first['exact_match']:.3f} (θ0) to "
        f"{last['exact_match']:.3f} ({name})" + _tested(tests.find(name, "θ0", sig.EXACT_MATCH))
    )
    lines.append(
        f"Real-response log-likelihood went from {first['real_loglik_per_token']:.4f} to "
        f"{last['real_loglik_per_token']:.4f} nats/token"
        + _tested(tests.find(name, "θ0", sig.REAL_LOGLIK))
    )
    if "sft_exact_match" in metrics and pd.notna(last.get("sft_exact_match")):
        baseline = baseline_name(int(last["iteration"]))
        lines.append(
            f"{name} vs continued SFT with the same optimizer steps and learning rate "
            f"(exact match {last['exact_match']:.3f} vs {last['sft_exact_match']:.3f})"
            + _tested(tests.find(name, baseline, sig.EXACT_MATCH))
        )
    if "collapsed" in metrics and metrics["collapsed"].fillna(False).astype(bool).any():
        bad = metrics[metrics["collapsed"].fillna(False).astype(bool)].iloc[0]
        lines.append(
            f"{bad['model_name']} collapsed: its held-out real log-likelihood "
            f"{bad['real_loglik_per_token']:.4f} fell below its opponent's "
            f"{bad['opponent_real_loglik_per_token']:.4f}; it was not promoted."
        )
    if "lr_scale" in metrics:
        for _, row in metrics[metrics["lr_scale"].fillna(1.0) < 1.0].iterrows():
            lines.append(
                f"{row['model_name']} is a retry at {row['lr_scale']:g}× the learning rate: the "
                f"first attempt collapsed (kept in iter_{row['iteration'] - 1}/collapsed_attempt)."
            )
    if "weights_changed" in metrics:
        for _, row in metrics[metrics["weights_changed"].fillna(1.0) < 0.01].iterrows():
            lines.append(
                f"{row['model_name']} equals its opponent in "
                f"{100 * (1 - row['weights_changed']):.2f}% of its weights (exported in "
                f"{row.get('export_dtype', '?')}): the training update was mostly lost"
                + (
                    " to bf16 rounding (training.export_dtype fp32 keeps it)."
                    if row.get("export_dtype") == "bfloat16"
                    else "."
                )
            )
    if "weights_changed_as_computed" in metrics:
        for _, row in metrics.iterrows():
            stored, computed = row["weights_changed"], row["weights_changed_as_computed"]
            if pd.notna(stored) and pd.notna(computed) and computed < stored / 2:
                lines.append(
                    f"{row['model_name']} differs from its opponent in {100 * stored:.1f}% of "
                    f"its {row['export_dtype']} weights but in {100 * computed:.1f}% once rounded "
                    f"to {row['compute_dtype']}, the dtype generation and evaluation run in."
                )
    if "reward_accuracy" in metrics and metrics["reward_accuracy"].max() > 0.95:
        lines.append(
            "Reward accuracy near 1.0 is not a sign of health: it also happens when the model "
            "wins the loss by lowering the likelihood of everything."
        )
    return lines


def write_report(
    run_dir: str | Path, *, sample_rows: int | None = None
) -> tuple[Path, pd.DataFrame]:
    """Write metrics.parquet, plots/*.png and report.md; returns (report path, metrics).

    sample_rows: held-out generations shown side by side; by default the run's
    `run.sample_rows` from its spin.yaml.
    """
    run = RunDir(run_dir)
    if sample_rows is None:
        saved = yaml.safe_load(run.config.read_text()) if run.config.exists() else {}
        sample_rows = int((saved or {}).get("run", {}).get("sample_rows", 8))
    tests = significance_tests(run)
    metrics = with_significance(collect_metrics(run), tests)
    if len(metrics):
        write_parquet_atomic(metrics, run.metrics)
    plots = plot_metrics(metrics, step_logs(run), run.plots)
    parts = [f"# SPIN report: {run.root.name}", ""]
    parts += ["## Verdict", ""] + [f"- {line}" for line in verdict_lines(metrics, tests)] + [""]
    if len(metrics):
        parts += ["## Held-out metrics per model", "", metrics_table(metrics), ""]
    if len(metrics) > 1:
        parts += significance_section(tests)
    groups = group_table(metrics) if len(metrics) else None
    if groups:
        parts += ["## Exact match per task", "", groups, ""]
    if len(metrics):
        parts += lm_eval_section(metrics, plot_lm_eval(metrics, run.plots))
    parts += [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    samples = samples_table(run, sample_rows) if sample_rows else None
    if samples:
        parts += ["## Sample generations (held-out prompts)", "", samples, ""]
    parts += provenance_section(metrics)
    text = "\n".join(parts)
    write_text_atomic(text, run.report)
    return run.report, metrics
