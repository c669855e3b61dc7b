"""Learned exit gates: a small logistic model per exit that scores "answer here" from what the
cascade already has, the softmax of this exit and of every exit before it.

Max-softmax looks at the current exit alone. A gate also sees whether the earlier exits agreed
with it and how sure a running ensemble of their probabilities is (Zero Time Waste, Wołczyk
et al., NeurIPS 2021, reuses earlier exits the same way; CATs, Schuster et al., 2021, trains
a consistency classifier per exit). Its score, sigmoid(bias + weights . features), lies in
[0, 1] like every confidence score, so the same threshold searches and the same risk control
choose its thresholds, and a threshold above 1 switches an exit off.

The features are computed per row in Python floats, by this one function, both at run time
and in calibration's offline replay: from the same probabilities (`Softmax.exp_rows`, by
math.exp: the same bits at any batch size, and no numpy call on the hot path) they give the
same bits, so the runtime decides exactly as the replay did (on the same machine: another
libm may round an exp differently in the last place, as another numpy build may). An exit
switched off (threshold above 1) is not computed, as under confidence thresholds, and the
later gates read only the exits that were: calibration scores every plan with the features
that plan gives, and fits each gate on the features of every plan.

The weights are plain numbers in the manifest (`Thresholds.gates`); no library is needed to
run them, and the runtime stays free of torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from byot_edge.errors import ByotError
from byot_edge.plans import Plan

GATE = "gate"  # the criterion name a gated manifest records
FEATURES = (
    "max_softmax",  # this exit's top probability
    "margin",  # its top minus its second probability
    "entropy",  # 1 - H(p) / log C
    "agrees_with_previous",  # 1 if the previous exit's class is this exit's (1 at exit 1)
    "previous_probability",  # the previous exit's probability of this exit's class
    "agreeing_share",  # share of the earlier exits whose class is this exit's (1 at exit 1)
    "ensemble_max",  # top probability of the mean of exits 1..k
    "ensemble_agrees",  # 1 if that mean's class is this exit's
    "ensemble_margin",  # its top minus its second probability
)
NUM_FEATURES = len(FEATURES)
# sigmoid(z) is 1.0 in float64 above about 37 and math.exp overflows below -709.
_Z_LIMIT = 700.0
_fsum, _log, _exp = math.fsum, math.log, math.exp


def _top_two(p: list[float]) -> tuple[int, float, float]:
    """The first index of the largest value, the largest and the second largest."""
    if len(p) < 2:
        return 0, p[0], 0.0
    first, second = sorted(p)[-2:][::-1]
    return p.index(first), first, second


def row_features(p: list[float], earlier: Sequence[list[float]]) -> list[float]:
    """The gate's features of one sample at exit k: `p` its probabilities there, `earlier`
    its probabilities at the exits computed before (in order). Sums are math.fsum, exactly
    rounded, so they have the same bits on every Python and platform; C built-ins (sorted,
    index, fsum) rather than Python loops keep it cheap at batch 1."""
    c, top, second = _top_two(p)
    n = len(p)
    entropy = -_fsum([v * _log(v) for v in p if v > 0])
    confident = 1.0 - entropy / _log(n) if n > 1 else 1.0
    if not earlier:
        return [top, top - second, confident, 1.0, top, 1.0, top, 1.0, top - second]
    classes = [e.index(max(e)) for e in earlier]
    k = len(earlier) + 1
    ensemble = [_fsum(col) / k for col in zip(p, *earlier, strict=True)]
    ec, em, es = _top_two(ensemble)
    return [top, top - second, confident, 1.0 if classes[-1] == c else 0.0, earlier[-1][c],
            classes.count(c) / len(earlier), em, 1.0 if ec == c else 0.0, em - es]


def gate_score(features: Sequence[float], weights: Sequence[float], bias: float) -> float:
    """sigmoid(bias + weights . features), summed left to right."""
    z = bias
    for w, f in zip(weights, features, strict=True):
        z += w * f
    if z != z:  # NaN features (a NaN logit): never confident
        return 0.0
    z = min(max(z, -_Z_LIMIT), _Z_LIMIT)
    return 1.0 / (1.0 + _exp(-z))


@dataclass(frozen=True)
class Gate:
    """One exit's logistic model over `FEATURES`."""

    weights: tuple[float, ...]
    bias: float

    def as_dict(self) -> dict[str, object]:
        return {"weights": list(self.weights), "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict[str, object], where: str = "the manifest") -> Gate:
        try:
            weights = tuple(float(w) for w in d["weights"])  # type: ignore[attr-defined]
            bias = float(d["bias"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            raise ByotError(f"{where} has a gate without numeric 'weights' and 'bias'; "
                            "re-run `byot-edge calibrate --criterion gate`") from None
        if len(weights) != NUM_FEATURES or not all(map(math.isfinite, (*weights, bias))):
            raise ByotError(f"{where} has a gate of {len(weights)} weights; this runtime's "
                            f"gates take {NUM_FEATURES} finite ones ({', '.join(FEATURES)}); "
                            "re-run `byot-edge calibrate --criterion gate`")
        return cls(weights, bias)


@dataclass(frozen=True)
class ExitGates:
    """The gated cascade: exit k < K answers a sample when its gate's score reaches
    `values[k-1]`; exit K answers everyone."""

    gates: tuple[Gate, ...]  # one per exit 1..K-1
    values: tuple[float, ...]  # thresholds, one per exit 1..K-1
    temperatures: tuple[float, ...] | None = None  # one per exit 1..K
    # The runtime hands this policy the probabilities of the earlier exits (`Step.earlier`).
    uses_earlier_exits = True

    def __post_init__(self) -> None:
        if len(self.gates) != len(self.values):
            raise ByotError(f"{len(self.gates)} gates for {len(self.values)} thresholds; a "
                            f"{len(self.values) + 1}-exit model needs one gate per exit "
                            f"1..{len(self.values)}; re-run `byot-edge calibrate --criterion "
                            "gate`")
        if any(v != v for v in self.values):
            raise ByotError("a threshold is NaN; pass numbers in [0, 1]")

    @classmethod
    def for_model(cls, gates: Sequence[Gate], threshold: float | Sequence[float],
                  num_exits: int, temperatures: Sequence[float] | None = None) -> ExitGates:
        """The gates with one threshold for every shallow exit, or a list of K-1."""
        values = ([float(threshold)] * (num_exits - 1) if isinstance(threshold, int | float)
                  else [float(v) for v in threshold])
        if len(values) != num_exits - 1 or len(gates) != num_exits - 1:
            raise ByotError(f"expected one threshold or {num_exits - 1} and {num_exits - 1} gates "
                            f"(one per exit 1..{num_exits - 1}), got {len(values)} thresholds "
                            f"and {len(gates)} gates")
        temps = tuple(float(t) for t in temperatures) if temperatures is not None else None
        return cls(tuple(gates), tuple(values), temps)

    def temperature(self, k: int) -> float:
        return 1.0 if self.temperatures is None else self.temperatures[k - 1]

    def scores(self, step: object) -> list[float]:
        """Each running sample's gate score at `step` (a `policies.Step`)."""
        sm = step.softmax(self.temperature(step.exit))  # type: ignore[attr-defined]
        gate = self.gates[step.exit - 1]  # type: ignore[attr-defined]
        earlier = step.earlier or []  # type: ignore[attr-defined]
        out = []
        for i, p in enumerate(sm.exp_rows()):
            f = row_features(p, [e[i] for e in earlier])
            out.append(gate_score(f, gate.weights, gate.bias))
        return out

    def __call__(self, step: object) -> list[bool]:
        k, n = step.exit, len(step.logits)  # type: ignore[attr-defined]
        if k >= step.num_exits:  # type: ignore[attr-defined]
            return [True] * n
        t = self.values[k - 1]
        return [s >= t for s in self.scores(step)]

    def worst_case(self) -> ExitGates:
        """The same cascade for a sample no gate lets go (thresholds at or below 0 stay)."""
        from byot_edge.runtime.policies import NEVER

        return ExitGates(self.gates, tuple(NEVER if v > 0 else v for v in self.values),
                         self.temperatures)

    def active_exits(self, num_exits: int) -> Plan:
        """The exits that can answer: those switched on, and the deepest. The others are not
        computed, so the gates of later exits read the exits that were (`Step.earlier`)."""
        return Plan.from_thresholds(self.values, num_exits)
