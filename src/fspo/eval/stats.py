"""Confidence intervals for the proportions every evaluation reports (accuracy, win rate).

Why Wilson: it stays inside [0, 1] and keeps its coverage for small n and for proportions near 0 or 1
(an 87% win rate on 40 pairs), where the normal ("Wald") interval is too narrow. Ties count as half a
win, so the number of successes may be fractional; the Wilson formula only needs the proportion and
n, so half-counts go in unchanged (`scipy.stats.binomtest(...).proportion_ci` would demand integers).
A percentile bootstrap is offered for scores that are not 0/1 (judge probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for `successes` out of `n` (successes may be a half-count).

    Returns (nan, nan) for n == 0: an empty evaluation has no interval, and NaN shows up in a report
    instead of pretending to a number.
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within [0, n={n}], got {successes}")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    scores: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores` (e.g. per-pair judge probabilities)."""
    data = np.asarray(scores, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    if np.all(data == data[0]):
        return (float(data[0]), float(data[0]))
    res = stats.bootstrap(
        (data,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))
