"""The online audit: are the early answers still as good as calibration promised?

Thresholds are fitted once, offline; a shift in the input (lighting, a new camera, another
mix of classes) breaks their promise silently. The audit samples a share (`rate`) of the
samples the server answered before the deepest exit and runs them to the deepest exit too,
off the requests' path: on a thread of its own, only while the batcher has nothing waiting
and nothing running, from a bounded queue whose oldest samples are dropped when it is
full (so under load it audits less, never later). Per exit it keeps the last `window`
verdicts (did the early answer agree with the deepest exit's?) and compares them with what
calibration measured at that exit (`Thresholds.expected["exit{k}_agreement"]`, on
`..._samples` samples): when the live agreement's upper Clopper-Pearson limit falls below
calibration's lower limit, both at level `alpha`, the exit's alarm gauge goes to 1 and
the server logs one warning. No labels are needed: disagreement with the deepest exit is
the label-free risk calibration bounds (calibrate/risk.py).

The audit runs the deepest exit on a second thread beside the inference thread, so it needs
a backend that runs two inferences at once (ONNX Runtime, PyTorch).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from byot_edge.binomial import lower_bound, upper_bound
from byot_edge.manifest import Manifest
from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
from byot_edge.runtime.metrics import ServerMetrics
from byot_edge.runtime.requests import CascadeResult

log = logging.getLogger("uvicorn.error.byot_edge")

WINDOW = 400  # verdicts per exit the live agreement is computed over
ALPHA = 1e-3  # level of each of the two limits compared
MIN_SAMPLES = 50  # no alarm on fewer verdicts than this
QUEUE = 256  # samples waiting to be audited; the oldest are dropped past it
AUDIT_BATCH = 4  # samples per audit run: small, so a run ends soon after a request arrives


@dataclass(frozen=True)
class Expectation:
    """What calibration measured at one exit: agreeing answers out of samples."""

    agreeing: int
    samples: int

    @property
    def agreement(self) -> float:
        return self.agreeing / self.samples

    def lower(self, alpha: float) -> float:
        """Lower limit of the calibrated agreement."""
        return 1.0 - upper_bound(self.samples - self.agreeing, self.samples, alpha)


def expectations(manifest: Manifest) -> dict[int, Expectation]:
    """Per shallow exit, calibration's agreement with the deepest exit (empty for thresholds
    calibrated before it was recorded)."""
    expected = manifest.thresholds.expected if manifest.thresholds else {}
    out = {}
    for k in range(1, manifest.num_exits):
        rate, n = expected.get(f"exit{k}_agreement"), expected.get(f"exit{k}_agreement_samples")
        if rate is not None and n:
            out[k] = Expectation(round(rate * n), int(n))
    return out


@dataclass
class ExitAudit:
    """One exit's live verdicts and its alarm."""

    expected: Expectation | None
    verdicts: deque[bool] = field(default_factory=lambda: deque(maxlen=WINDOW))
    alarm: bool = False

    @property
    def agreement(self) -> float:
        return sum(self.verdicts) / len(self.verdicts) if self.verdicts else float("nan")

    def below_expectation(self, alpha: float) -> bool:
        """Whether the live agreement is below calibration's, beyond both margins."""
        n = len(self.verdicts)
        if self.expected is None or n < MIN_SAMPLES:
            return False
        disagreeing = n - sum(self.verdicts)
        live_upper = 1.0 - lower_bound(disagreeing, n, alpha)
        return live_upper < self.expected.lower(alpha)


class Audit:
    """Samples early answers (`offer`, on the event loop after each batch) and checks them
    against the deepest exit (`run`, a task), reporting into the server's metrics."""

    def __init__(self, model: AnytimeModel, rate: float, metrics: ServerMetrics | None = None, *,
                 alpha: float = ALPHA, queue: int = QUEUE, seed: int = 0) -> None:
        self.model = model
        self.rate = rate
        self.alpha = alpha
        self.metrics = metrics
        self.deepest = model.num_exits
        found = expectations(model.manifest)
        self.exits = {k: ExitAudit(found.get(k)) for k in range(1, self.deepest)}
        self._queue: deque[tuple[np.ndarray, int, int]] = deque(maxlen=queue)
        self._random = random.Random(seed)
        self._waiting = asyncio.Event()
        if not found and rate > 0:
            log.warning("the manifest's thresholds record no per-exit agreement: the audit "
                        "reports live agreement but cannot compare it; re-run `byot-edge "
                        "calibrate` to record it")
        if metrics is not None:
            for k, audit in self.exits.items():
                expected = audit.expected.agreement if audit.expected else float("nan")
                metrics.audit_expected.labels(exit=str(k)).set(expected)
                metrics.audit_alarm.labels(exit=str(k)).set(0)

    def offer(self, x: np.ndarray, result: CascadeResult) -> None:
        """Queue a `rate` share of the batch's early answers (x: the batch's inputs)."""
        draw = self._random.random
        for i, (k, c) in enumerate(zip(result.exits, result.indices, strict=True)):
            if k < self.deepest and draw() < self.rate:
                if len(self._queue) == self._queue.maxlen and self.metrics is not None:
                    self.metrics.audit_dropped.inc()
                self._queue.append((x[i].copy(), k, c))
        if self._queue:
            self._waiting.set()

    def record(self, exits: list[int], early: list[int], deepest: list[int]) -> None:
        """The verdicts of audited samples: each early answer against the deepest exit's."""
        for k, a, b in zip(exits, early, deepest, strict=True):
            audit = self.exits[k]
            audit.verdicts.append(a == b)
            if self.metrics is not None:
                self.metrics.audit_samples.labels(exit=str(k)).inc()
        for k in set(exits):
            self._judge(k, self.exits[k])

    def _judge(self, k: int, audit: ExitAudit) -> None:
        alarm = audit.below_expectation(self.alpha)
        if alarm and not audit.alarm:
            assert audit.expected is not None
            log.warning("audit: exit %d agrees with the deepest exit on %.1f%% of the last %d "
                        "audited samples, below the %.1f%% calibration measured (beyond both "
                        "margins): the input may have drifted; re-calibrate on recent data",
                        k, 100 * audit.agreement, len(audit.verdicts),
                        100 * audit.expected.agreement)
        audit.alarm = alarm
        if self.metrics is not None:
            self.metrics.audit_agreement.labels(exit=str(k)).set(audit.agreement)
            self.metrics.audit_alarm.labels(exit=str(k)).set(int(alarm))

    def take(self, n: int = AUDIT_BATCH) -> list[tuple[np.ndarray, int, int]]:
        """Up to n queued samples, newest first (the most recent input is what matters)."""
        return [self._queue.pop() for _ in range(min(n, len(self._queue)))]

    def check(self, batch: list[tuple[np.ndarray, int, int]]) -> None:
        """Run the deepest exit on audited samples and record the verdicts (blocking)."""
        x = np.stack([s[0] for s in batch])
        deepest = self.model.run_checked(x, PredictOptions(exit=self.deepest), False).indices
        self.record([s[1] for s in batch], [s[2] for s in batch], deepest)

    async def run(self, idle: asyncio.Event,
                  call: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        """The audit's task: whenever samples wait and the batcher is idle (`idle` set), one
        small run of the deepest exit through `call` (an InferenceThread's call)."""
        while True:
            await self._waiting.wait()
            await idle.wait()
            batch = self.take()
            if not batch:
                self._waiting.clear()
                continue
            try:
                await call(lambda b=batch: self.check(b))
            except Exception:  # the audit must never take the server down
                log.exception("an audit run failed")
