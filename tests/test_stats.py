"""pipeline.stats: Wilson intervals, McNemar's exact test, Holm's adjustment and the statistics pooled over
seeds (the crossed bootstrap, the item sign-flip test) on known inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.stats import (
    crossed_bootstrap,
    discordant_counts,
    holm,
    mcnemar_exact,
    paired_sign_flip,
    proportion,
    wilson_interval,
)


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


# the McNemar example above: 10 items only A gets right, 2 only B, 38 alike
ONLY_A_10_ONLY_B_2 = ([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8, [0] * 10 + [1] * 2 + [1] * 30 + [0] * 8)


def test_sign_flip_of_one_seed_is_mcnemar():
    a, b = ONLY_A_10_ONLY_B_2
    assert paired_sign_flip([a], [b]) == pytest.approx(2 * (1 + 12 + 66) / 2**12)


def test_sign_flip_counts_an_item_once_however_many_seeds_answered_it():
    """Three seeds that answer exactly alike are one seed's evidence, not three times as much:
    pooling the discordant pairs as independent (McNemar on 30 vs 6) would claim p = 1e-4."""
    a, b = ONLY_A_10_ONLY_B_2
    assert paired_sign_flip([a] * 3, [b] * 3) == pytest.approx(mcnemar_exact(a, b))
    assert mcnemar_exact(a * 3, b * 3) < 2e-4


def test_sign_flip_by_hand():
    # per-item totals over 2 seeds: d = (2, 1, -1), sum 2; the 8 sign flips give sums
    # 4, 2, 2, 0, 0, -2, -2, -4: six of them reach |2|
    a = [[1, 1, 0], [1, 0, 0]]
    b = [[0, 0, 1], [0, 0, 0]]
    assert paired_sign_flip(a, b) == pytest.approx(6 / 8)
    assert paired_sign_flip(b, a) == paired_sign_flip(a, b)
    assert paired_sign_flip(a, a) == 1.0


def test_sign_flip_is_the_full_randomization_distribution():
    """Against enumerating all 2^items sign flips, on small random outcomes."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        seeds, items = int(rng.integers(1, 4)), int(rng.integers(2, 9))
        a, b = rng.integers(0, 2, (seeds, items)), rng.integers(0, 2, (seeds, items))
        totals = (a - b).sum(axis=0)
        if totals.sum() == 0:
            continue
        flips = itertools.product((-1, 1), repeat=items)
        reached = [abs(np.dot(signs, totals)) >= abs(totals.sum()) for signs in flips]
        assert paired_sign_flip(a, b) == pytest.approx(np.mean(reached), abs=1e-12)


def test_sign_flip_needs_paired_binary_outcomes():
    with pytest.raises(ValueError, match="same seeds and items"):
        paired_sign_flip([[1, 0]], [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="0/1"):
        paired_sign_flip([[2, 0]], [[1, 0]])
    with pytest.raises(ValueError, match="shape"):
        paired_sign_flip([1, 0], [1, 0])


def test_crossed_bootstrap_covers_the_seeds():
    """Seeds that disagree completely and items that do not matter: the interval is the seeds'.
    Drawing 3 of (1, 0, 1) with replacement gives all zeros with probability 1/27 > 2.5% and all
    ones with 8/27, so the 95% interval is [0, 1] around the mean 2/3."""
    assert crossed_bootstrap([[1] * 5, [0] * 5, [1] * 5]) == pytest.approx((2 / 3, 0.0, 1.0))


def test_crossed_bootstrap_of_identical_seeds_is_the_items_bootstrap():
    outcomes = (np.random.default_rng(1).random(400) < 0.6).astype(int)
    one = crossed_bootstrap([outcomes])
    assert crossed_bootstrap([outcomes] * 3) == pytest.approx(one)
    share, low, high = proportion(outcomes)  # the items' bootstrap is close to Wilson's interval
    assert one[0] == share and one[1] == pytest.approx(low, abs=0.01) and one[2] == pytest.approx(high, abs=0.01)


def test_crossed_bootstrap_widens_with_seed_spread():
    rng = np.random.default_rng(2)
    alike = (rng.random((3, 800)) < 0.6).astype(int)
    apart = np.stack([(rng.random(800) < share).astype(int) for share in (0.45, 0.6, 0.75)])
    width = lambda interval: interval[2] - interval[1]  # noqa: E731
    assert width(crossed_bootstrap(apart)) > 3 * width(crossed_bootstrap(alike))
