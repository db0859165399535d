"""Is a held-out difference between two models larger than prompt-sampling noise?

Two models are evaluated on the same held-out prompts, so every comparison is
paired by prompt id:

- exact match: Δ = mean(b) − mean(a) of the per-prompt booleans, a percentile
  bootstrap interval over prompts, and the exact McNemar test on the discordant
  prompts;
- real log-likelihood per token: Δ = Σ logp_b / Σ tokens_b − Σ logp_a / Σ tokens_a
  (the token-weighted mean the report shows), with a bootstrap interval that
  resamples prompts jointly for both models.

Over seeds (`spin compare`): the Student-t interval of per-seed values
(`mean_interval`), and a bootstrap that resamples prompts within each seed
(`stratified_paired_bootstrap`). One resampling routine serves every interval; the
t quantile and the binomial test come from scipy.stats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

EXACT_MATCH = "exact_match"
REAL_LOGLIK = "real_loglik_per_token"
# How each metric's Δ is written in a verdict.
# How a person reads each compared metric, in every report and table.
LABELS = {EXACT_MATCH: "exact match", REAL_LOGLIK: "real log-lik/token"}
UNITS = {EXACT_MATCH: "points", REAL_LOGLIK: "nats/token"}
EVAL_COLUMNS = ("id", "exact_match", "real_logps", "real_tokens")
CONFIDENCE = 0.95
N_RESAMPLES = 10_000
# Index elements drawn per vectorised block: bounds memory at ~8 MB per array.
_BLOCK_ELEMENTS = 1_000_000


def _as_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {array.shape}")
    return array


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"paired arrays differ in length: {lengths}")
    return next(iter(lengths.values()))


def _resampled_indices(
    sizes: Sequence[int], n_resamples: int, seed: int
) -> Iterator[list[np.ndarray]]:
    """Blocks of resamples: in each block, for every stratum of n prompts, rows of n prompt
    indices drawn uniformly with replacement from that stratum only."""
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(sizes))
    for start in range(0, n_resamples, rows_per_block):
        rows = min(rows_per_block, n_resamples - start)
        yield [rng.integers(0, n, size=(rows, n)) for n in sizes]


def _percentile_interval(
    statistic: Callable[[list[np.ndarray]], np.ndarray],
    sizes: Sequence[int],
    n_resamples: int,
    confidence: float,
    seed: int,
) -> tuple[float, float]:
    """(low, high): the (1 − c)/2 and (1 + c)/2 quantiles of the statistic over resamples.

    `statistic` maps one block of resampled indices (one array per stratum) to one value
    per resample. Resamples where the statistic is undefined (NaN) are left out.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    values = np.concatenate(
        [statistic(idx) for idx in _resampled_indices(sizes, n_resamples, seed)]
    )
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(values, [tail, 1 - tail])
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _ratio_delta(na, da, nb, db, idx) -> np.ndarray:
    """Σ nb / Σ db − Σ na / Σ da over the prompts `idx` (one value per row); NaN where a
    denominator sums to 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = nb[idx].sum(-1) / db[idx].sum(-1) - na[idx].sum(-1) / da[idx].sum(-1)
    return np.where(np.isfinite(value), value, np.nan)


def bootstrap_mean_ci(
    values, *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high) of one model's per-prompt values: percentile bootstrap of the mean."""
    x = _as_vector(values, "values")
    low, high = _percentile_interval(
        lambda idx: x[idx[0]].mean(axis=1), [len(x)], n_resamples, confidence, seed
    )
    return float(x.mean()), low, high


def paired_bootstrap_ci(
    a, b, *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[float, float, float]:
    """(delta, low, high) with delta = mean(b − a) over prompts i: (1/n) Σ_i (b_i − a_i).

    a[i] and b[i] are the two models' values on prompt i (booleans for exact match,
    floats otherwise). The interval is the percentile bootstrap: prompts are drawn n
    times with replacement, `n_resamples` times, and (low, high) are the (1 − c)/2 and
    (1 + c)/2 quantiles of the resampled deltas. Same seed, same interval.
    """
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    n = _same_length(a=x, b=y)
    difference = y - x
    low, high = _percentile_interval(
        lambda idx: difference[idx[0]].mean(axis=1), [n], n_resamples, confidence, seed
    )
    return float(difference.mean()), low, high


def paired_bootstrap_ratio_ci(
    num_a,
    den_a,
    num_b,
    den_b,
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(delta, low, high) with delta = Σ num_b / Σ den_b − Σ num_a / Σ den_a.

    For the real log-likelihood per token: num = a prompt's summed log-prob of the real
    response, den = its token count, so each ratio is the token-weighted mean. A
    resample draws prompts with replacement and takes all four arrays at the same
    prompts (the pairing is kept); the interval is the percentile bootstrap as in
    `paired_bootstrap_ci`. Resamples whose denominator sums to 0 are left out.
    """
    arrays = {
        "num_a": _as_vector(num_a, "num_a"),
        "den_a": _as_vector(den_a, "den_a"),
        "num_b": _as_vector(num_b, "num_b"),
        "den_b": _as_vector(den_b, "den_b"),
    }
    n = _same_length(**arrays)
    for name in ("den_a", "den_b"):
        if arrays[name].sum() <= 0:
            raise ValueError(f"{name}: the denominators must sum to a positive value")
    na, da, nb, db = arrays.values()
    delta = float(_ratio_delta(na, da, nb, db, np.arange(n)))
    low, high = _percentile_interval(
        lambda idx: _ratio_delta(na, da, nb, db, idx[0]), [n], n_resamples, confidence, seed
    )
    return delta, low, high


def mcnemar_exact_p(a, b) -> float:
    """Two-sided exact McNemar p-value for paired booleans a (reference) and b.

    With b01 = #(a false, b true) and b10 = #(a true, b false), under the null each
    discordant prompt is equally likely either way, so X ~ Bin(b01 + b10, 1/2) and
    p = min(1, 2 · P(X ≤ min(b01, b10))): scipy's exact two-sided binomial test, which
    for p = 1/2 is that sum. p = 1 when no prompt is discordant.
    """
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _same_length(a=x, b=y)
    b01, b10 = int(np.sum(~x & y)), int(np.sum(x & ~y))
    if b01 + b10 == 0:
        return 1.0
    return float(stats.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue)


# --- over seeds -----------------------------------------------------------------------------


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value q: P(|T| ≤ q) = confidence."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    _check_confidence(confidence)
    return float(stats.t.ppf((1 + confidence) / 2, df))


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

    Each stratum is one seed's `paired_frames` (suffix _a: reference, _b: model). Δ_s is
    the seed's own paired difference: mean(b − a) of exact match, or
    Σ logp_b / Σ tokens_b − Σ logp_a / Σ tokens_a for the real log-likelihood. A resample
    draws, within every seed, that seed's prompts with replacement (the pairing of the
    two models on a prompt is kept; seeds are never mixed), and takes the pooled Δ; the
    interval is the percentile interval of `n_resamples` resamples. With one stratum this
    is `paired_bootstrap_ci` / `paired_bootstrap_ratio_ci`, draw for draw.
    """
    if not strata:
        raise ValueError("no strata to pool")
    _check_confidence(confidence)
    parts: list[Callable[[np.ndarray], np.ndarray]] = []
    for frame in strata:
        if metric == EXACT_MATCH:
            d = (
                frame["exact_match_b"].astype(float).to_numpy()
                - frame["exact_match_a"].astype(float).to_numpy()
            )
            parts.append(lambda idx, d=d: d[idx].mean(axis=-1))
        elif metric == REAL_LOGLIK:
            arrays = tuple(
                frame[c].astype(float).to_numpy()
                for c in ("real_logps_a", "real_tokens_a", "real_logps_b", "real_tokens_b")
            )
            parts.append(lambda idx, arrays=arrays: _ratio_delta(*arrays, idx))
        else:
            raise ValueError(f"unknown metric {metric!r}")
    sizes = [len(frame) for frame in strata]
    delta = float(np.mean([part(np.arange(n)) for part, n in zip(parts, sizes, strict=True)]))

    def pooled(idx: list[np.ndarray]) -> np.ndarray:
        total = np.zeros(len(idx[0]))
        for part, rows in zip(parts, idx, strict=True):
            total += part(rows)
        return total / len(parts)

    low, high = _percentile_interval(pooled, sizes, n_resamples, confidence, seed)
    return delta, low, high


@dataclass(frozen=True)
class Comparison:
    """`model` against `reference` on one metric over n paired prompts.

    delta = model − reference (in the metric's own scale: a fraction for exact match,
    nats/token for log-likelihood), [low, high] its bootstrap interval at
    `confidence`, p_value McNemar's (exact match only, else None).
    """

    model: str
    reference: str
    metric: str
    delta: float
    low: float
    high: float
    p_value: float | None
    n: int
    confidence: float = 0.95

    @property
    def name(self) -> str:
        return f"{self.model} vs {self.reference}"

    @property
    def significant(self) -> bool:
        """The interval excludes 0 and, when there is a p-value, p < 1 − confidence."""
        excludes_zero = self.low > 0 or self.high < 0
        test_agrees = self.p_value is None or self.p_value < 1 - self.confidence
        return excludes_zero and test_agrees


# How a Δ in each unit is written: points are fractions ×100 with 1 decimal.
_WRITTEN = {"points": (100.0, 1), "nats/token": (1.0, 3)}


def signed(value: float, unit: str) -> str:
    """A Δ as the verdicts write it in `unit` ("points" or "nats/token"): "+5.0", "−0.012";
    no sign on a zero, even a rounded or negative one."""
    if unit not in _WRITTEN:
        raise ValueError(f"unit must be 'points' or 'nats/token', got {unit!r}")
    scale, decimals = _WRITTEN[unit]
    text = f"{abs(value * scale):.{decimals}f}"
    if float(text) == 0:
        return text
    return ("+" if value > 0 else "−") + text


def direction(comparison: Comparison) -> str:
    """significantly higher / significantly lower / no significant difference."""
    if not comparison.significant:
        return "no significant difference"
    return "significantly higher" if comparison.low > 0 else "significantly lower"


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def verdict(comparison: Comparison, *, unit: str) -> str:
    """One phrase: significantly higher / significantly lower / no significant difference.

    Significant means the bootstrap interval excludes zero and, for exact match (where
    there is a McNemar p-value), also p < 1 − confidence (0.05 at 95%): both must agree.
    The direction is the side of zero the interval lies on. unit "points": the delta
    and interval are fractions written as percentage points (×100, 1 decimal);
    "nats/token": written with 3 decimals. Example:
    "significantly higher (Δ +5.0 points, 95% CI +2.1…+7.9, McNemar p = 0.003)".
    """
    c = comparison
    detail = (
        f"Δ {signed(c.delta, unit)} {unit}, "
        f"{c.confidence * 100:g}% CI {signed(c.low, unit)}…{signed(c.high, unit)}"
    )
    if c.p_value is not None:
        detail += f", McNemar {_p_text(c.p_value)}"
    return f"{direction(c)} ({detail})"


def paired_frames(base_eval: pd.DataFrame, other_eval: pd.DataFrame) -> pd.DataFrame:
    """The two evaluations side by side on `id` (columns suffixed _a for base, _b for other).

    Raises ValueError naming the missing columns, duplicated ids, or the ids present in
    only one of the two frames.
    """
    for label, frame in (("base", base_eval), ("other", other_eval)):
        missing = [c for c in EVAL_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{label} evaluation lacks columns {missing}")
        duplicated = frame["id"][frame["id"].duplicated()].unique().tolist()
        if duplicated:
            raise ValueError(f"{label} evaluation has duplicated ids {_some(duplicated)}")
    base_ids, other_ids = set(base_eval["id"]), set(other_eval["id"])
    if base_ids != other_ids:
        raise ValueError(
            "evaluations cannot be paired: ids missing from the other evaluation "
            f"{_some(sorted(base_ids - other_ids, key=str))}, missing from the base evaluation "
            f"{_some(sorted(other_ids - base_ids, key=str))}"
        )
    columns = list(EVAL_COLUMNS)
    return base_eval[columns].merge(other_eval[columns], on="id", suffixes=("_a", "_b"))


def _some(ids: list, limit: int = 10) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return f"[{shown}{', …' if len(ids) > limit else ''}] ({len(ids)})"


def compare_models(
    base_eval: pd.DataFrame,
    other_eval: pd.DataFrame,
    *,
    base_name: str = "base",
    other_name: str = "other",
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[Comparison]:
    """[exact match, real log-lik/token] of other − base, paired on `id`.

    Inputs are per-prompt evaluation frames (eval.parquet: id, exact_match,
    real_logps, real_tokens). Exact match: Δ of the means with `paired_bootstrap_ci`
    and `mcnemar_exact_p`; log-lik: Δ of Σ real_logps / Σ real_tokens with
    `paired_bootstrap_ratio_ci`. Raises ValueError when the frames cannot be paired.
    """
    paired = paired_frames(base_eval, other_eval)
    a, b = paired["exact_match_a"].astype(bool), paired["exact_match_b"].astype(bool)
    resampling = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    delta, low, high = paired_bootstrap_ci(a, b, **resampling)
    exact = Comparison(
        model=other_name,
        reference=base_name,
        metric=EXACT_MATCH,
        delta=delta,
        low=low,
        high=high,
        p_value=mcnemar_exact_p(a, b),
        n=len(paired),
        confidence=confidence,
    )
    delta, low, high = paired_bootstrap_ratio_ci(
        paired["real_logps_a"],
        paired["real_tokens_a"],
        paired["real_logps_b"],
        paired["real_tokens_b"],
        **resampling,
    )
    real = Comparison(
        model=other_name,
        reference=base_name,
        metric=REAL_LOGLIK,
        delta=delta,
        low=low,
        high=high,
        p_value=None,
        n=len(paired),
        confidence=confidence,
    )
    return [exact, real]
