"""Candidates: thresholds scored by an offline replay of the cascade on validation logits.

Every candidate set of thresholds is scored (`exits_for_thresholds`, the runtime's own rule)
for its accuracy and its expected cost per sample: FLOPs of the steps each sample runs, or
their measured latency when the manifest holds a profile (`calibrate.costs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from byot_edge.calibrate.costs import Costs
from byot_edge.calibrate.risk import Guarantee, RiskCounts
from byot_edge.plans import Plan
from byot_edge.runtime.gates import Gate
from byot_edge.runtime.policies import exits_for_thresholds


@dataclass(frozen=True)
class Candidate:
    method: str
    thresholds: tuple[float, ...]  # K-1 values; NEVER switches an exit off
    accuracy: float
    flops: float  # expected per sample
    latency_ms: float | None
    fractions: tuple[float, ...]  # share of samples answered at each exit 1..K
    # What the slowest sample costs: one that no exit lets go before the first exit that
    # answers everyone (threshold 0), else the deepest (the cascade's worst case)
    worst_flops: float = 0.0
    worst_latency_ms: float | None = None
    # What risk control reads (calibrate/risk.py): counts over the `n` samples scored
    risk: RiskCounts | None = None
    # Per exit 1..K: (samples answered there with the deepest exit's class, samples answered
    # there): what the server's online audit compares live answers with (runtime/audit.py)
    exit_agreement: tuple[tuple[int, int], ...] | None = None

    @property
    def agreement(self) -> float:
        """Share of samples answered with the deepest exit's class."""
        return 1.0 - self.risk.disagree / self.risk.n if self.risk else float("nan")

    def cost(self, metric: str) -> float:
        return self.flops if metric == "flops" else float(self.latency_ms or 0.0)

    def worst(self, metric: str) -> float:
        return self.worst_flops if metric == "flops" else float(self.worst_latency_ms or 0.0)


@dataclass
class Calibration:
    criterion: str
    temperatures: list[float] | None
    metric: str  # "flops" or "latency": what expected cost means below
    objective: str  # human description
    chosen: Candidate
    candidates: list[Candidate]  # every distinct candidate evaluated
    exits_alone: list[Candidate]  # exit k for everyone, its truncated file's cost
    deepest_accuracy: float
    num_samples: int
    costs: Costs
    notes: list[str] = field(default_factory=list)
    guarantee: Guarantee | None = None  # None: a point estimate on the calibration samples
    gates: list[Gate] | None = None  # criterion "gate": the fitted gates, one per exit 1..K-1

    def frontier(self, metric: str | None = None) -> list[Candidate]:
        """Candidates no other beats on both accuracy and expected cost (`metric`, default
        the one optimised), cheapest first."""
        metric = metric or self.metric
        best, out = -1.0, []
        for c in sorted(self.candidates, key=lambda c: (c.cost(metric), -c.accuracy)):
            if c.accuracy > best:
                out.append(c)
                best = c.accuracy
        return out


class Evaluator:
    """Scores thresholds by replaying the cascade on the recorded scores.

    `agree` ([K, N] bool: exit k's class is the deepest exit's) adds the counts risk control
    reads; `plan_scores`: where the scores depend on the exits a plan computes (learned
    gates), the scores under each plan (`scores` then serves the searches' grids)."""

    def __init__(self, scores: np.ndarray, correct: np.ndarray, costs: Costs,
                 agree: np.ndarray | None = None,
                 plan_scores: dict[Plan, np.ndarray] | None = None) -> None:
        self.scores = scores  # [K-1, N]
        self.correct = correct  # [K, N] bool
        self.agree = agree
        self.costs = costs
        self.plan_scores = plan_scores
        self.num_exits, self.n = correct.shape
        self.seen: dict[tuple[float, ...], Candidate] = {}
        self._plans: dict[tuple[Plan, str], list[float]] = {}

    def subset(self, idx: np.ndarray) -> Evaluator:
        """The same replay on the samples `idx` only."""
        agree = None if self.agree is None else self.agree[:, idx]
        by_plan = (None if self.plan_scores is None
                   else {plan: s[:, idx] for plan, s in self.plan_scores.items()})
        return Evaluator(self.scores[:, idx], self.correct[:, idx], self.costs, agree, by_plan)

    def _risk(self, e: np.ndarray) -> RiskCounts | None:
        if self.agree is None:
            return None
        cols = np.arange(self.n)
        right, deepest_right = self.correct[e, cols], self.correct[-1]
        return RiskCounts(self.n, int((~right & deepest_right).sum()),
                          int((right & ~deepest_right).sum()),
                          int((~self.agree[e, cols]).sum()))

    def _exit_agreement(self, e: np.ndarray,
                        counts: np.ndarray) -> tuple[tuple[int, int], ...] | None:
        if self.agree is None:
            return None
        agreeing = np.bincount(e, weights=self.agree[e, np.arange(self.n)],
                               minlength=self.num_exits)
        return tuple((round(a), int(n)) for a, n in zip(agreeing, counts, strict=True))

    def _plan_costs(self, plan: Plan, metric: str) -> list[float]:
        if (plan, metric) not in self._plans:
            self._plans[plan, metric] = self.costs.plan_costs(plan, metric)
        return self._plans[plan, metric]

    def __call__(self, thresholds: Sequence[float], method: str) -> Candidate:
        key = tuple(float(t) for t in thresholds)
        if key in self.seen:
            return self.seen[key]
        plan = Plan.from_thresholds(key, self.num_exits)
        scores = self.scores if self.plan_scores is None else self.plan_scores[plan]
        e = exits_for_thresholds(scores, key)
        counts = np.bincount(e, minlength=self.num_exits)
        acc = float(self.correct[e, np.arange(self.n)].mean())
        # Scores are >= 0: past an exit with threshold 0 no sample goes on.
        last = next((k for k, t in enumerate(key, start=1) if t <= 0), self.num_exits)
        flops_at = self._plan_costs(plan, "flops")
        flops, worst_flops = float(counts @ np.asarray(flops_at)) / self.n, flops_at[last - 1]
        latency = worst_latency = None
        if self.costs.latency_cascade is not None:
            latency_at = self._plan_costs(plan, "latency")
            latency = float(counts @ np.asarray(latency_at)) / self.n
            worst_latency = latency_at[last - 1]
        if plan.full_network:  # all off: the runtime runs the full network alone
            flops = worst_flops = self.costs.flops_alone[-1]
            latency = worst_latency = (self.costs.latency_alone[-1] if self.costs.latency_alone
                                       else None)
        c = Candidate(method, key, acc, flops, latency, tuple(float(v) for v in counts / self.n),
                      worst_flops, worst_latency, self._risk(e), self._exit_agreement(e, counts))
        self.seen[key] = c
        return c
