"""What every route of the server shares: the model, its batcher, the settings, the
metrics, readiness, the queue's bound, and the one path a prediction request takes.

No web framework here: refusals are RequestErrors with their HTTP status, which the app
turns into responses. A router for another wire format (e.g. the Open Inference Protocol)
gets the same context and calls `predict` with its own reader and decoder.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from byot_edge.errors import ByotError, RequestError
from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
from byot_edge.runtime.audit import Audit
from byot_edge.runtime.batching import Answer, Batcher, BatcherClosed, InferenceThread
from byot_edge.runtime.metrics import ServerMetrics
from byot_edge.runtime.server.budget import BodyBudget, BodyHold
from byot_edge.runtime.server.config import ServeConfig
from byot_edge.runtime.server.deadlines import tightest

log = logging.getLogger("uvicorn.error.byot_edge")  # shows in uvicorn's log format


@dataclass
class ServerContext:
    model: AnytimeModel
    config: ServeConfig
    metrics: ServerMetrics
    # FastAPI dependencies of the protected routes (/v1/*, /metrics): the bearer-token
    # check, or none without a token. A router passes them to APIRouter(dependencies=...).
    protect: list[Any] = field(default_factory=list)
    batcher: Batcher | None = None  # from start() to stop()
    ready: bool = False
    not_ready: str = "warming up"
    admitted: int = 0  # prediction requests holding a queue slot
    # The bytes of bodies being read or decoded, server-wide (config.max_bodies_bytes).
    bodies: BodyBudget = field(init=False)
    _warming: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    # The online audit (--audit-rate): its task and the thread it runs the deepest exit on
    audit: Audit | None = field(default=None, init=False)
    _auditing: tuple[asyncio.Task[None], InferenceThread] | None = field(
        default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.bodies = BodyBudget(self.config.max_bodies_bytes, self.metrics)
        if self.config.audit_rate and not self.model.backend.concurrent_runs:
            raise ByotError(f"--audit-rate runs the deepest exit beside the requests, and the "
                            f"{self.model.backend.name} backend runs one inference at a time; "
                            "serve without --audit-rate, or audit with the onnxruntime backend")

    # -- life cycle (the app's lifespan) -------------------------------------------------

    async def start(self) -> None:
        """Start the batching worker and warm the model up in it (in the background)."""
        self.batcher = Batcher(self.model, max_batch=self.config.max_batch,
                               max_wait_ms=self.config.max_wait_ms, metrics=self.metrics,
                               degrade_above=None if self.config.slo_ms is None
                               else self.config.slo_busy)
        self.batcher.start()
        self._warming = asyncio.create_task(self._warm(self.batcher))

    async def stop(self) -> None:
        self.ready, self.not_ready = False, "shutting down"
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.close()  # runs what is queued first
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()
        if self._auditing is not None:
            task, thread = self._auditing
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.get_running_loop().run_in_executor(None, thread.shutdown)

    async def _warm(self, batcher: Batcher) -> None:
        model, config = self.model, self.config
        try:
            if config.warmup:
                await batcher.call(lambda: model.warmup(1))
                if config.max_batch > 1:  # large batches allocate their own buffers
                    await batcher.call(lambda: model.warmup(config.max_batch))
        except Exception as e:
            self.not_ready = f"warmup failed: {e}"
            log.error("the model failed to warm up, /readyz stays 503: %s", e)
            return
        if config.audit_rate:  # once warm: the audit never runs before the first request
            self.audit = batcher.audit = Audit(model, config.audit_rate, self.metrics)
            thread = InferenceThread("byot-audit")
            self._auditing = (asyncio.create_task(self.audit.run(batcher.idle, thread.call)),
                              thread)
        if config.freeze_gc:
            gc.collect()
            gc.freeze()
        self.ready = True
        self.metrics.ready.set(1)
        log.info("model warm: %s on %s, %d exits", model.backend.name, model.backend.device,
                 model.num_exits)

    def not_ready_reason(self) -> str | None:
        """None when requests can be answered, else why not."""
        alive = self.batcher is not None and self.batcher.alive
        if self.ready and alive:
            return None
        return self.not_ready if self.batcher is None or alive else "worker stopped"

    # -- a prediction request ------------------------------------------------------------

    def options(self, threshold: Sequence[float] | None = None, budget_ms: float | None = None,
                exit: int | None = None, criterion: str | None = None,
                stat: str = "p50") -> PredictOptions:
        """A request's options, validated (the only time: the batcher trusts them)."""
        options = PredictOptions(
            None if threshold is None else threshold[0] if len(threshold) == 1
            else tuple(threshold), budget_ms, exit, criterion, stat)
        options.validate(self.model.num_exits)
        if exit is None:
            self.model.threshold_policy(options.threshold, options.criterion)  # raises if bad
        return options

    async def predict(self, options: PredictOptions | Callable[[], PredictOptions],
                      read: Callable[[BodyHold], Awaitable[bytes]],
                      decode: Callable[[bytes], Awaitable[np.ndarray]],
                      deadline_ms: float | Callable[[], float | None] | None = None) -> Answer:
        """The path of every prediction: 503 unless ready; `read(hold)` the body while
        holding no queue slot (slow uploads cannot fill the queue) but its bytes in the
        server's body budget (`hold.reserve`: 503 when spent; a reader that does not
        reserve is charged what it returns); a slot, 503 when max_queue are held;
        `decode(body)` into a checked batch (decode_body), after which the body's bytes
        are released; the batcher. `options` and `deadline_ms` (the request's own, parsed;
        the SLO's is added here): as given, or functions giving them once the body is
        decoded (the /v2 API's are in its body). A deadline counts from when the body is
        in; one that cannot be met is a 504 at once (batching.DeadlineMissed)."""
        batcher = self._ready_batcher()
        with batcher.receiving(), self.bodies.hold() as hold:  # the batch may wait for it
            self.metrics.receiving.inc()
            try:
                body = await read(hold)
            finally:
                self.metrics.receiving.dec()
            received = time.perf_counter()
            hold.reserve(len(body))
            self._take_slot(batcher)
            try:
                x = await decode(body)
            except BaseException:
                self._free_slot()
                raise
            del body  # what the budget counted: gone once decoded
        try:
            chosen = options if isinstance(options, PredictOptions) else options()
            own = deadline_ms() if callable(deadline_ms) else deadline_ms
            ms = tightest(own, self.config.slo_ms if chosen.exit is None else None)
            if ms is None:
                return await self._submit(batcher, x, chosen)
            answer = await self._submit(batcher, x, chosen, received + ms / 1e3)
            return replace(answer, deadline_ms=ms)
        finally:
            self._free_slot()

    def _ready_batcher(self) -> Batcher:
        reason = self.not_ready_reason()
        if reason is not None or self.batcher is None:
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise RequestError(503, f"the model is not ready ({reason}); retry shortly", 1)
        return self.batcher

    def _take_slot(self, batcher: Batcher) -> None:
        if self.admitted >= self.config.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise RequestError(503, f"the server is busy ({self.admitted} requests queued, the "
                                    f"limit is {self.config.max_queue}); retry after a moment",
                               batcher.expected_wait_s())
        self.admitted += 1
        self.metrics.in_flight.inc()

    def _free_slot(self) -> None:
        self.admitted -= 1
        self.metrics.in_flight.dec()

    async def _submit(self, batcher: Batcher, x: np.ndarray, options: PredictOptions,
                      deadline: float | None = None) -> Answer:
        try:
            answer = await batcher.submit(x, options, deadline)
            if deadline is not None:
                batcher.handed_back(answer)
            return answer
        except BatcherClosed as e:
            raise RequestError(503, f"{e}; retry on another replica or in a moment", 1) from None
        except ByotError:  # DeadlineMissed (504) among them
            raise
        except Exception:  # the backend failed (a bug, a device error): log it, answer 500
            log.exception("the model failed on a batch")
            raise RequestError(500, "the model failed on this request's batch; see the "
                                    "server's log") from None
