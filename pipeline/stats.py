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


# --- Several training seeds -------------------------------------------------------------------
# With replicated runs every model kind has a (seeds x items) matrix of 0/1 outcomes: each seed's
# model answered the same eval items. Seeds and items are crossed, not nested: item i is the same
# question in every seed, so an item that is hard for one seed's model tends to be hard for the
# others. Both functions below keep each item's outcomes together across seeds for that reason.


def _seeds_by_items(outcomes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    values = np.asarray(outcomes, dtype=float)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"outcomes need the shape (seeds, items) with at least one of each, got {values.shape}")
    return values


def crossed_bootstrap(
    outcomes: Sequence[Sequence[float]] | np.ndarray,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds and items with a percentile interval that covers both.

    `outcomes` is (seeds x items): 0/1 per item for a score, or a difference of two models' 0/1 for
    a paired comparison. Each resample draws seeds with replacement and, independently, items with
    replacement, shared by every drawn seed, and takes the mean of that sub-matrix: the bootstrap
    for crossed random factors (Owen 2007, "the pigeonhole bootstrap"; slightly conservative).
    Drawing items anew inside each seed (a nested bootstrap) would treat one question answered by
    three seeds as three independent questions and understate the items' share of the variance.
    With one seed it is the ordinary bootstrap over items; with few seeds the seeds' share is
    coarse (3 seeds have 10 distinct resamples), which is why the report also counts in how many
    seeds an ordering holds.
    """
    values = _seeds_by_items(outcomes)
    n_seeds, n_items = values.shape
    # one stream for items, one for seeds: the items drawn do not depend on how many seeds there are
    item_rng, seed_rng = (np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(2))
    means = np.empty(resamples)
    for start in range(0, resamples, 1_000):  # chunks: an item-count matrix of 1,000 x items at a time
        size = min(1_000, resamples - start)
        item_counts = item_rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=size)  # (size, items)
        per_seed = values @ item_counts.T / n_items  # (seeds, size): each seed's mean over the drawn items
        drawn_seeds = seed_rng.integers(0, n_seeds, size=(size, n_seeds))
        means[start : start + size] = per_seed[drawn_seeds, np.arange(size)[:, None]].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def paired_sign_flip(
    a: Sequence[Sequence[int]] | np.ndarray,
    b: Sequence[Sequence[int]] | np.ndarray,
) -> float:
    """Two-sided exact p-value that models A and B are equally good, pooled over seeds.

    `a` and `b` are (seeds x items) 0/1 outcomes of the two models of each seed on the same items.
    Under the null hypothesis A's and B's labels could be swapped on any item, so each item's total
    d_i = sum over seeds of (a - b) is as likely to be -d_i: the test statistic sum_i d_i is compared
    with its exact distribution under every sign flip of the items (a randomization test; the
    distribution is computed by convolution, not sampled). An item is flipped as a whole across
    seeds, so the same question counts once however many seeds answered it. With one seed this is
    exactly McNemar's exact test (mcnemar_exact); with several it is McNemar's test stratified by
    seed, the matched-pairs case of Cochran-Mantel-Haenszel, but without assuming that the items of
    different seeds are independent. It tests the trained models at hand: the spread over training
    seeds is in crossed_bootstrap's interval and in the per-seed orderings.
    """
    a, b = _seeds_by_items(a), _seeds_by_items(b)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same seeds and items: {a.shape} vs {b.shape}")
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("paired_sign_flip takes 0/1 outcomes")
    totals = (a - b).sum(axis=0).astype(int)  # d_i per item, in [-seeds, seeds]
    observed = abs(int(totals.sum()))
    if observed == 0:
        return 1.0
    # the null distribution of sum_i eps_i |d_i|: for each weight w with n_w items, w (2 Bin(n_w, 1/2) - n_w)
    reach = int(np.abs(totals).sum())
    pmf = np.zeros(2 * reach + 1)
    pmf[reach] = 1.0  # index reach is a sum of 0
    for weight in range(1, int(np.abs(totals).max()) + 1):
        count = int(np.sum(np.abs(totals) == weight))
        if not count:
            continue
        steps = np.zeros(2 * weight * count + 1)
        steps[:: 2 * weight] = stats.binom.pmf(np.arange(count + 1), count, 0.5)  # sums -w*n .. w*n by 2w
        pmf = np.convolve(pmf, steps)[weight * count : weight * count + 2 * reach + 1]
    sums = np.arange(-reach, reach + 1)
    return float(min(1.0, pmf[np.abs(sums) >= observed].sum()))
