"""Paired significance of held-out differences, against values computed by hand."""

import numpy as np
import pandas as pd
import pytest

from spin_core.reports.significance import (
    Comparison,
    bootstrap_mean_ci,
    compare_models,
    mcnemar_exact_p,
    paired_bootstrap_ci,
    paired_bootstrap_ratio_ci,
    verdict,
)


def discordant(b01: int, b10: int, agree: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Paired booleans with b01 prompts only b gets right and b10 only a gets right."""
    a = [False] * b01 + [True] * b10 + [True] * agree + [False] * agree
    b = [True] * b01 + [False] * b10 + [True] * agree + [False] * agree
    return np.array(a), np.array(b)


# McNemar: p = min(1, 2·P(X ≤ min(b01, b10))), X ~ Bin(b01 + b10, 1/2)
@pytest.mark.parametrize(
    ("b01", "b10", "expected"),
    [
        (0, 5, 2 * (1 / 32)),  # 2·C(5,0)/2^5
        (5, 0, 2 * (1 / 32)),  # symmetric
        (1, 9, 2 * (1 + 10) / 1024),  # 2·(C(10,0) + C(10,1))/2^10 = 0.021484375
        (2, 2, 1.0),  # 2·(1 + 4 + 6)/16 > 1, capped
        (0, 0, 1.0),  # no discordant prompt
    ],
)
def test_mcnemar_exact_p_by_hand(b01, b10, expected):
    a, b = discordant(b01, b10)
    assert mcnemar_exact_p(a, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_is_exact_for_many_discordant_prompts():
    # b01 = 0, b10 = 2000: 2^2000 overflows a float, the exact ratio 2·2^-2000 rounds to 0.0.
    a, b = discordant(0, 2000)
    assert mcnemar_exact_p(a, b) == 0.0
    # b01 = b10: P(X ≤ m/2) > 1/2, so p = 1.
    a, b = discordant(500, 500)
    assert mcnemar_exact_p(a, b) == 1.0


def test_all_equal_vectors_have_zero_delta_zero_interval_and_p_one():
    a = np.array([True, False, True, True, False, False, True])
    assert paired_bootstrap_ci(a, a.copy()) == (0.0, 0.0, 0.0)
    assert mcnemar_exact_p(a, a.copy()) == 1.0


def test_all_different_vectors():
    n = 6
    a, b = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    assert paired_bootstrap_ci(a, b) == (-1.0, -1.0, -1.0)  # every resample has Δ = −1
    assert mcnemar_exact_p(a, b) == pytest.approx(2 * 0.5**n)  # 0.03125


def test_bootstrap_interval_of_a_two_valued_difference_by_hand():
    # b − a = [1, 1, 0, 0]: a resample's Δ is K/4, K ~ Bin(4, 1/2), so P(Δ = 0) = P(Δ = 1)
    # = 1/16 > 2.5%: the 95% interval is [0, 1] around Δ = 0.5.
    a = np.array([0, 0, 0, 0], dtype=bool)
    b = np.array([1, 1, 0, 0], dtype=bool)
    assert paired_bootstrap_ci(a, b) == (0.5, 0.0, 1.0)


def test_bootstrap_interval_matches_the_normal_approximation_and_contains_the_delta():
    # 400 prompts: b − a is +1 on 60, −1 on 20, 0 elsewhere: Δ = 0.1, var = 80/400 − 0.1² = 0.19,
    # so the interval is about 0.1 ± 1.96·√(0.19/400) = 0.1 ± 0.0427.
    rng = np.random.default_rng(1)
    a = np.array([False] * 60 + [True] * 20 + [True] * 100 + [False] * 220)
    b = np.array([True] * 60 + [False] * 20 + [True] * 100 + [False] * 220)
    order = rng.permutation(400)
    delta, low, high = paired_bootstrap_ci(a[order], b[order])
    assert delta == pytest.approx(0.1)
    assert low < delta < high
    half_width = 1.96 * np.sqrt(0.19 / 400)
    assert low == pytest.approx(0.1 - half_width, abs=0.006)
    assert high == pytest.approx(0.1 + half_width, abs=0.006)


def test_bootstrap_is_reproducible_for_a_seed_and_works_on_floats():
    rng = np.random.default_rng(0)
    a = rng.normal(-1.0, 0.3, size=150)
    b = a + 0.05 + rng.normal(0, 0.1, size=150)
    first = paired_bootstrap_ci(a, b, seed=7)
    assert paired_bootstrap_ci(a, b, seed=7) == first
    assert paired_bootstrap_ci(a, b, seed=8) != first
    delta, low, high = first
    assert delta == pytest.approx(np.mean(b - a))
    assert low < 0.05 < high  # the true shift


def test_bootstrap_mean_ci_of_one_model():
    x = np.array([True] * 30 + [False] * 70)
    mean, low, high = bootstrap_mean_ci(x)
    assert mean == pytest.approx(0.3)
    half_width = 1.96 * np.sqrt(0.3 * 0.7 / 100)
    assert low == pytest.approx(0.3 - half_width, abs=0.015)
    assert high == pytest.approx(0.3 + half_width, abs=0.015)


def test_ratio_bootstrap_is_token_weighted_and_resamples_prompts_jointly():
    # Δ = Σnum_b/Σden_b − Σnum_a/Σden_a = −4/4 − (−6/4) = 0.5 (the unweighted mean of
    # per-prompt ratios would give 2/3). Resamples of 2 prompts: {0,0} → −1 − (−2) = 1,
    # {1,1} → −1 − (−4/3) = 1/3, mixed → 0.5, with probabilities 1/4, 1/4, 1/2.
    num_a, den = np.array([-2.0, -4.0]), np.array([1, 3])
    num_b = np.array([-1.0, -3.0])
    delta, low, high = paired_bootstrap_ratio_ci(num_a, den, num_b, den)
    assert delta == pytest.approx(0.5)
    assert low == pytest.approx(1 / 3)
    assert high == pytest.approx(1.0)
    # The same model on both sides: every resample is exactly 0.
    assert paired_bootstrap_ratio_ci(num_a, den, num_a, den) == (0.0, 0.0, 0.0)


def test_paired_inputs_must_have_the_same_length():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact_p([True], [True, False])


def comparison(metric="exact_match", **values) -> Comparison:
    return Comparison(model="θ1", reference="θ0", metric=metric, n=200, **values)


def test_verdict_significant_gain():
    c = comparison(delta=0.05, low=0.021, high=0.079, p_value=0.003)
    assert verdict(c, unit="points") == (
        "significantly higher (Δ +5.0 points, 95% CI +2.1…+7.9, McNemar p = 0.003)"
    )


def test_verdict_significant_loss():
    c = comparison(delta=-0.05, low=-0.079, high=-0.021, p_value=0.0004)
    assert verdict(c, unit="points") == (
        "significantly lower (Δ −5.0 points, 95% CI −7.9…−2.1, McNemar p < 0.001)"
    )
    c = comparison("real_loglik_per_token", delta=-0.0123, low=-0.0201, high=-0.0049, p_value=None)
    assert verdict(c, unit="nats/token") == (
        "significantly lower (Δ −0.012 nats/token, 95% CI −0.020…−0.005)"
    )


def test_verdict_no_difference():
    c = comparison(delta=0.014, low=-0.012, high=0.040, p_value=0.31)
    assert verdict(c, unit="points") == (
        "no significant difference (Δ +1.4 points, 95% CI −1.2…+4.0, McNemar p = 0.310)"
    )
    c = comparison(delta=0.0, low=0.0, high=0.0, p_value=1.0)
    assert verdict(c, unit="points") == (
        "no significant difference (Δ 0.0 points, 95% CI 0.0…0.0, McNemar p = 1.000)"
    )


def test_verdict_needs_the_interval_and_the_test_to_agree():
    c = comparison(delta=0.05, low=0.001, high=0.099, p_value=0.07)
    assert verdict(c, unit="points").startswith("no significant difference (Δ +5.0 points")
    c = comparison(delta=0.05, low=-0.001, high=0.099, p_value=0.01)
    assert verdict(c, unit="points").startswith("no significant difference")
    with pytest.raises(ValueError, match="unit"):
        verdict(c, unit="percent")


def eval_frame(ids, exact, logps, tokens) -> pd.DataFrame:
    return pd.DataFrame(
        {"id": ids, "exact_match": exact, "real_logps": logps, "real_tokens": tokens}
    )


def test_compare_models_pairs_on_id():
    ids = [f"p{i}" for i in range(10)]
    tokens = np.arange(1, 11)
    base = eval_frame(ids, [False] * 10, -1.0 * tokens, tokens)
    other = eval_frame(ids, [True] * 5 + [False] * 5, -0.5 * tokens, tokens)
    exact, loglik = compare_models(
        base, other.iloc[::-1], base_name="θ0", other_name="θ1"
    )  # other's rows in another order
    assert (exact.model, exact.reference, exact.metric, exact.n) == ("θ1", "θ0", "exact_match", 10)
    assert exact.delta == pytest.approx(0.5)
    assert exact.p_value == pytest.approx(2 / 32)
    assert exact.low < 0.5 < exact.high
    assert loglik.metric == "real_loglik_per_token" and loglik.p_value is None
    # −0.5 − (−1.0) on every prompt: every resample gives 0.5
    assert (loglik.delta, loglik.low, loglik.high) == pytest.approx((0.5, 0.5, 0.5))


def test_compare_models_names_what_cannot_be_paired():
    ids = ["a", "b", "c"]
    base = eval_frame(ids, [True] * 3, [-1.0] * 3, [1] * 3)
    with pytest.raises(ValueError, match=r"missing from the other evaluation \[c\]"):
        compare_models(base, base.iloc[:2])
    with pytest.raises(ValueError, match=r"missing from the base evaluation \[d\]"):
        compare_models(base, pd.concat([base, eval_frame(["d"], [True], [-1.0], [1])]))
    with pytest.raises(ValueError, match=r"lacks columns \['real_tokens'\]"):
        compare_models(base, base.drop(columns="real_tokens"))
    with pytest.raises(ValueError, match=r"duplicated ids \[a\]"):
        compare_models(base, pd.concat([base, base.iloc[:1]]))
