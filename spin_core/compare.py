"""Recipes compared over seeds: which runs to make, which are done, and compare.md.

A comparison runs every (recipe, seed) as its own run directory `OUT/<recipe>/seed-<k>`:

- a recipe is one config (its name: the config file's stem, or `run.name` for a config
  given as an object);
- seed k sets `data.seed`, `generation.seed` and `training.seed` to k (k = 0 … N−1), so
  the same k draws the same prompt sample, sampling seeds and data order in every
  recipe. `toy.seed` is not changed: the embedded default's data and θ0 are the same
  in every run, and the comparison is about the recipe, not about θ0.

Across seeds, a metric's interval is the Student-t interval of the per-seed values
(mean ± t(0.975, n−1)·s/√n); with one seed there is none. SPIN θt against the SFT
baseline of the same iteration is tested paired over prompts within each seed and
pooled over seeds (`pooled_comparison`).

No Prefect here: the orchestration is flows/compare.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from spin_core import report  # noqa: E402
from spin_core import significance as sig  # noqa: E402
from spin_core.config import (  # noqa: E402
    TOY,
    ConfigError,
    SpinConfig,
    apply_overrides,
    load_config,
    result_changing_differences,
    validate_config,
)
from spin_core.data import write_parquet_atomic  # noqa: E402
from spin_core.errors import InputError  # noqa: E402
from spin_core.files import write_text_atomic  # noqa: E402
from spin_core.rundir import (
    RunDir,  # noqa: E402
    toy_artifacts,  # noqa: E402
)

# The fields a comparison seed sets (toy.seed is left alone: θ0 is shared).
SEEDED_FIELDS = (("data", "seed"), ("generation", "seed"), ("training", "seed"))
CONFIDENCE = 0.95
N_RESAMPLES = 10_000
SPIN, SFT = "SPIN", "SFT baseline"  # model kinds in the summary
METRICS = {sig.EXACT_MATCH: "exact match", sig.REAL_LOGLIK: "real log-lik/token"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# --- recipes and runs -------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A config under a name; its runs live in OUT/<name>/seed-<k>."""

    name: str
    config: SpinConfig
    source: str  # the config file, or "run.name" for a config given as an object


def load_recipes(
    configs: Sequence[SpinConfig | dict | str | Path], overrides: Iterable[str] = ()
) -> list[Recipe]:
    """The recipes of config files (named by their stem) or config objects (by run.name),
    each with the `key=value` overrides applied. Raises ConfigError on a bad config, an
    unusable name, or two recipes with one name."""
    overrides = list(overrides)
    if not configs:
        raise ConfigError("compare: give at least one config")
    recipes = []
    for item in configs:
        if isinstance(item, str | Path):
            config = load_config(item, overrides)
            name, source = Path(item).stem, str(item)
        else:
            raw = item.model_dump(mode="json") if isinstance(item, SpinConfig) else item
            config = validate_config(apply_overrides(raw, overrides))
            name, source = config.run.name, "run.name"
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{source}: recipe name {name!r} cannot be a directory name "
                "(letters, digits, '.', '_', '-'; not starting with '.', '_' or '-')"
            )
        recipes.append(Recipe(name, config, source))
    names = [r.name for r in recipes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        sources = [r.source for r in recipes if r.name in twice]
        raise ConfigError(
            f"compare: recipe names must differ, {', '.join(twice)} appears more than once "
            f"({', '.join(sources)}); rename a config file (or its run.name)"
        )
    return recipes


def shared_toy_dir(config: SpinConfig, out_dir: str | Path) -> Path | None:
    """Where a comparison keeps the embedded default of `config` (None: it uses none).

    One directory per distinct `toy` section, so recipes with the same toy share one θ0.
    """
    if not config.uses_toy():
        return None
    key = hashlib.blake2b(config.toy.model_dump_json().encode(), digest_size=6).hexdigest()
    return Path(out_dir).expanduser().resolve() / "toy" / key


def with_shared_toy(recipe: Recipe, toy_dir: Path | None) -> Recipe:
    """The recipe pointed at a shared build of the embedded default instead of its own."""
    if toy_dir is None:
        return recipe
    built = toy_artifacts(toy_dir)
    dump = recipe.config.model_dump(mode="json")
    if dump["data"]["dataset"] == TOY:
        dump["data"]["dataset"] = str(built.train_path)
        if dump["data"]["eval_dataset"] in (None, TOY):
            dump["data"]["eval_dataset"] = str(built.eval_path)
    if dump["model"]["name_or_path"] == TOY:
        dump["model"]["name_or_path"] = str(built.model_dir)
    return Recipe(recipe.name, SpinConfig.model_validate(dump), recipe.source)


def seeded_config(config: SpinConfig, seed: int) -> SpinConfig:
    """`config` with data.seed, generation.seed and training.seed set to `seed`."""
    dump = config.model_dump(mode="json")
    for section, name in SEEDED_FIELDS:
        dump[section][name] = seed
    return SpinConfig.model_validate(dump)


def run_dir_for(out_dir: str | Path, recipe: str, seed: int) -> Path:
    return Path(out_dir).expanduser().resolve() / recipe / f"seed-{seed}"


@dataclass(frozen=True)
class PlannedRun:
    recipe: str
    seed: int
    run_dir: Path
    config: SpinConfig

    @property
    def label(self) -> str:
        return f"{self.recipe}/seed-{self.seed}"


def plan_runs(recipes: Sequence[Recipe], seeds: int, out_dir: str | Path) -> list[PlannedRun]:
    """Every (recipe, seed k) for k < seeds, recipe by recipe."""
    if seeds < 1:
        raise ConfigError(f"compare: seeds must be at least 1 (got {seeds})")
    return [
        PlannedRun(r.name, k, run_dir_for(out_dir, r.name, k), seeded_config(r.config, k))
        for r in recipes
        for k in range(seeds)
    ]


def _saved_config(run: RunDir) -> SpinConfig | None:
    try:
        return validate_config(yaml.safe_load(run.config.read_text()) or {}, str(run.config))
    except (OSError, yaml.YAMLError, InputError):
        return None


def refuse_changed_configs(planned: Iterable[PlannedRun]) -> None:
    """Raise InputError, before anything runs, when a run directory was made with a config
    that would give different results (the run could neither be reused nor resumed)."""
    for p in planned:
        run = RunDir(p.run_dir)
        if not run.config.exists():
            continue
        saved = _saved_config(run)
        if saved is None:
            raise InputError(f"{run.config}: unreadable config of an earlier run")
        differences = result_changing_differences(saved, p.config)
        if differences:
            raise InputError(
                f"{p.run_dir}: run {p.label} was made with a different config "
                f"({', '.join(differences)} differ); use another --out, or rename the config "
                "so that the recipe gets a new directory"
            )


def is_finished(run_dir: str | Path, config: SpinConfig) -> bool:
    """Whether the run in `run_dir` is finished with exactly `config`: nothing to rerun.

    Finished: report.md exists and was written after the last start of the run (spin.yaml
    is rewritten at every start), spin.yaml equals `config`, and every iteration up to
    run.iterations has its metrics (and its SFT baseline's, with run.baseline: sft), or
    the run stopped earlier the way the pipeline stops: a collapsed model not promoted
    (after its retry, with on_collapse: retry_half_lr), or a margin below early_stop_margin.
    """
    run = RunDir(run_dir)
    if not (run.report.exists() and run.config.exists()):
        return False
    if run.report.stat().st_mtime_ns < run.config.stat().st_mtime_ns:
        return False  # started again since its report was written
    saved = _saved_config(run)
    if saved is None or saved.model_dump(mode="json") != config.model_dump(mode="json"):
        return False
    for t in range(config.run.iterations):
        try:
            metrics = json.loads(run.iteration_metrics(t).read_text())
        except (OSError, ValueError):
            return False
        if config.run.baseline == "sft" and not (run.baseline(t) / "metrics.json").exists():
            return False
        if metrics.get("collapsed"):
            if config.run.on_collapse == "retry_half_lr" and not run.retry(t).exists():
                return False
            if not config.run.promote_collapsed:
                return True
        stop, margin = config.run.early_stop_margin, metrics.get("margin")
        if stop is not None and margin is not None and margin < stop:
            return True
    return True


# --- intervals ----------------------------------------------------------------------------


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer df (Abramowitz & Stegun 26.7.3–4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, c  # c, (2/3)c³, (2·4)/(3·5)c⁵, …  up to c^(df−2)
        for k in range(1, df - 1, 2):
            total += term
            term *= c * c * (k + 1) / (k + 2)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0  # 1, (1/2)c², (1·3)/(2·4)c⁴, …  up to c^(df−2)
    for k in range(0, df - 1, 2):
        total += term
        term *= c * c * (k + 1) / (k + 2)
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value: P(|T| ≤ q) = confidence (bisection)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while _t_two_sided_mass(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if _t_two_sided_mass(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def mean_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of per-seed values; NaN bounds for one."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) == 1:
        return mean, math.nan, math.nan
    half = t_quantile(confidence, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def stratified_paired_bootstrap(
    strata: Sequence[pd.DataFrame],
    metric: str,
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(delta, low, high) of the pooled Δ = (1/S) Σ_s Δ_s over S seeds (strata).

    Each stratum is one seed's `significance.paired_frames` (suffix _a: reference, _b:
    model). Δ_s is the seed's own paired difference: mean(b − a) of exact match, or
    Σ logp_b / Σ tokens_b − Σ logp_a / Σ tokens_a for the real log-likelihood. A resample
    draws, within every seed, that seed's prompts with replacement (the pairing of the
    two models on a prompt is kept; seeds are never mixed), and takes the pooled Δ; the
    interval is the percentile interval of `n_resamples` resamples.
    """
    if not strata:
        raise ValueError("no strata to pool")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    parts = []
    for frame in strata:
        if metric == sig.EXACT_MATCH:
            d = (
                frame["exact_match_b"].astype(float).to_numpy()
                - frame["exact_match_a"].astype(float).to_numpy()
            )
            parts.append(("mean", (d,)))
        elif metric == sig.REAL_LOGLIK:
            arrays = tuple(
                frame[c].astype(float).to_numpy()
                for c in ("real_logps_a", "real_tokens_a", "real_logps_b", "real_tokens_b")
            )
            parts.append(("ratio", arrays))
        else:
            raise ValueError(f"unknown metric {metric!r}")

    def statistic(kind: str, arrays: tuple, idx) -> np.ndarray:
        if kind == "mean":
            return arrays[0][idx].mean(axis=-1)
        na, da, nb, db = arrays
        with np.errstate(divide="ignore", invalid="ignore"):
            value = nb[idx].sum(-1) / db[idx].sum(-1) - na[idx].sum(-1) / da[idx].sum(-1)
        return np.where(np.isfinite(value), value, np.nan)

    delta = float(np.mean([statistic(k, a, np.arange(len(a[0]))) for k, a in parts]))
    rng = np.random.default_rng(seed)
    largest = max(len(a[0]) for _, a in parts)
    rows = max(1, 1_000_000 // largest)
    values = []
    for start in range(0, n_resamples, rows):
        block = min(rows, n_resamples - start)
        total = np.zeros(block)
        for kind, arrays in parts:
            n = len(arrays[0])
            total += statistic(kind, arrays, rng.integers(0, n, size=(block, n)))
        values.append(total / len(parts))
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(np.concatenate(values), [tail, 1 - tail])
    return delta, float(low), float(high)


# --- collected results --------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """A finished run of the comparison."""

    recipe: str
    seed: int
    run_dir: Path


def run_metrics(run_dir: str | Path) -> pd.DataFrame:
    """The run's metrics.parquet (one row per model), or the same rows from its files."""
    run = RunDir(run_dir)
    if run.metrics.exists():
        return pd.read_parquet(run.metrics)
    return report.collect_metrics(run)


def per_seed_values(results: Sequence[RunResult]) -> pd.DataFrame:
    """One row per (recipe, seed, model): kind SPIN (θ0 … θT) or SFT baseline (1 … T),
    iteration, model name, exact_match, real_loglik_per_token."""
    rows = []
    for r in results:
        metrics = run_metrics(r.run_dir)
        for _, m in metrics.iterrows():
            t = int(m["iteration"])
            base = {"recipe": r.recipe, "seed": r.seed, "iteration": t}
            rows.append(
                base
                | {
                    "kind": SPIN,
                    "model": f"θ{t}",
                    sig.EXACT_MATCH: _number(m.get(sig.EXACT_MATCH)),
                    sig.REAL_LOGLIK: _number(m.get(sig.REAL_LOGLIK)),
                }
            )
            if t > 0 and pd.notna(m.get(f"sft_{sig.EXACT_MATCH}", np.nan)):
                rows.append(
                    base
                    | {
                        "kind": SFT,
                        "model": report.baseline_name(t),
                        sig.EXACT_MATCH: _number(m.get(f"sft_{sig.EXACT_MATCH}")),
                        sig.REAL_LOGLIK: _number(m.get(f"sft_{sig.REAL_LOGLIK}")),
                    }
                )
    columns = ["recipe", "seed", "iteration", "kind", "model", sig.EXACT_MATCH, sig.REAL_LOGLIK]
    return pd.DataFrame(rows, columns=columns)


def _number(value) -> float:
    return float(value) if value is not None and pd.notna(value) else math.nan


def summarize(values: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per (recipe, kind, iteration): the seeds, their mean and t-interval of each metric,
    and the per-seed values as text ("seed: value, …")."""
    rows = []
    order = {name: i for i, name in enumerate(dict.fromkeys(values["recipe"]))}
    for (recipe, kind, t), group in values.groupby(["recipe", "kind", "iteration"], sort=False):
        group = group.sort_values("seed")
        row = {
            "recipe": recipe,
            "kind": kind,
            "iteration": int(t),
            "model": group["model"].iloc[0],
            "n_seeds": len(group),
            "seeds": ", ".join(str(s) for s in group["seed"]),
        }
        for metric in METRICS:
            mean, low, high = mean_interval(group[metric], confidence)
            row |= {metric: mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high}
            row[f"{metric}_per_seed"] = ", ".join(
                f"{s}: {v:.4f}" for s, v in zip(group["seed"], group[metric], strict=True)
            )
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not len(frame):
        return frame
    frame["_order"] = frame["recipe"].map(order)
    frame["_kind"] = (frame["kind"] == SFT).astype(int)
    frame = frame.sort_values(["_order", "iteration", "_kind"], kind="stable")
    return frame.drop(columns=["_order", "_kind"]).reset_index(drop=True)


@dataclass
class PooledComparison:
    """θt against the SFT baseline t of one recipe, on one metric, over its seeds."""

    recipe: str
    iteration: int
    metric: str
    pooled: sig.Comparison  # stratified bootstrap CI; pooled McNemar p for exact match
    per_seed: dict[int, sig.Comparison] = field(default_factory=dict)
    across: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # t-interval of Δ_s

    @property
    def seeds(self) -> list[int]:
        return sorted(self.per_seed)


def _evaluations(run_dir: Path, t: int) -> tuple[pd.DataFrame, pd.DataFrame] | str:
    """(SFT baseline t, θt) per-prompt evaluations of a run, checked to pair; or why not."""
    run = RunDir(run_dir)
    sft, spin = run.baseline(t - 1) / "eval.parquet", run.eval(t - 1)
    for path in (sft, spin):
        if not path.exists():
            return f"no {path.relative_to(run.root)}"
    try:
        frames = tuple(pd.read_parquet(p, columns=list(sig.EVAL_COLUMNS)) for p in (sft, spin))
        sig.paired_frames(*frames)
    except (OSError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return frames


def pooled_comparison(
    recipe: str,
    iteration: int,
    evaluations: dict[int, tuple[pd.DataFrame, pd.DataFrame]],
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> list[PooledComparison]:
    """[exact match, real log-lik/token] of θt − SFT baseline t pooled over seeds.

    evaluations: seed → (SFT baseline t, θt) per-prompt evaluation frames (id,
    exact_match, real_logps, real_tokens) of that seed's run. Per seed:
    `significance.compare_models` (bootstrap over the seed's prompts, McNemar). Pooled:
    Δ = mean of the per-seed Δ_s with the stratified paired bootstrap interval
    (`stratified_paired_bootstrap`); for exact match the exact McNemar test on all seeds'
    prompts together (discordant prompts counted over every seed: under no difference
    each is equally likely either way, whatever its seed). Significant as in the run
    reports: the interval excludes 0 and, for exact match, p < 1 − confidence.
    Across seeds: the t-interval of the Δ_s (seed-to-seed variation, ≥ 2 seeds).
    """
    seeds = sorted(evaluations)
    model, reference = f"θ{iteration}", report.baseline_name(iteration)
    resampling = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    per_seed = {
        s: {
            c.metric: c
            for c in sig.compare_models(
                *evaluations[s], base_name=reference, other_name=model, **resampling
            )
        }
        for s in seeds
    }
    strata = [sig.paired_frames(*evaluations[s]) for s in seeds]
    out = []
    for metric in METRICS:
        delta, low, high = stratified_paired_bootstrap(strata, metric, **resampling)
        p_value = None
        if metric == sig.EXACT_MATCH:
            p_value = sig.mcnemar_exact_p(
                np.concatenate([f["exact_match_a"].astype(bool).to_numpy() for f in strata]),
                np.concatenate([f["exact_match_b"].astype(bool).to_numpy() for f in strata]),
            )
        pooled = sig.Comparison(
            model=model,
            reference=reference,
            metric=metric,
            delta=delta,
            low=low,
            high=high,
            p_value=p_value,
            n=sum(len(f) for f in strata),
            confidence=confidence,
        )
        seed_results = {s: per_seed[s][metric] for s in seeds}
        across = mean_interval([c.delta for c in seed_results.values()], confidence)
        out.append(PooledComparison(recipe, iteration, metric, pooled, seed_results, across))
    return out


@dataclass
class Comparison:
    """Everything compare.md shows, from the finished runs' files."""

    results: list[RunResult]
    values: pd.DataFrame  # per_seed_values
    summary: pd.DataFrame  # summarize
    tests: list[PooledComparison]
    notes: list[str]
    missing: list[str]  # planned runs that are not finished (label: why)
    n_resamples: int = N_RESAMPLES

    def significance_rows(self) -> list[dict]:
        """One row per (recipe, iteration, metric): pooled Δ, interval, p, verdict."""
        rows = []
        for test in self.tests:
            c = test.pooled
            rows.append(
                {
                    "recipe": test.recipe,
                    "comparison": c.name,
                    "metric": test.metric,
                    "seeds": ", ".join(map(str, test.seeds)),
                    "prompts": c.n,
                    "delta": c.delta,
                    "ci_low": c.low,
                    "ci_high": c.high,
                    "mcnemar_p": c.p_value,
                    "significant": c.significant,
                    "seeds_significant": sum(x.significant for x in test.per_seed.values()),
                    "across_seeds_low": test.across[1],
                    "across_seeds_high": test.across[2],
                    "verdict": _word(c),
                }
            )
        return rows


def _word(c: sig.Comparison) -> str:
    if not c.significant:
        return "no significant difference"
    return "significantly higher" if c.low > 0 else "significantly lower"


def compare_runs(
    results: Sequence[RunResult],
    *,
    missing: Sequence[str] = (),
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """Collect the finished runs' metrics, the across-seed summary and the pooled tests of
    every iteration t ≥ 1 whose θt and SFT baseline t exist in at least one seed."""
    values = per_seed_values(results)
    summary = summarize(values, confidence)
    tests, notes = [], []
    by_recipe: dict[str, list[RunResult]] = {}
    for r in results:
        by_recipe.setdefault(r.recipe, []).append(r)
    for recipe, runs in by_recipe.items():
        rows = values[(values["recipe"] == recipe) & (values["kind"] == SFT)]
        if not len(rows):
            notes.append(f"{recipe}: no SFT baseline (run.baseline: none), nothing to test")
            continue
        for t in sorted(set(rows["iteration"])):
            evaluations = {}
            for r in sorted(runs, key=lambda r: r.seed):
                frames = _evaluations(r.run_dir, t)
                if isinstance(frames, str):
                    notes.append(f"{recipe} seed {r.seed}: θ{t} not tested ({frames})")
                else:
                    evaluations[r.seed] = frames
            if evaluations:
                tests += pooled_comparison(
                    recipe,
                    t,
                    evaluations,
                    n_resamples=n_resamples,
                    confidence=confidence,
                    seed=seed,
                )
    return Comparison(list(results), values, summary, tests, notes, list(missing), n_resamples)


# --- compare.md ---------------------------------------------------------------------------


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


def runs_table(comparison: Comparison) -> str:
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


def _signed(value: float, metric: str) -> str:
    """A Δ as the verdicts write it: points (×100, 1 decimal) or nats (3 decimals)."""
    scale, decimals = (100, 1) if metric == sig.EXACT_MATCH else (1, 3)
    text = f"{abs(value * scale):.{decimals}f}"
    if float(text) == 0:
        return text  # no sign on a zero, even a rounded one
    return ("+" if value > 0 else "−") + text


def _seed_phrase(test: PooledComparison) -> str:
    m = test.metric
    parts = [
        f"seed {s} {_word(test.per_seed[s])} (Δ {_signed(test.per_seed[s].delta, m)})"
        for s in test.seeds
    ]
    text = "; ".join(parts)
    mean, low, high = test.across
    if np.isfinite(low):
        text += (
            f"; across seeds Δ {_signed(mean, m)}, 95% t-interval "
            f"{_signed(low, m)}…{_signed(high, m)}"
        )
    return text


def compare_markdown(comparison: Comparison, *, title: str, plots: Sequence[Path] = ()) -> str:
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


def plot_comparison(comparison: Comparison, out_dir: Path) -> list[Path]:
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
    n_resamples: int = N_RESAMPLES,
) -> tuple[Path, Comparison]:
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
