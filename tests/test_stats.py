"""pipeline.stats: Wilson intervals, McNemar's exact test and Holm's adjustment on known inputs."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from pipeline.stats import discordant_counts, holm, mcnemar_exact, proportion, wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (0, 200, 0.0, 0.0188453),  # upper bound z^2 / (n + z^2)
        (100, 200, 0.4313609, 0.5686391),
        (200, 200, 0.9811547, 1.0),
        (183, 200, 0.8681041, 0.9462542),  # shown as 0.915 [0.87, 0.95]
    ],
)
def test_wilson_interval_matches_published_values(successes, n, low, high):
    """Hand-computed from the closed form, the formula of statsmodels' proportion_confint(method="wilson")."""
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_bounds_are_where_the_score_test_reaches_z():
    """Each bound p solves |share - p| / sqrt(p (1 - p) / n) = z, the definition of the interval."""
    successes, n, z = 37, 120, 1.959964
    for bound in wilson_interval(successes, n):
        assert abs(successes / n - bound) / math.sqrt(bound * (1 - bound) / n) == pytest.approx(z, rel=1e-6)
    assert wilson_interval(37, 120, confidence=0.99)[0] < wilson_interval(37, 120)[0]  # wider at 99%


def test_wilson_needs_items():
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)


def test_proportion_is_the_share_with_its_interval():
    share, low, high = proportion([1] * 3 + [0] * 7)
    assert share == 0.3 and (low, high) == wilson_interval(3, 10)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    # 10 items only A gets right, 2 only B, 30 both, 8 neither: p = 2 * P(X <= 2), X ~ Bin(12, 1/2)
    a = [1] * 10 + [0] * 2 + [1] * 30 + [0] * 8
    b = [0] * 10 + [1] * 2 + [1] * 30 + [0] * 8
    assert discordant_counts(a, b) == (10, 2)
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(10, 12, 0.5).pvalue)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)  # two-sided


def test_mcnemar_without_discordant_pairs_is_one():
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0
    assert mcnemar_exact([1, 0], [0, 1]) == 1.0  # one each way: capped at 1


def test_mcnemar_needs_the_same_items():
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([1, 0, 1], [1, 0])


def test_holm_adjusts_step_down_and_keeps_the_order():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    # sorted: d*4 = 0.02, a*3 = 0.03, c*2 = 0.06, b*1 = 0.04 -> raised to 0.06 to stay monotone
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert holm({"only": 0.2}) == {"only": 0.2}
    assert holm({"x": 0.6, "y": 0.7}) == pytest.approx({"x": 1.0, "y": 1.0})  # capped at 1
    assert holm({}) == {}
