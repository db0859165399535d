"""Recipes compared over seeds: which runs to make, which are done, and what they show.

A comparison runs every (recipe, seed) as its own run directory `OUT/<recipe>/seed-<k>`:

- a recipe is one config (its name: the config file's stem, or `run.name` for a config
  given as an object);
- seed k sets `data.seed`, `generation.seed` and `training.seed` to k (k = 0 … N−1), so
  the same k draws the same prompt sample, sampling seeds and data order in every
  recipe. `toy.seed` is not changed: the embedded default's data and θ0 are the same
  in every run, and the comparison is about the recipe, not about θ0.

Across seeds, a metric's interval is the Student-t interval of the per-seed values
(mean ± t(0.975, n−1)·s/√n, `significance.mean_interval`); with one seed there is none.
SPIN θt against the SFT baseline of the same iteration is tested paired over prompts
within each seed and pooled over seeds (`pooled_comparison`). compare.md and its plot are
written by spin_core/reports/compare_report.py.

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

import numpy as np
import pandas as pd
import yaml

from spin_core import pipeline
from spin_core.config import (
    TOY,
    ConfigError,
    SpinConfig,
    apply_overrides,
    load_config,
    result_changing_differences,
    validate_config,
)
from spin_core.errors import InputError
from spin_core.reports import report
from spin_core.reports import significance as sig
from spin_core.reports.significance import (
    CONFIDENCE,
    N_RESAMPLES,
    mean_interval,
    stratified_paired_bootstrap,
)
from spin_core.storage.rundir import RunDir, toy_artifacts

# The fields a comparison seed sets (toy.seed is left alone: θ0 is shared).
SEEDED_FIELDS = (("data", "seed"), ("generation", "seed"), ("training", "seed"))
SPIN, SFT = "SPIN", "SFT baseline"  # model kinds in the summary
METRICS = sig.LABELS  # the metrics compared, with their labels
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
    run.iterations has its metrics (and its SFT baseline's, with run.baseline: sft), or the
    pipeline's own rule (`pipeline.after_iteration`) stopped the run after an earlier one;
    an iteration that rule would retry is not finished.
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
        if config.run.baseline == "sft" and not run.baseline_evaluation(t).metrics.exists():
            return False
        decision = pipeline.after_iteration(config, run, t, metrics)
        if decision.action == "retry":
            return False
        if decision.action == "stop":
            return True
    return True


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
    sft, spin = run.baseline_evaluation(t - 1).eval, run.eval_file(t - 1)
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
class RecipeComparison:
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
                    "verdict": sig.direction(c),
                }
            )
        return rows


def compare_runs(
    results: Sequence[RunResult],
    *,
    missing: Sequence[str] = (),
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> RecipeComparison:
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
    return RecipeComparison(
        list(results), values, summary, tests, notes, list(missing), n_resamples
    )
