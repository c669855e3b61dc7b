"""Risk control: thresholds whose risk on new data is bounded with probability 1 - delta.

A point estimate picks the cheapest candidate that just meets the target on the calibration
samples, and so the candidates that were lucky there: calibrated to lose 0.5 points, a
cascade loses more on new data most of the time. Learn-then-Test (Angelopoulos et al., 2021;
for early exits: Jazbec et al., NeurIPS 2024, and CALM, Schuster et al., NeurIPS 2022) fixes
that in two moves:

1. *learn* an order of the candidates, from conservative to aggressive, on one part of the
   calibration samples (`fit`): the frontier of risk against cost found there;
2. *test* them in that order on the other part (`test`), each at level delta, and stop at the
   first that fails (fixed-sequence testing: no multiplicity correction is needed, since
   a test runs only after every earlier one passed). The last one that passed is chosen.

Because the order never saw the test part, the chosen candidate's risk on new data from the
same distribution exceeds the target with probability at most delta over the draw of the
calibration samples. Nothing is promised for data that is distributed otherwise.

The risks, both per sample and bounded by exact binomial (Clopper-Pearson) limits:

- `drop`: accuracy points lost against the deepest exit, drop = P(A) - P(B), where A = "the
  cascade is wrong and the deepest exit right" and B = the other way round. Bounded by
  UCB(P(A), delta/2) - LCB(P(B), delta/2) (a union bound over the two limits). Needs labels.
- `disagreement`: the share of samples whose answer differs from the deepest exit's,
  bounded by UCB(delta). Needs no labels, so it can be measured on unlabeled deployment
  data; and it bounds the drop too (drop <= P(A) <= disagreement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from byot_edge.binomial import lower_bound, upper_bound
from byot_edge.errors import ByotError

RISKS = ("drop", "disagreement")


def check_delta(delta: float) -> float:
    if not 0 < delta < 1:
        raise ByotError(f"--delta is the probability that the promise fails, strictly between 0 "
                        f"and 1 (0.1: it holds with probability 0.9), got {delta}")
    return float(delta)


def check_risk(risk: str) -> str:
    if risk not in RISKS:
        raise ByotError(f"unknown risk {risk!r}; choose one of: {', '.join(RISKS)}")
    return risk


@dataclass(frozen=True)
class RiskCounts:
    """What decides a candidate's risk on some samples: counts out of `n`."""

    n: int
    lost: int  # the cascade wrong where the deepest exit is right (A)
    gained: int  # the cascade right where the deepest exit is wrong (B)
    disagree: int  # the cascade's class differs from the deepest exit's

    def empirical(self, risk: str) -> float:
        """The risk on these samples, as a fraction."""
        if risk == "drop":
            return (self.lost - self.gained) / self.n
        return self.disagree / self.n


def risk_bound(counts: RiskCounts, risk: str, delta: float) -> float:
    """A bound that the risk on new data exceeds with probability at most delta."""
    n = counts.n
    if risk == "drop":
        return (upper_bound(counts.lost, n, delta / 2)
                - lower_bound(counts.gained, n, delta / 2))
    return upper_bound(counts.disagree, n, delta)


@dataclass(frozen=True)
class Guarantee:
    """What risk control promised, as the manifest records it."""

    risk: str  # "drop" or "disagreement"
    max_risk: float  # the target, a fraction (0.005 = 0.5 points)
    delta: float
    bound: float  # the chosen candidate's bound (<= max_risk), a fraction
    fit_samples: int  # samples that ordered the candidates
    test_samples: int  # samples the bound is computed on
    tested: int  # candidates tested before the first failure (or the end)
    method: str = "ltt"  # Learn-then-Test, fixed-sequence testing, Clopper-Pearson limits

    def as_dict(self) -> dict[str, float | int | str]:
        return {"method": self.method, "risk": self.risk, "max_risk": self.max_risk,
                "delta": self.delta, "bound": self.bound, "fit_samples": self.fit_samples,
                "test_samples": self.test_samples, "tested": self.tested}

    def describe(self) -> str:
        what = ("accuracy drop against the deepest exit" if self.risk == "drop"
                else "disagreement with the deepest exit")
        return (f"{what} <= {100 * self.max_risk:g} points with probability >= "
                f"{1 - self.delta:g} on new data from the same distribution (bound "
                f"{100 * self.bound:.2f} points on {self.test_samples} held-back samples; "
                f"order learned on {self.fit_samples})")


def fixed_sequence(counts: list[RiskCounts], risk: str, max_risk: float,
                   delta: float) -> tuple[int, float, int]:
    """Test `counts` (ordered conservative to aggressive) at level delta until the first
    failure: (the index of the last that passed, its bound, how many were tested); -1 when
    the first fails."""
    chosen, bound, tested = -1, float("nan"), 0
    for i, c in enumerate(counts):
        tested = i + 1
        b = risk_bound(c, risk, delta)
        if b > max_risk:
            break
        chosen, bound = i, b
    return chosen, bound, tested


def split_indices(n: int, fit_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random split of 0..n-1 into (fit, test) parts, both sorted."""
    if not 0 < fit_fraction < 1:
        raise ByotError(f"--fit-fraction must be strictly between 0 and 1, got {fit_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    cut = round(n * fit_fraction)
    if cut < 1 or cut >= n:
        raise ByotError(f"{n} calibration samples are too few to split {fit_fraction:g} / "
                        f"{1 - fit_fraction:g}; use more validation samples")
    return np.sort(perm[:cut]), np.sort(perm[cut:])
