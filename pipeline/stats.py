"""Confidence intervals and paired tests for scores measured as 0/1 outcomes per eval item.

numpy and scipy only: the report stage computes every interval and p-value it shows here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; good near 0 and 1, unlike Wald's)."""
    if n <= 0:
        raise ValueError(f"a proportion needs at least one trial, got n={n}")
    z = stats.norm.ppf(0.5 + confidence / 2)
    share = successes / n
    denominator = 1 + z**2 / n
    center = (share + z**2 / (2 * n)) / denominator
    half_width = z / denominator * np.sqrt(share * (1 - share) / n + z**2 / (4 * n**2))
    return max(0.0, float(center - half_width)), min(1.0, float(center + half_width))


def proportion(outcomes: Sequence[int]) -> tuple[float, float, float]:
    """(share of 1s, Wilson 95% low, high) of a 0/1 sequence."""
    successes = int(np.sum(outcomes))
    return successes / len(outcomes), *wilson_interval(successes, len(outcomes))


def discordant_counts(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(items A got right and B wrong, items B got right and A wrong) over the same items."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same items: {a.shape} vs {b.shape}")
    return int(np.sum(a & ~b)), int(np.sum(~a & b))


def mcnemar_exact(a: Sequence[int], b: Sequence[int]) -> float:
    """Two-sided exact McNemar test: a binomial test (p = 1/2) on the discordant pairs.

    Items both models get right, or both wrong, say nothing about which is better; under the null
    hypothesis each discordant item is equally likely to favour either model. 1.0 when none differ.
    """
    only_a, only_b = discordant_counts(a, b)
    if only_a + only_b == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(only_a, only_b), only_a + only_b, 0.5)))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979): family-wise error control over all the tests.

    The k-th smallest p-value (from 0) is multiplied by (m - k), and the adjusted values are made
    non-decreasing in that order, so `adjusted < alpha` is Holm's step-down rejection.
    """
    ranked = sorted(p_values, key=lambda name: p_values[name])
    adjusted, running_max = {}, 0.0
    for k, name in enumerate(ranked):
        running_max = max(running_max, min(1.0, (len(ranked) - k) * p_values[name]))
        adjusted[name] = running_max
    return adjusted
