"""95% intervals for the trade-off table: Wilson intervals for accuracies (a share of N points) and
distribution-free intervals for medians (order statistics of the sample, ranks from the Binomial(n, 1/2)).

The median interval needs no assumption about the distribution of the minimal norms, and it stays honest
when some of them are +inf (points the attack never fooled): the bounds are sample values, so an upper
bound of +inf says that the data cannot exclude a median beyond every norm found.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a binomial proportion ``successes / n``, bounds in [0, 1].

    (NaN, NaN) for n = 0. Unlike the Wald interval it is not degenerate at 0 of n or n of n (0 of 64 gives
    [0, z^2 / (64 + z^2)] = [0, 0.057])."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, n={n}]")
    z2 = _z(level) ** 2
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n) * math.sqrt(z2)
    # at 0 and n the exact bound is 0 / 1; the formula reaches it only up to rounding
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def median_rank(n: int, level: float = 0.95) -> int:
    """The rank l (1-based; 0 = unbounded) of the distribution-free median interval [x_(l), x_(n+1-l)] of
    n values: the largest l with P(B <= l - 1) <= (1 - level) / 2, B ~ Binomial(n, 1/2), so that for any
    continuous distribution the interval covers the median with probability 1 - 2 P(B <= l - 1) >= level."""
    tail, cdf, l = (1 - level) / 2, 0.0, 0
    while l < n // 2 + 1:
        cdf += math.comb(n, l) / 2 ** n     # cdf = P(B <= l); exact int division, no overflow at large n
        if cdf > tail + 1e-15:
            break
        l += 1
    return l


def median_coverage(n: int, level: float = 0.95) -> float:
    """The exact coverage 1 - 2 P(B <= l - 1) of ``median_interval`` for n values from a continuous law."""
    l = median_rank(n, level)
    return 1.0 - 2 * sum(math.comb(n, j) for j in range(l)) / 2 ** n


def median_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The distribution-free interval [x_(l), x_(n+1-l)] for the median of ``values`` (1-D; +inf allowed),
    l = ``median_rank(n)``; (-inf, +inf) when n < 6 (no order statistics reach the level), (NaN, NaN)
    when n = 0."""
    v = np.sort(np.asarray(values, dtype=float).ravel())
    n = v.size
    if n == 0:
        return math.nan, math.nan
    l = median_rank(n, level)
    if l == 0:
        return -math.inf, math.inf
    return float(v[l - 1]), float(v[n - l])
