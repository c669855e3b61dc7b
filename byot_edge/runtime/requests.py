"""What a request to the anytime model is and what it gets back: `PredictOptions` (one
request's choice of exit, thresholds or budget), `CascadeResult` (arrays for a batch, and
what was run) and `Prediction` (one sample's answer). Plain data: servers, Triton models and
benchmarks share them without the model itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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
        if (self.threshold is not None and isinstance(self.threshold, Sequence)
                and not isinstance(self.threshold, tuple)):
            object.__setattr__(self, "threshold", tuple(self.threshold))

    def validate(self, num_exits: int) -> None:
        if self.exit is not None and (self.threshold is not None or self.budget_ms is not None):
            raise ByotError("choose either exit, or threshold and/or budget_ms, not both")
        if self.exit is not None and not 1 <= self.exit <= num_exits:
            raise ByotError(f"exit {self.exit} does not exist: this model has exits "
                            f"1..{num_exits} ({num_exits} is the deepest)")
        if self.budget_ms is not None and not self.budget_ms > 0:
            raise ByotError(f"budget_ms must be a positive number of milliseconds, got "
                            f"{self.budget_ms}")
        if self.threshold is not None:
            self._validate_threshold()
        if self.criterion is not None:
            check_criterion(self.criterion)
        check_stat(self.stat)

    def _validate_threshold(self) -> None:
        values = (list(self.threshold) if isinstance(self.threshold, Sequence)
                  else [self.threshold])
        try:
            bad = not all(0 <= float(t) <= 1 or float(t) == NEVER for t in values)
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise ByotError(f"threshold must be numbers in [0, 1] (or {NEVER:g} to switch an "
                            f"exit off), got {self.threshold}")


@dataclass
class CascadeResult:
    """A batch's answers, one entry per sample, as Python values (what predictions, JSON
    and Triton's tensors are made of: at batch 1 building numpy arrays for them cost more
    than the rest of the answer; np.asarray gives arrays)."""

    indices: list[int]  # class indices
    confidences: list[float]  # the scores the policy compared (float64)
    exits: list[int]  # 1..K
    latency_ms: list[float]
    mode: str  # "exit", "budget", "cascade" or "deadline"
    calls: list[tuple[str, int]] = field(default_factory=list)  # (artifact, samples), in order
    # [N, C] float64 class probabilities at each sample's answering exit (temperature-scaled
    # as the confidences are), for top-k answers; None when not asked for (`run`)
    probabilities: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    # (exit, ms since the cascade's first step started) at the end of each step it ran
    step_ms: list[tuple[int, float]] = field(default_factory=list)

    def rows(self, s: slice) -> CascadeResult:
        """The samples `s` of this result (every per-sample field), as a result of its own."""
        probs = None if self.probabilities is None else self.probabilities[s]
        return replace(self, indices=self.indices[s], confidences=self.confidences[s],
                       exits=self.exits[s], latency_ms=self.latency_ms[s], probabilities=probs)

    def predictions(self, class_names: Sequence[str]) -> list[Prediction]:
        known = len(class_names)
        return [
            Prediction(i, class_names[i] if 0 <= i < known else str(i), c, e, t)
            for i, c, e, t in zip(self.indices, self.confidences, self.exits, self.latency_ms,
                                  strict=True)
        ]
