"""What a request to the anytime model is and what it gets back: `PredictOptions` (one
request's choice of exit, thresholds or budget), `CascadeResult` (arrays for a batch, and
what was run) and `Prediction` (one sample's answer). Plain data: servers, Triton models and
benchmarks share them without the model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.runtime.latency import check_stat
from byot_edge.runtime.policies import NEVER, check_criterion


@dataclass(frozen=True)
class Prediction:
    index: int  # class index
    label: str  # class name
    confidence: float  # probability of the class (temperature-scaled when calibrated so)
    exit: int  # 1..K, the exit that answered
    latency_ms: float  # from the start of the request until this sample was answered


@dataclass(frozen=True)
class PredictOptions:
    """One request's choice; at most one of `exit` and (`threshold` and/or `budget_ms`)."""

    threshold: float | Sequence[float] | None = None
    budget_ms: float | None = None
    exit: int | None = None
    criterion: str | None = None  # default: the calibrated one, else max_softmax
    stat: str = "p50"  # which profiled latency a budget is compared with

    def __post_init__(self) -> None:
        # The batcher groups requests by their options: a list would be unhashable (and
        # stop its worker), and [0.9] must group with (0.9,).
        # (The None test first spares most requests an abstract-class check.)
        if (self.threshold is not None and isinstance(self.threshold, Sequence)
                and not isinstance(self.threshold, tuple)):
            object.__setattr__(self, "threshold", tuple(self.threshold))

    def validate(self, num_exits: int) -> None:
        if (self.threshold is None and self.budget_ms is None and self.criterion is None
                and self.stat == "p50" and (self.exit is None or 1 <= self.exit <= num_exits)):
            return  # a fixed exit or the calibrated thresholds: nothing else to check
        if self.exit is not None and (self.threshold is not None or self.budget_ms is not None):
            raise ByotError("choose either exit, or threshold and/or budget_ms, not both")
        if self.exit is not None and not 1 <= self.exit <= num_exits:
            raise ByotError(f"exit {self.exit} does not exist: this model has exits "
                            f"1..{num_exits} ({num_exits} is the deepest)")
        if self.budget_ms is not None and not self.budget_ms > 0:
            raise ByotError(f"budget_ms must be a positive number of milliseconds, got "
                            f"{self.budget_ms}")
        values = ([] if self.threshold is None else list(self.threshold)
                  if isinstance(self.threshold, Sequence) else [self.threshold])
        try:
            bad = not all(0 <= float(t) <= 1 or float(t) == NEVER for t in values)
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise ByotError(f"threshold must be numbers in [0, 1] (or {NEVER:g} to switch an "
                            f"exit off), got {self.threshold}")
        if self.criterion is not None:
            check_criterion(self.criterion)
        check_stat(self.stat)


class CascadeResult:
    """A batch's answers, in input order, and what was run.

    `exits`, `latency_ms` and `probabilities` may be given in a compact form and are built
    when first read: an exit number and a time when one exit answered everyone, and a
    function for the probabilities. At batch 1 building arrays nobody reads costs more than
    their arithmetic (docs/design.md, "The runtime's own time"), and `predict` reads none.
    """

    __slots__ = ("_exits", "_latency_ms", "_probabilities", "calls", "confidences", "indices",
                 "mode", "step_ms", "warnings")

    def __init__(self, indices: np.ndarray, confidences: np.ndarray, exits: np.ndarray | int,
                 latency_ms: np.ndarray | float, mode: str,
                 calls: list[tuple[str, int]] | None = None,
                 probabilities: np.ndarray | Callable[[], np.ndarray] | None = None,
                 warnings: list[str] | None = None,
                 step_ms: list[tuple[int, float]] | None = None) -> None:
        self.indices = indices  # [N] int64 class indices
        self.confidences = confidences  # [N] float32
        self._exits = exits
        self._latency_ms = latency_ms
        self.mode = mode  # "exit", "budget", "cascade" or "deadline"
        self.calls = calls if calls is not None else []  # (artifact, samples), in order
        self._probabilities = probabilities
        self.warnings = warnings if warnings is not None else []
        # (exit, ms since the cascade's first step started) at the end of each step it ran
        self.step_ms = step_ms if step_ms is not None else []

    @property
    def exits(self) -> np.ndarray:
        """[N] int64, 1..K: the exit that answered each sample."""
        if not isinstance(self._exits, np.ndarray):
            self._exits = np.full(len(self.indices), self._exits, np.int64)
        return self._exits

    @property
    def latency_ms(self) -> np.ndarray:
        """[N] float64: from the start of the run until each sample was answered."""
        if not isinstance(self._latency_ms, np.ndarray):
            self._latency_ms = np.full(len(self.indices), self._latency_ms, np.float64)
        return self._latency_ms

    @property
    def probabilities(self) -> np.ndarray | None:
        """[N, C] float32 class probabilities at each sample's answering exit
        (temperature-scaled as the confidences are), for top-k answers; None: unknown."""
        if callable(self._probabilities):
            self._probabilities = self._probabilities()
        return self._probabilities

    @probabilities.setter
    def probabilities(self, value: np.ndarray | None) -> None:
        self._probabilities = value

    def rows(self, s: slice) -> CascadeResult:
        """The samples `s` of this result (every per-sample field), as a result of its own."""
        probs = self.probabilities
        return CascadeResult(self.indices[s], self.confidences[s], self.exits[s],
                             self.latency_ms[s], self.mode, self.calls,
                             None if probs is None else probs[s], self.warnings, self.step_ms)

    def predictions(self, class_names: Sequence[str]) -> list[Prediction]:
        # tolist: Python numbers in one call per array, not a numpy scalar per element; the
        # compact forms without an array at all
        n, known = len(self.indices), len(class_names)
        exits = (self._exits.tolist() if isinstance(self._exits, np.ndarray)
                 else [self._exits] * n)
        ms = (self._latency_ms.tolist() if isinstance(self._latency_ms, np.ndarray)
              else [self._latency_ms] * n)
        return [
            Prediction(i, class_names[i] if 0 <= i < known else str(i), c, e, t)
            for i, c, e, t in zip(self.indices.tolist(), self.confidences.tolist(), exits, ms,
                                  strict=True)
        ]
