"""Goodness of fit of Monte-Carlo draws against the distribution they claim to come from.

Pearson's chi-square per position on equal-mass bins of μ (so every bin expects many draws even
when μ is spread over 151,936 ids), pooled over positions (independent draws: statistics and
degrees of freedom add up), tail by the Wilson–Hilferty approximation.
"""

from __future__ import annotations

import math

import numpy as np


def binned_chi_square(draws: np.ndarray, logmu: np.ndarray, bins: int) -> tuple[float, int]:
    """(statistic, degrees of freedom) of draws [n] against μ = exp(logmu) [V] on ≤ `bins` bins."""
    p = np.exp(logmu.astype(np.float64))
    p /= p.sum()
    assert (p[draws] > 0).all(), "a draw from outside the support of μ"
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]  # mass of the more likely ids
    bin_sorted = np.minimum((before * bins).astype(np.int64), bins - 1)
    bin_of = np.empty_like(bin_sorted)
    bin_of[order] = bin_sorted
    mass = np.bincount(bin_of, weights=p, minlength=bins)
    counts = np.bincount(bin_of[draws], minlength=bins)
    keep = mass > 0
    expected = mass[keep] * len(draws)
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    return stat, int(keep.sum()) - 1


def chi_square_p(stat: float, dof: int) -> float:
    """Upper tail P(X >= stat) for X ~ chi-square(dof) (Wilson–Hilferty)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def pooled_p(per_position: list[tuple[float, int]]) -> float:
    """p-value of all positions' statistics together."""
    stat = sum(s for s, _ in per_position)
    dof = sum(d for _, d in per_position)
    return chi_square_p(stat, dof)
