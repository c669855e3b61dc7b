"""Fitting the learned exit gates (`runtime/gates.py`) on validation logits.

Per exit k < K, a logistic regression over the gate's features predicts whether answering
there is safe: for the `drop` risk, that exit k is right or the deepest exit wrong (the
answer costs no accuracy against the deepest); for `disagreement`, that exit k's class is
the deepest exit's (no label needed). Fitted by Newton's method (IRLS) on standardised
features with a small L2 penalty, in numpy; the weights are folded back to the raw features,
so the runtime applies them as they are.

The features are computed by the runtime's own per-row function, so a score here has the
same bits as the runtime's (and the replay's decisions are the runtime's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from byot_edge.plans import Plan, all_plans
from byot_edge.runtime.gates import NUM_FEATURES, Gate, gate_score, row_features
from byot_edge.runtime.policies import Softmax

Features = list[list[float]]  # [sample][feature] at one exit


class PlanFeatures:
    """The gates' features of every sample at every exit 1..K-1, under every plan: the gate
    of exit k reads the exits before it that the plan computes, so each (exit, earlier exits)
    pair has its own features, computed once."""

    def __init__(self, logits: np.ndarray, temperatures: Sequence[float] | None = None) -> None:
        self.num_exits, self.n = logits.shape[:2]
        temps = list(temperatures) if temperatures is not None else [1.0] * self.num_exits
        self._probs = [Softmax(logits[k], temps[k]).exp_rows()
                       for k in range(self.num_exits - 1)]
        self._cache: dict[tuple[int, tuple[int, ...]], Features] = {}

    def at(self, k: int, earlier: tuple[int, ...]) -> Features:
        """Exit k's (1..K-1) features when the exits `earlier` (< k) were computed."""
        key = (k, earlier)
        if key not in self._cache:
            p, before = self._probs[k - 1], [self._probs[j - 1] for j in earlier]
            self._cache[key] = [row_features(p[i], [b[i] for b in before])
                                for i in range(self.n)]
        return self._cache[key]

    def of_plan(self, plan: Plan) -> list[Features]:
        """Per exit 1..K-1, its features under `plan` (an exit that is off: as if it were on,
        after the plan's exits before it; its score decides nothing)."""
        return [self.at(k, tuple(j for j in plan if j < k)) for k in range(1, self.num_exits)]

    def every_context(self, k: int) -> list[Features]:
        """Exit k's features under each set of earlier exits a plan can have."""
        return [self.at(k, tuple(j for j in range(1, k) if mask >> (j - 1) & 1))
                for mask in range(2 ** (k - 1))]


def gate_features(logits: np.ndarray, temperatures: Sequence[float] | None = None
                  ) -> list[Features]:
    """The gates' features at every exit 1..K-1 of logits [K, N, C], every exit computed."""
    return PlanFeatures(logits, temperatures).of_plan(Plan.every_exit(logits.shape[0]))


def gate_scores(features: list[Features], gates: Sequence[Gate]) -> np.ndarray:
    """[K-1, N] scores, each computed as the runtime computes it."""
    return np.array([[gate_score(f, g.weights, g.bias) for f in rows]
                     for rows, g in zip(features, gates, strict=True)], dtype=np.float64)


def plan_scores(features: PlanFeatures, gates: Sequence[Gate]) -> dict[Plan, np.ndarray]:
    """[K-1, N] scores under each plan a calibration can choose."""
    return {plan: gate_scores(features.of_plan(plan), gates)
            for plan in all_plans(features.num_exits)}


def gate_targets(logits: np.ndarray, labels: np.ndarray, risk: str) -> np.ndarray:
    """[K-1, N] bool: where answering at exit k is what the gate should learn to allow."""
    pred = logits.argmax(axis=2)
    if risk == "disagreement":
        return pred[:-1] == pred[-1]
    correct = pred == labels[None]
    return correct[:-1] | ~correct[-1]


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 100) -> Gate:
    """Logistic regression of y on x ([n, F]) by IRLS; the weights apply to raw x."""
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd < 1e-12] = 1.0  # a constant feature (exit 1's agreement ones): weight 0
    xa = np.hstack([np.ones((len(x), 1)), (x - mu) / sd])
    t = y.astype(np.float64)
    w = np.zeros(xa.shape[1])
    penalty = np.full(xa.shape[1], l2)
    penalty[0] = 0.0  # no penalty on the bias
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xa @ w, -30, 30)))
        grad = xa.T @ (p - t) + penalty * w
        hess = (xa * (p * (1 - p))[:, None]).T @ xa + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    weights = w[1:] / sd
    bias = w[0] - float(weights @ mu)
    return Gate(tuple(float(v) for v in weights), float(bias))


def fit_gates(features: PlanFeatures, targets: np.ndarray, idx: np.ndarray | None = None,
              l2: float = 1.0) -> list[Gate]:
    """One gate per exit 1..K-1, fitted on the samples `idx` (default: all) under every set
    of earlier exits a plan can compute, so it serves whichever plan calibration picks."""
    gates = []
    for k in range(1, features.num_exits):
        xs = [np.asarray(rows, dtype=np.float64).reshape(-1, NUM_FEATURES)
              for rows in features.every_context(k)]
        if idx is not None:
            xs = [x[idx] for x in xs]
        y = targets[k - 1] if idx is None else targets[k - 1][idx]
        gates.append(fit_logistic(np.concatenate(xs), np.tile(y, len(xs)), l2))
    return gates
