"""Exact binomial tails and Clopper-Pearson limits: what calibration's risk control
(calibrate/risk.py) bounds its risks with and what the server's audit (runtime/audit.py)
holds live agreement to. numpy only, so the runtime can use it on a device."""

from __future__ import annotations

import numpy as np


class _LogFactorials:
    """log(m!) for m = 0..n, grown on demand (exact enough: a cumulative sum of logs)."""

    def __init__(self) -> None:
        self._table = np.zeros(1)

    def upto(self, n: int) -> np.ndarray:
        if len(self._table) <= n:
            self._table = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
        return self._table


_LOG_FACT = _LogFactorials()


def binomial_cdf(x: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= x), summed exactly in log space."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    lf = _LOG_FACT.upto(n)
    k = np.arange(x + 1)
    log_pmf = lf[n] - lf[k] - lf[n - k] + k * np.log(p) + (n - k) * np.log1p(-p)
    top = log_pmf.max()
    return float(min(1.0, np.exp(top) * np.exp(log_pmf - top).sum()))


def upper_bound(x: int, n: int, delta: float) -> float:
    """Clopper-Pearson upper limit: the largest p with P(Binomial(n, p) <= x) >= delta, so
    P(true p > limit) <= delta. x = n gives 1."""
    if x >= n:
        return 1.0
    lo, hi = x / n, 1.0
    for _ in range(64):  # bisection: the CDF falls as p grows
        mid = (lo + hi) / 2
        if binomial_cdf(x, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def lower_bound(x: int, n: int, delta: float) -> float:
    """Clopper-Pearson lower limit: P(true p < limit) <= delta. x = 0 gives 0."""
    if x <= 0:
        return 0.0
    return 1.0 - upper_bound(n - x, n, delta)
