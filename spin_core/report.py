"""metrics.parquet and report.md (with plots) from a run directory.

The report is rebuilt from files alone, so `spin report RUN_DIR` works on any
run, finished or not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from spin_core.data import write_parquet_atomic  # noqa: E402
from spin_core.rundir import RunDir  # noqa: E402

COLUMNS = [
    ("exact_match", "exact match"),
    ("sft_exact_match", "SFT baseline exact match"),
    ("sft_real_loglik_per_token", "SFT baseline log-lik/token"),
    ("real_loglik_per_token", "real log-lik/token"),
    ("reward_accuracy", "reward acc."),
    ("margin", "margin"),
    ("train_loss", "train loss"),
    ("identical_fraction", "identical pairs"),
    ("train_pairs", "train pairs"),
    ("unhealthy_checks", "unhealthy checks"),
    ("lr_scale", "lr scale"),
]


def collect_metrics(run: RunDir) -> pd.DataFrame:
    """One row per evaluated model: iteration 0 is θ0, iteration t+1 the model of iter_t."""
    rows = []
    base = run.base_eval() / "metrics.json"
    if base.exists():
        rows.append({"iteration": 0, "model_name": "θ0", **json.loads(base.read_text())})
    t = 0
    while (path := run.iteration_metrics(t)).exists():
        row = {"iteration": t + 1, "model_name": f"θ{t + 1}", **json.loads(path.read_text())}
        baseline = run.baseline(t) / "metrics.json"
        if baseline.exists():
            row |= {f"sft_{k}": v for k, v in json.loads(baseline.read_text()).items()}
        rows.append(row)
        t += 1
    frame = pd.DataFrame(rows)
    for prefix in ("", "sft_"):
        if f"{prefix}exact_match_by_group" in frame:
            column = frame.pop(f"{prefix}exact_match_by_group")
            groups = pd.json_normalize(
                column.map(lambda d: d if isinstance(d, dict) else {}).tolist()
            )
            frame = pd.concat([frame, groups.add_prefix(f"{prefix}exact_match/")], axis=1)
    return frame


def step_logs(run: RunDir) -> pd.DataFrame:
    frames = []
    t = 0
    while run.iteration(t).exists():
        log = run.train_state(t) / "metrics.jsonl"
        if log.exists() and log.stat().st_size:
            frames.append(pd.read_json(log, lines=True))
        t += 1
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, columns: list[tuple[str, str]]) -> str:
    present = [(key, label) for key, label in columns if key in frame]
    lines = ["| " + " | ".join(label for _, label in present) + " |"]
    lines.append("|" + "---|" * len(present))
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[key]) for key, _ in present) + " |")
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


def _cell(text: str, limit: int = 80) -> str:
    text = str(text).replace("|", "\\|").replace("\n", "⏎ ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def samples_table(run: RunDir, rows: int) -> str | None:
    """Held-out prompts with the real response and every model's greedy generation."""
    frames = [("θ0", run.base_eval() / "eval.parquet")]
    t = 0
    while (path := run.eval(t)).exists():
        frames.append((f"θ{t + 1}", path))
        t += 1
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
            ax.plot(metrics["iteration"], metrics[key], marker="o", label="SPIN")
            if f"sft_{key}" in metrics:
                baseline = metrics[f"sft_{key}"].fillna(metrics[key])  # θ0 starts both lines
                ax.plot(metrics["iteration"], baseline, marker="s", label="continued SFT")
                ax.legend()
            ax.set_title(dict(COLUMNS)[key])
            ax.set_xlabel("model θt")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / "metrics_per_iteration.png"))
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
        paths.append(_save(fig, out_dir / "train_steps.png"))
    return paths


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def verdict(metrics: pd.DataFrame) -> list[str]:
    """Plain statements of what the numbers show, whatever they are."""
    lines = []
    if len(metrics) < 2:
        return ["No SPIN iteration has finished yet."]
    first, last = metrics.iloc[0], metrics.iloc[-1]
    change = last["exact_match"] - first["exact_match"]
    word = "raised" if change > 0.005 else "lowered" if change < -0.005 else "did not change"
    lines.append(
        f"SPIN {word} held-out exact match from {first['exact_match']:.3f} (θ0) to "
        f"{last['exact_match']:.3f} ({last['model_name']})."
    )
    lines.append(
        f"Real-response log-likelihood went from {first['real_loglik_per_token']:.4f} to "
        f"{last['real_loglik_per_token']:.4f} nats/token."
    )
    if "sft_exact_match" in metrics and pd.notna(last.get("sft_exact_match")):
        gap = last["exact_match"] - last["sft_exact_match"]
        if gap > 0.005:
            lines.append(
                f"SPIN beat the continued-SFT baseline with the same steps by {gap:.3f} exact match."
            )
        else:
            lines.append(
                f"Continued SFT with the same optimizer steps and learning rate reached "
                f"{last['sft_exact_match']:.3f} exact match: SPIN did not beat it here."
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
    if "reward_accuracy" in metrics and metrics["reward_accuracy"].max() > 0.95:
        lines.append(
            "Reward accuracy near 1.0 is not a sign of health: it also happens when the model "
            "wins the loss by lowering the likelihood of everything."
        )
    return lines


def write_report(run_dir: str | Path) -> tuple[Path, pd.DataFrame]:
    """Write metrics.parquet, plots/*.png and report.md; returns (report path, metrics)."""
    run = RunDir(run_dir)
    metrics = collect_metrics(run)
    if len(metrics):
        write_parquet_atomic(metrics, run.metrics)
    plots = plot_metrics(metrics, step_logs(run), run.plots)
    parts = [f"# SPIN report: {run.root.name}", ""]
    parts += ["## Verdict", ""] + [f"- {line}" for line in verdict(metrics)] + [""]
    if len(metrics):
        parts += ["## Held-out metrics per model", "", metrics_table(metrics), ""]
    groups = group_table(metrics) if len(metrics) else None
    if groups:
        parts += ["## Exact match per task", "", groups, ""]
    parts += [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    samples = samples_table(run, 8)
    if samples:
        parts += ["## Sample generations (held-out prompts)", "", samples, ""]
    text = "\n".join(parts)
    tmp = run.report.with_name(".report.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, run.report)
    return run.report, metrics
