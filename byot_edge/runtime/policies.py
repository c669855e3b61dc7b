"""Exit policies: pure decisions on one exit's logits, with no backend and no clock.

A policy is called after exit k has been computed for the samples still running. It sees a
`Step` (the exit, its logits, the time spent so far and the predicted cost of the next
segment) and answers a boolean mask: True = answer this sample now from exit k. At the
deepest exit every policy answers everything.

Confidence scores all lie in [0, 1] and higher means more confident, so one rule serves
every criterion: exit k < K answers a sample when `score >= thresholds[k-1]`. A threshold
above 1 turns an exit off (`NEVER`).

`simulate` runs a policy over recorded logits ([K, N, C], as `byot-edge eval --save-logits`
writes them) exactly as the anytime model runs it over a backend, so calibration and tests
can replay a cascade offline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import THRESHOLD_OFF
from byot_edge.plans import Plan

CRITERIA = ("max_softmax", "entropy", "margin")
# Scores are <= 1, so this threshold never lets a sample out (JSON has no infinity).
NEVER = THRESHOLD_OFF


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ByotError(f"unknown confidence criterion {criterion!r}; choose one of: "
                        f"{', '.join(CRITERIA)}")
    return criterion


# The ufuncs' reductions themselves: ndarray.max and .sum go through a Python wrapper first.
_max = np.maximum.reduce
_exp = np.exp
_math_exp = math.exp
_fsum = math.fsum
# Softmaxes of at most this many logits are worked out in Python floats, larger ones in
# numpy: right after an inference every numpy call costs tens of microseconds, more than
# the arithmetic of a few rows; measured so, Python floats took 23 against 36 us for 1 x 10
# logits, as long for 8 x 10, and 210 against 137 us for 32 x 10 (docs/design.md, "The
# runtime's own time").
PYTHON_MAX_LOGITS = 100


class Softmax:
    """softmax(logits / temperature) over the last axis, in float64: each row's `classes`
    (numpy's argmax of the logits) and max-softmax `scores`, the probabilities when asked
    (the score needs only the normaliser).

    Per row, with z = float64(logits) / T: e = exp(z - max z) by numpy's exp, s = the sum of
    e from the first class to the last, score = 1 / s (bit for bit the largest probability,
    since the largest e is exp(0) = 1), probabilities e / s. Small inputs do these same
    float64 operations in Python floats (numpy's exp on the differences, in one call), large
    ones in numpy: either way a row's values are the same to the last bit, whatever batch it
    is in, so the runtime at batch 1, a server's batch and an offline replay over a
    validation set take the same decisions (tests/test_policies.py).
    """

    __slots__ = ("_classes", "_e", "_exp_rows", "_logits", "_probabilities", "_rows", "_scores",
                 "_shifted", "_sums", "_temperature")

    def __init__(self, logits: np.ndarray, temperature: float = 1.0) -> None:
        if type(logits) is not np.ndarray:
            logits = np.asarray(logits)
        if logits.ndim != 2:
            logits = logits.reshape(-1, logits.shape[-1])
        self._logits = logits
        self._temperature = temperature
        self._exp_rows: list[list[float]] | None = None
        self._probabilities: np.ndarray | None = None
        self._scores: list[float] | None = None
        if logits.size > PYTHON_MAX_LOGITS:
            self._numpy(logits, temperature)
            return
        # As few numpy calls and Python steps as there can be: right after an inference each
        # costs more than the arithmetic (docs/design.md, "The runtime's own time"). The
        # exps wait until a value is read (`at_least` decides without them where it can).
        rows = self._rows = logits.tolist()  # exact: float32 and float16 widen
        shifted: list[float] = []
        classes: list[int] = []
        for row in rows:  # loops, not comprehensions: each of those is a call in 3.11
            z = row if temperature == 1.0 else [v / temperature for v in row]
            m = max(z)
            classes.append(z.index(m))
            for v in z:
                shifted.append(v - m)
        self._shifted, self._classes = shifted, classes

    def _numpy(self, logits: np.ndarray, temperature: float) -> None:
        self._rows = None
        z = logits.astype(np.float64)
        if temperature != 1.0:
            z /= temperature
        z -= _max(z, -1, None, None, True)  # (axis, dtype, out, keepdims)
        np.exp(z, z)
        self._e = z
        self._sums = np.add.accumulate(z, -1)[:, -1]
        self._scores = np.divide(1.0, self._sums).tolist()
        self._classes = logits.argmax(-1).tolist()

    def _row_sums(self, e: list[float]) -> list[float]:
        """Each row's sum of `e` (flat, row after row), first class to last, as
        np.add.accumulate sums."""
        c = self._logits.shape[1] or 1
        sums: list[float] = []
        for i in range(0, len(e), c):
            s = 0.0
            for v in e[i:i + c]:
                s += v
            sums.append(s)
        return sums

    def _exact(self) -> list[float]:
        """The Python floats' exps, sums and scores (numpy's exp, in one call)."""
        e = self._e = _exp(self._shifted).tolist()
        sums = self._sums = self._row_sums(e)
        scores = self._scores = [1.0 / s for s in sums]
        for i, s in enumerate(sums):
            if s != s:  # a NaN (or an inf) in the row: numpy's argmax names the first NaN
                assert self._rows is not None
                self._classes[i] = next((j for j, v in enumerate(self._rows[i]) if v != v),
                                        self._classes[i])
        return scores

    @property
    def scores(self) -> list[float]:
        """Each row's max-softmax score."""
        return self._scores if self._scores is not None else self._exact()

    @property
    def classes(self) -> list[int]:
        if self._scores is None:
            self._exact()  # a row with a NaN names its first NaN
        return self._classes

    def at_least(self, threshold: float) -> list[bool]:
        """score >= threshold per row, as `scores` decides it. Rows still in Python floats
        are first decided with math.exp, which is not numpy's exp but within a few units in
        the last place of it (of 2**-52), so where the score is further than 1e-9 of the
        threshold from it the answer is the same; only if some row is that close are numpy's
        exps taken. At batch 1 this spares a cascade step that answers no one its numpy call
        (docs/design.md, "The runtime's own time")."""
        t = threshold
        if self._scores is None:
            near = 1e-9 * abs(t)
            rough = [1.0 / s for s in self._row_sums([_math_exp(v) for v in self._shifted])]
            if all(abs(s - t) > near for s in rough):  # False for a NaN: numpy's say
                return [s >= t for s in rough]
        return [s >= t for s in self.scores]

    def exp_rows(self) -> list[list[float]]:
        """The probabilities by `math.exp`, one list of Python floats per row (computed once):
        what the learned gates read. Not `probabilities()`' bits (numpy's exp differs from
        math.exp in the last places), but the same bits for a row at any batch size and in
        calibration, which computes them by this method too; and no numpy call at all, which
        right after an inference costs more than the arithmetic (docs/design.md)."""
        if self._exp_rows is None:
            t = self._temperature
            out = []
            for row in (self._rows if self._rows is not None else self._logits.tolist()):
                z = row if t == 1.0 else [v / t for v in row]
                m = max(z)
                e = [_math_exp(v - m) for v in z]
                total = _fsum(e)  # exactly rounded: the same bits on every platform
                out.append([v / total for v in e])
            self._exp_rows = out
        return self._exp_rows

    def probabilities(self) -> np.ndarray:
        """[n, C] float64 (computed once; do not modify it)."""
        if self._probabilities is None:
            if self._scores is None:
                self._exact()
            n, c = self._logits.shape
            if isinstance(self._e, np.ndarray):
                self._probabilities = self._e / np.asarray(self._sums)[:, None]
            else:
                e, sums = self._e, self._sums
                p = [e[i * c + j] / s for i, s in enumerate(sums) for j in range(c)]
                self._probabilities = np.array(p).reshape(n, c)
        return self._probabilities


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis, in float64 (see `Softmax`)."""
    logits = np.asarray(logits)
    return Softmax(logits, temperature).probabilities().reshape(logits.shape)


def confidence(logits: np.ndarray, criterion: str = "max_softmax",
               temperature: float = 1.0) -> np.ndarray:
    """Per-sample confidence in [0, 1] (higher = more sure) of logits [..., C].

    max_softmax: the top class probability; margin: top minus second probability;
    entropy: 1 - H(p) / log(C), so a one-hot prediction scores 1 and a uniform one 0.
    """
    check_criterion(criterion)
    logits = np.asarray(logits)
    return np.array(scores_of(Softmax(logits, temperature), criterion),
                    np.float64).reshape(logits.shape[:-1])


def scores_of(sm: Softmax, criterion: str) -> list[float]:
    """`confidence` of each row from the softmax of the logits (the max-softmax score
    without the probabilities themselves)."""
    if criterion == "max_softmax":
        return sm.scores
    return confidence_of(sm.probabilities(), criterion).tolist()


def confidence_of(p: np.ndarray, criterion: str) -> np.ndarray:
    """`confidence` from probabilities p = softmax(logits, temperature) [..., C]."""
    if criterion == "max_softmax":
        return _max(p, axis=-1)
    if criterion == "margin":
        top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    num_classes = p.shape[-1]
    h = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)
    return 1.0 - h / np.log(num_classes) if num_classes > 1 else np.ones(p.shape[:-1])


@dataclass(slots=True)  # not frozen: its __init__ then costs half (one Step per step)
class Step:
    """What a policy sees after exit `exit` ran on the samples still in the cascade."""

    exit: int  # 1..num_exits, the exit just computed
    num_exits: int
    logits: np.ndarray  # [n, C] of the samples still running
    elapsed_ms: float = 0.0  # since the request started
    # predicted time of the cascade's next step (the sections up to the next exit that is
    # on); None: unknown
    next_cost_ms: float | None = None
    # For policies that read the earlier exits (`uses_earlier_exits`, the learned gates):
    # per exit computed before this one, each running sample's probabilities there (rows of
    # Python floats, aligned with `logits`); None for other policies.
    earlier: list[list[list[float]]] | None = None
    # Where the samples still running sit in the batch the cascade started with (None: all
    # of them, in order): what per-sample state such as a request's deadline is indexed by.
    rows: list[int] | None = None
    # softmax(logits) by temperature, computed once per step: the policy scores with it and
    # the anytime model answers with it
    _softmax: dict[float, Softmax] = field(default_factory=dict, init=False, compare=False,
                                           repr=False)

    def softmax(self, temperature: float = 1.0) -> Softmax:
        sm = self._softmax.get(temperature)
        if sm is None:
            sm = self._softmax[temperature] = Softmax(self.logits, temperature)
        return sm

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        """softmax(self.logits, temperature), [n, C] float64; do not modify it."""
        return self.softmax(temperature).probabilities()


class Policy(Protocol):
    def __call__(self, step: Step) -> Sequence[bool] | np.ndarray:
        """n booleans (a list or a numpy mask): True answers that sample from `step.exit`
        now."""
        ...


def _all(step: Step, value: bool) -> list[bool]:
    return [value] * len(step.logits)


@dataclass(frozen=True)
class ConfidenceThresholds:
    """Answer at exit k < K when the criterion's score reaches `values[k-1]`."""

    values: tuple[float, ...]  # one per exit 1..K-1
    criterion: str = "max_softmax"
    temperatures: tuple[float, ...] | None = None  # one per exit 1..K

    def __post_init__(self) -> None:
        check_criterion(self.criterion)
        if self.temperatures is not None and any(t <= 0 for t in self.temperatures):
            raise ByotError(f"temperatures must be positive, got {list(self.temperatures)}")

    @classmethod
    def for_model(cls, threshold: float | Sequence[float], num_exits: int,
                  criterion: str = "max_softmax",
                  temperatures: Sequence[float] | None = None) -> ConfidenceThresholds:
        """One threshold for every shallow exit, or a list of K-1 of them."""
        values = ([float(threshold)] * (num_exits - 1) if np.isscalar(threshold)
                  else [float(v) for v in threshold])  # type: ignore[union-attr]
        if len(values) != num_exits - 1:
            raise ByotError(f"expected one threshold or {num_exits - 1} (one per exit "
                            f"1..{num_exits - 1}; exit {num_exits} always answers), got "
                            f"{len(values)}")
        if any(np.isnan(v) for v in values):
            raise ByotError("a threshold is NaN; pass numbers in [0, 1]")
        if temperatures is not None and len(temperatures) != num_exits:
            raise ByotError(f"expected {num_exits} temperatures (one per exit), got "
                            f"{len(temperatures)}; re-run `byot-edge calibrate`")
        temps = tuple(float(t) for t in temperatures) if temperatures is not None else None
        return cls(tuple(values), criterion, temps)

    def temperature(self, k: int) -> float:
        return 1.0 if self.temperatures is None else self.temperatures[k - 1]

    def scores(self, k: int, logits: np.ndarray) -> np.ndarray:
        return confidence(logits, self.criterion, self.temperature(k))

    def __call__(self, step: Step) -> list[bool]:
        if step.exit >= step.num_exits:
            return _all(step, True)
        sm = step.softmax(self.temperature(step.exit))
        t = self.values[step.exit - 1]
        if self.criterion == "max_softmax":
            return sm.at_least(t)
        return [s >= t for s in scores_of(sm, self.criterion)]

    def worst_case(self) -> ConfidenceThresholds:
        """The same cascade for a sample that every exit it can pass lets go: thresholds
        that could answer it become NEVER; those at or below 0 (answer everyone) stay.
        Run it with this policy's `active_exits` as the plan, to time the slowest path."""
        values = tuple(NEVER if v > 0 else v for v in self.values)
        return ConfidenceThresholds(values, self.criterion, self.temperatures)

    def active_exits(self, num_exits: int) -> Plan:
        """The exits that can answer: those switched on, and the deepest."""
        return Plan.from_thresholds(self.values, num_exits)


@dataclass(frozen=True)
class Deadline:
    """Wraps a policy: also answers a sample when the next step would overrun its budget.

    The samples that cannot afford the next step answer from the exit just computed, the
    deepest (and so, for a self-distilled network, the best) exit they have reached.
    `budget_ms`: one budget for the whole batch, or one per sample of the batch the cascade
    started with (a server's requests in one batch each have their own time left), indexed
    through `Step.rows`.
    """

    budget_ms: float | tuple[float, ...]
    inner: Policy

    def __call__(self, step: Step) -> Sequence[bool] | np.ndarray:
        if step.exit == step.num_exits or step.next_cost_ms is None:
            return self.inner(step)
        finish = step.elapsed_ms + step.next_cost_ms
        budget = self.budget_ms
        if not isinstance(budget, tuple):
            return _all(step, True) if finish > budget else self.inner(step)
        rows = range(len(step.logits)) if step.rows is None else step.rows
        late = [finish > budget[i] for i in rows]
        if all(late):
            return _all(step, True)
        if not any(late):
            return self.inner(step)
        inner = self.inner(step)
        return [a or bool(b) for a, b in zip(late, inner, strict=True)]


def uses_earlier_exits(policy: Policy) -> bool:
    """Whether `policy` (or the one a Deadline wraps) reads `Step.earlier`."""
    inner = policy.inner if isinstance(policy, Deadline) else policy
    return bool(getattr(inner, "uses_earlier_exits", False))


def policy_temperature(policy: Policy, k: int) -> float:
    """The temperature `policy` scores exit k at (1 for policies without one)."""
    inner = policy.inner if isinstance(policy, Deadline) else policy
    temperature = getattr(inner, "temperature", None)
    return float(temperature(k)) if callable(temperature) else 1.0


def exits_to_compute(policy: Policy, num_exits: int) -> Plan:
    """The exits whose logits a cascade under `policy` needs: for thresholds, also under a
    deadline, the exits switched on (the branches of the others are skipped, as calibration
    prices them); for any other policy, all."""
    inner = policy.inner if isinstance(policy, Deadline) else policy
    active = getattr(inner, "active_exits", None)  # thresholds and learned gates
    return active(num_exits) if callable(active) else Plan.every_exit(num_exits)


def deepest_exit_within(latency_ms: Sequence[float], budget_ms: float) -> int | None:
    """The deepest exit (1..K) whose latency fits `budget_ms`; None when not even one fits."""
    fitting = [k for k, ms in enumerate(latency_ms, start=1) if ms <= budget_ms]
    return max(fitting) if fitting else None


@dataclass(frozen=True)
class Simulation:
    exits: np.ndarray  # [N] int64, 1..K
    predictions: np.ndarray  # [N] int64 class indices
    # (exit, samples that ran the step to it): what a backend would run, one step per exit
    # of the plan (the exits that are on)
    steps: list[tuple[int, int]]


def simulate(logits: np.ndarray, policy: Policy,
             segment_ms: Sequence[float] | None = None) -> Simulation:
    """Replay a cascade on recorded logits [K, N, C] the way the anytime model runs it,
    through the exits `exits_to_compute` names.

    `segment_ms` gives each segment a fixed duration (a step takes its segments' sum), so
    deadline policies can be replayed deterministically; without it time stands still (and
    the next cost is unknown).
    """
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ByotError(f"expected logits of shape [exits, samples, classes], got {logits.shape}")
    num_exits, n, _ = logits.shape
    exits = np.zeros(n, dtype=np.int64)
    preds = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    steps: list[tuple[int, int]] = []
    elapsed = 0.0
    plan = exits_to_compute(policy, num_exits).steps()
    earlier: list[list[list[float]]] | None = [] if uses_earlier_exits(policy) else None
    for j, (first, k) in enumerate(plan):
        steps.append((k, len(active)))
        nxt = None
        if segment_ms is not None:
            elapsed += sum(segment_ms[first - 1:k])
            if k < num_exits:
                nxt = float(sum(segment_ms[k:plan[j + 1][1]]))
        z = logits[k - 1, active]
        step = Step(k, num_exits, z, elapsed, nxt, earlier)
        answer = np.asarray(policy(step), dtype=bool)
        if k == num_exits:
            answer[:] = True  # the deepest exit always answers
        exits[active[answer]] = k
        preds[active[answer]] = z[answer].argmax(axis=-1)
        if earlier is not None:  # as the runtime keeps them: the samples that go on
            rows = step.softmax(policy_temperature(policy, k)).exp_rows()
            keep = np.flatnonzero(~answer).tolist()
            earlier = [[r[i] for i in keep] for r in [*earlier, rows]]
        active = active[~answer]
        if len(active) == 0:
            break
    return Simulation(exits, preds, steps)


def exits_for_thresholds(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Vectorised cascade: 0-based exit of each sample from scores [K-1 or K, N].

    The same rule as `ConfidenceThresholds` (first exit whose score reaches its threshold,
    else the deepest), in one pass; calibration evaluates thousands of candidates with it.
    """
    shallow = len(thresholds)
    t = np.asarray(thresholds, dtype=np.float64)[:, None]
    go = np.asarray(scores[:shallow]) >= t
    go = np.concatenate([go, np.ones((1, go.shape[1]), dtype=bool)])
    return go.argmax(axis=0)
