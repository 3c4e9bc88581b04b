"""Significance of a grid's comparisons: a p-value for each Δ, Holm's correction across the grid, and the exact
sign-flip test over the seeds, with what the seed count allows it to show.

A cell's Δ vs the centre is the mean over seeds of paired differences; its standard error comes from a pooled
σ_diff (many degrees of freedom) or from its own pairs (pairs − 1 of them). ``t_p_value`` reads Δ / SE against
Student's t with those degrees of freedom. A grid compares many cells with one centre at once: at a 5 % level each,
eight comparisons of cells that change nothing would call one of them "clear" a third of the time. Holm's
step-down correction (``holm``) keeps that family-wise error at the level, and is never less powerful than
Bonferroni's. The sign-flip test (``sign_flip_p``) assumes nothing of the noise's shape: under "the cell changes
nothing" each paired difference is as likely negative as positive, so the 2^n sign patterns of n pairs are equally
likely; its p-value cannot go below 2 / 2^n, so two or three seeds can never reach 5 % by it (``sign_flip_floor``).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

LEVEL = 0.05  # the family-wise error a grid's "clear" verdicts keep (Holm), two-sided


def t_p_value(delta: float, se: float, df: float) -> float:
    """Two-sided p of Δ / SE under Student's t with ``df`` degrees of freedom (the normal's where df is infinite);
    NaN when any of them is unknown or df < 1."""
    if not (math.isfinite(delta) and math.isfinite(se) and se > 0 and df >= 1):
        return 1.0 if math.isfinite(delta) and delta == 0 and math.isfinite(se) else math.nan
    from scipy.stats import norm, t

    tail = norm.sf(abs(delta) / se) if math.isinf(df) else t.sf(abs(delta) / se, df)
    return float(min(1.0, 2 * tail))


def sign_flip_p(differences: Sequence[float]) -> float:
    """The exact two-sided p of the paired sign-flip test: the share of the 2^n sign patterns whose mean is at least
    as far from 0 as the observed one (the observed pattern counts). NaN without a pair."""
    diffs = [float(d) for d in differences if math.isfinite(float(d))]
    if not diffs:
        return math.nan
    observed = abs(statistics.fmean(diffs)) - 1e-12 * max(1.0, max(abs(d) for d in diffs))
    hits = sum(1 for signs in itertools.product((1, -1), repeat=len(diffs))
               if abs(statistics.fmean(s * d for s, d in zip(signs, diffs, strict=True))) >= observed)
    return hits / 2 ** len(diffs)


def sign_flip_floor(pairs: int) -> float:
    """The smallest two-sided p the sign-flip test can give with ``pairs`` pairs: 2 / 2^pairs (1 without a pair)."""
    return min(1.0, 2.0 / 2 ** pairs) if pairs > 0 else 1.0


def seeds_for(level: float = LEVEL) -> int:
    """The fewest pairs with which the sign-flip test can reach ``level`` (6 at 5 %)."""
    return next(n for n in range(1, 64) if sign_flip_floor(n) <= level)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given: the k-th smallest of m is multiplied by m − k + 1, then made
    non-decreasing along that order (capped at 1). NaN stays NaN and does not count towards m."""
    known = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running, m = 0.0, len(known)
    for k, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def paired_delta(cell: dict[int, float], centre: dict[int, float]) -> tuple[float, float, int]:
    """(Δ, its standard error, pairs): Δ is the mean over the seeds both ran of (cell − centre) at the same seed,
    so what a seed fixes (data order, initialisation) cancels; the standard error comes from the spread of those
    differences, NaN below two pairs."""
    diffs = [cell[s] - centre[s] for s in sorted(cell.keys() & centre.keys())]
    if not diffs:
        return math.nan, math.nan, 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se, len(diffs)
