"""Dynamic batching: requests that arrive together run as one batch through the cascade.

    batcher = Batcher(model, max_batch=32, max_wait_ms=2)
    batcher.start()                       # inside the running event loop
    answer = await batcher.submit(x, PredictOptions(threshold=0.9))
    await batcher.close()                 # runs what is queued, then stops

The event loop only queues; the model runs on one worker thread (the backends are
blocking and not necessarily thread-safe, so one inference at a time). Once the model is
free and a request waits, the next batch starts when `max_batch` samples wait, when
`max_wait_ms` have passed since the model became free, or at once when no other request is
on its way: the server brackets reading and decoding a request with `receiving()`, and a
batch waits only for requests it knows are coming, so a lone request pays no wait.

The wait counts from when the model is free, not from the oldest request's arrival: under
load the oldest request has already waited a whole model run, and a deadline counted from
its arrival had passed before the batch could form, so batches ran with the one or two
requests that happened to be decoded (profile in docs/serving.md). A call on the model
costs one hand-off to its thread and one back (InferenceThread), whatever the batch.

Requests are grouped by their options: a cascade's policy (thresholds, budget, fixed exit)
belongs to the whole batch, so requests asking for different ones run as separate batches,
back to back, from the same window. Inside a batch every sample still takes its own exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import queue
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from byot_edge.errors import ByotError, RequestError
from byot_edge.runtime.anytime import AnytimeModel, CascadeResult, PredictOptions
from byot_edge.runtime.audit import Audit
from byot_edge.runtime.busy import BusyMeter
from byot_edge.runtime.metrics import ServerMetrics

T = TypeVar("T")
SEEN_FADE_S = 1.0  # how fast an observed slowdown fades back to the profile's figures, unseen


def _fade(since: float, now: float) -> float:
    """How much of what was seen at `since` still counts at `now` (1 fading to 0)."""
    return math.exp(-(now - since) / SEEN_FADE_S)
log = logging.getLogger("uvicorn.error.byot_edge")  # shows in uvicorn's log format


class BatcherClosed(ByotError):
    """Raised by `submit` once the batcher is shutting down."""


class DeadlineMissed(RequestError):
    """A request whose deadline not even its first possible answer can meet: answered at
    once with 504, rather than run late (docs/serving.md, "Deadlines")."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(504, detail, retry_after)


# -- the inference thread ----------------------------------------------------------------


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if not future.done():  # its waiter may have gone (cancelled)
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class InferenceThread:
    """One thread running calls in turn. A call is one put on a C queue and one
    call_soon_threadsafe back: no executor future, lock or thread-count check per batch
    (ThreadPoolExecutor.submit showed in the profile)."""

    def __init__(self, name: str = "byot-infer") -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._lock = threading.Lock()
        self._stopped = False

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, loop, future = item
            try:
                ok, value = True, fn()
            except BaseException as e:  # the caller gets it
                ok, value = False, e
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, ok, value)

    async def call(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # The check and the put under one lock, as shutdown's flag and stop: a call is
        # either queued before the stop (and run) or refused, never queued behind it.
        with self._lock:
            if self._stopped:
                raise BatcherClosed("the inference thread has stopped")
            if self._thread.ident is None:  # started on first use
                self._thread.start()
            self._calls.put((fn, loop, future))
        return await future

    def shutdown(self) -> None:
        """Finish the calls queued, then stop the thread; later calls raise BatcherClosed."""
        with self._lock:
            self._stopped = True
            started = self._thread.ident is not None
            if started:
                self._calls.put(None)
        if started:
            self._thread.join()


# -- the queue ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One request's share of a model run."""

    result: CascadeResult  # this request's samples only
    probabilities: np.ndarray | None  # [n, C] of the answering exits; None: unknown
    batch_size: int  # samples in the model run that answered it
    batch_requests: int  # requests in that run
    queue_ms: float  # from submit until its model run started
    # The classes of each sample by falling probability, and those probabilities (rows of
    # `probabilities`, ranked once per batch on the inference thread); None: unknown.
    ranked_classes: np.ndarray | None = None
    ranked_probabilities: np.ndarray | None = None
    deadline_ms: float | None = None  # the deadline it was given (the server sets it)
    deadline_at: float | None = None  # that deadline, perf_counter seconds
    ready_at: float = 0.0  # when the answer was ready (perf_counter seconds)

    @property
    def deadline_left_ms(self) -> float | None:
        """With a deadline: the ms it still had when the answer was ready (negative: late)."""
        return None if self.deadline_at is None else (self.deadline_at - self.ready_at) * 1e3

    def deadline_left_now_ms(self) -> float | None:
        """The ms its deadline has left now: what a response reports as it is written,
        after the event loop came back to the request (a busy loop takes a while)."""
        return None if self.deadline_at is None else \
            (self.deadline_at - time.perf_counter()) * 1e3


@dataclass
class _Job:
    x: np.ndarray
    options: PredictOptions
    future: asyncio.Future[Answer]
    submitted: float
    deadline: float | None = None  # perf_counter seconds by which it must be answered

    @property
    def key(self) -> float:
        """Earliest deadline first; requests without one after every one that has one."""
        return math.inf if self.deadline is None else self.deadline


@dataclass(frozen=True)
class _Run:
    """What the inference thread hands back for one batch."""

    result: CascadeResult
    probabilities: np.ndarray | None
    ranked_classes: np.ndarray | None
    ranked_probabilities: np.ndarray | None
    exit_counts: dict[int, int]
    cpu_s: float  # the inference thread's CPU time for it (runtime/busy.py)


def _exit_counts(exits: list[int]) -> dict[int, int]:
    return dict(sorted(Counter(exits).items()))


class Batcher:
    def __init__(self, model: AnytimeModel, *, max_batch: int, max_wait_ms: float,
                 metrics: ServerMetrics | None = None, deadline_stat: str = "p90",
                 degrade_above: float | None = None, busy: BusyMeter | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ByotError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} "
                            f"and {max_wait_ms}")
        # Degrade before dropping (serve --slo-ms): while the server is busier than this
        # share (runtime/busy.py), batches with deadlines answer at their first exits.
        self.degrade_above = degrade_above
        self.busy = busy or BusyMeter()
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.metrics = metrics
        # The profile's statistic deadlines are planned with: a step slower than its median
        # would make an answer planned at the median late.
        self.deadline_stat = deadline_stat
        # Waiting requests, earliest deadline first (then in arrival order): a heap of
        # (deadline or inf, arrival number, job).
        self._pending: list[tuple[float, int, _Job]] = []
        self._arrivals = itertools.count()
        self._with_deadline = 0  # of _pending
        # Whether a request was refused for its deadline since the last batch started: then
        # the next batch answers everyone at its first exit (degrade before dropping more).
        self._shed = False
        # (samples, options) -> first_answer_ms: the profile does not change while serving
        self._first_ms: dict[tuple[int, PredictOptions], float] = {}
        # How much longer than the profile says batches took here to their first answers (a
        # moving average of the ratio, and when it was last updated): beside the server's
        # own HTTP work on a small machine a batch of 10 at exit 1 took twice what the
        # profile, timed alone, says. One ratio for every size: sizes seen rarely (the
        # large batches of a burst) are priced by what the common ones showed.
        self._slowdown = 1.0
        self._slowdown_at = 0.0
        # How long answers took, once ready, to be back with their requests (a moving
        # average, ms): the event loop takes them in turn with the requests arriving, and
        # under overload that made answers late at the client that were ready in time.
        self._handback_ms = 0.0
        self._handback_at = 0.0
        self._samples = 0  # in _pending
        self._arrived = asyncio.Event()
        # Set while nothing waits and nothing runs: when the audit may use the machine.
        self.idle = asyncio.Event()
        self.audit: Audit | None = None  # offered each batch's early answers
        self._closing = False
        self._receiving = 0  # requests being read or decoded, not yet submitted
        self._task: asyncio.Task[None] | None = None
        self._thread = InferenceThread()
        self._run_s = 0.0  # moving average of one model run, for Retry-After estimates
        self._logged: set[str] = set()

    # -- state ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def expected_wait_s(self) -> float:
        """A rough time until a request submitted now would be answered."""
        return (self._samples / self.max_batch + 1) * self._run_s + self.max_wait_s

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="byot-batcher")
        self._task.add_done_callback(self._stopped)

    @staticmethod
    def _stopped(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the batching worker stopped", exc_info=task.exception())

    async def close(self) -> None:
        """Stop taking requests, run the queued ones at once, then stop the worker."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)  # logged by _stopped
        await asyncio.get_running_loop().run_in_executor(None, self._thread.shutdown)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the inference thread, in turn with the batches (e.g. warmup)."""
        return await self._thread.call(fn)

    # -- requests ------------------------------------------------------------------------

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """Bracket reading and decoding a request that will be submitted: batches wait
        (up to max_wait_ms) only while some request is inside this."""
        self._receiving += 1
        try:
            yield
        finally:
            self._receiving -= 1
            if self._receiving == 0:  # a batch waiting for requests on their way can start
                self._arrived.set()

    def hopeless(self, options: PredictOptions, deadline: float, samples: int = 1,
                 now: float | None = None, need_ms: float | None = None
                 ) -> DeadlineMissed | None:
        """Why a request with `deadline` (perf_counter seconds) cannot be answered in time
        even by its first possible answer (by the profile, in a batch of `samples`; or
        `need_ms`, when the caller priced that batch already), else None."""
        now = time.perf_counter() if now is None else now
        left_ms = (deadline - now) * 1e3
        if need_ms is None:
            need_ms = self._first_cost_ms(min(self.max_batch, samples), options)
        if left_ms > need_ms:
            return None
        what = "the first exit it could answer from" if options.exit is None else \
            f"exit {options.exit}"
        return DeadlineMissed(
            f"the deadline cannot be met: {max(left_ms, 0.0):.3g} ms were left and "
            f"{what} takes {need_ms:.3g} ms here (by the latency profile); give a longer "
            "deadline_ms, or retry when the server is less busy",
            self.expected_wait_s() if left_ms > 0 else None)

    def _planned(self, options: PredictOptions) -> PredictOptions:
        """The options a deadline is planned with: the request's statistic when it chose
        one, else deadline_stat."""
        return options if options.stat != "p50" else replace(options, stat=self.deadline_stat)

    def _first_answer_ms(self, samples: int, options: PredictOptions) -> float:
        key = (samples, options)
        ms = self._first_ms.get(key)
        if ms is None:
            try:
                ms = self.model.first_answer_ms(samples, self._planned(options)) or 0.0
            except ByotError:  # a profile without that timing: only a passed deadline counts
                ms = 0.0
            self._first_ms[key] = ms
        return ms

    def _first_cost_ms(self, samples: int, options: PredictOptions) -> float:
        """What a batch of `samples` takes to its first answers: the profile's figure,
        times how much slower than that batches were here lately (never less), and the
        time answers took lately to get back to their requests."""
        now = time.perf_counter()
        return (self._first_answer_ms(samples, options) * max(self._slowdown_now(now), 1.0)
                + self._handback_ms * _fade(self._handback_at, now))

    def handed_back(self, answer: Answer) -> None:
        """The request `answer` was for has it now (the server calls this, as it makes the
        response): a late one counts in byot_edge_deadline_missed_total, as the response's
        own deadline_left_ms reports it."""
        now = time.perf_counter()
        if (answer.deadline_at is not None and now > answer.deadline_at
                and self.metrics is not None):
            self.metrics.deadline_missed.inc()
        ms = (now - answer.ready_at) * 1e3
        self._handback_ms = 0.8 * self._handback_ms * _fade(self._handback_at, now) + 0.2 * ms
        self._handback_at = now

    def _slowdown_now(self, now: float) -> float:
        """The slowdown, faded back towards 1 unless seen again: one that rose above what
        the deadlines allow (a slow spell) would otherwise refuse every request, so no
        batch would run to bring it down again."""
        return 1.0 + (self._slowdown - 1.0) * _fade(self._slowdown_at, now)

    def _observe_first(self, samples: int, options: PredictOptions, result: CascadeResult,
                       seconds: float) -> None:
        profiled = self._first_answer_ms(samples, options)
        if profiled <= 0:  # no profile to compare with
            return
        # From the batch's start until its first answers would be back on the event loop:
        # the whole run less its later steps. The hand-offs to the inference thread and
        # back, and a busy loop's delay in taking the answers, count: on a loaded server
        # they made answers late that the model alone had time for.
        ms = seconds * 1e3
        if result.step_ms:
            ms -= result.step_ms[-1][1] - result.step_ms[0][1]
        now = time.perf_counter()
        self._slowdown = 0.8 * self._slowdown_now(now) + 0.2 * ms / profiled
        self._slowdown_at = now

    async def submit(self, x: np.ndarray, options: PredictOptions,
                     deadline: float | None = None) -> Answer:
        """x: a batch [n, C, H, W] as check_batch returns it, n <= max_batch; options:
        validated. Neither is checked again (AnytimeModel.run_checked). `deadline`:
        perf_counter seconds by which the answer must be ready: the request waits in
        earliest-deadline-first order, its cascade stops before overrunning it, and one that
        cannot make it is refused (DeadlineMissed, a 504) at once. Raises what the model
        raised for this request's batch (e.g. ByotError for options the manifest cannot
        serve)."""
        if self._closing or not self.alive:
            raise BatcherClosed("the server is shutting down")
        if not 1 <= len(x) <= self.max_batch:
            raise ByotError(f"a request holds 1..{self.max_batch} samples, got {len(x)}")
        if deadline is not None and (missed := self.hopeless(
                options, deadline, len(x) + self._ahead(deadline))):
            self._missed()
            raise missed
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.idle.clear()
        job = _Job(x, options, future, time.perf_counter(), deadline)
        heapq.heappush(self._pending, (job.key, next(self._arrivals), job))
        self._with_deadline += deadline is not None
        self._samples += len(x)
        self._gauge()
        if len(self._pending) == 1 or self._samples >= self.max_batch:
            self._arrived.set()  # the worker waits for a first request, or for a full batch
        return await future  # a cancelled await cancels the future: the job is skipped

    def _ahead(self, deadline: float) -> int:
        """Samples waiting that would run before a request with `deadline` (earliest
        deadline first): the batch it would join, at least. The whole queue overpriced a
        tight request that would run first, and it was refused though it could be met."""
        if not self._with_deadline:
            return 0
        return sum(len(job.x) for key, _, job in self._pending if key <= deadline)

    # -- the worker ----------------------------------------------------------------------

    def _missed(self) -> None:
        self._shed = True
        if self.metrics is not None:
            self.metrics.rejected.labels(reason="deadline").inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    async def _loop(self) -> None:
        jobs: list[_Job] | None = []
        try:
            while (jobs := await self._collect()) is not None:
                groups: dict[PredictOptions, list[_Job]] = {}
                for job in jobs:
                    groups.setdefault(job.options, []).append(job)
                for options, group in groups.items():
                    await self._run(options, group)
        except BaseException as e:  # a bug here must not leave requests waiting forever
            for job in [*(jobs or []), *(j for _, _, j in self._pending)]:
                if not job.future.done():
                    job.future.set_exception(BatcherClosed(f"the batching worker stopped: {e!r}"))
            raise

    async def _collect(self) -> list[_Job] | None:
        """Wait for a batch, once the model is free: max_batch samples, max_wait_ms from
        now, or no request on its way (None: closed and nothing left to run)."""
        while not self._pending:
            if self._closing:
                return None
            self.idle.set()
            self._arrived.clear()
            await self._arrived.wait()
        self.idle.clear()
        deadline = time.perf_counter() + self.max_wait_s
        loop = asyncio.get_running_loop()
        while not self._closing and self._receiving > 0 and self._samples < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            timer = loop.call_later(remaining, self._arrived.set)  # no task per wait
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()
        jobs: list[_Job] = []
        samples = 0
        now = time.perf_counter()
        tightest = math.inf  # the earliest deadline in the batch so far
        while self._pending and samples + len(self._pending[0][2].x) <= self.max_batch:
            head = self._pending[0][2]
            # What the batch would take to its first answers with `head` in it: priced once,
            # for the batch's earliest request and for head's own deadline.
            need = (None if tightest == math.inf and head.deadline is None else
                    self._first_cost_ms(samples + len(head.x), head.options))
            if need is not None and (tightest - now) * 1e3 < need:
                break  # a larger batch would answer its earliest request late: next batch
            job = heapq.heappop(self._pending)[2]
            self._samples -= len(job.x)
            self._with_deadline -= job.deadline is not None
            if job.future.done():  # its client went away
                continue
            if job.deadline is not None and (missed := self.hopeless(
                    job.options, job.deadline, now=now, need_ms=need)):
                self._missed()  # too late already: answered now, not after a run
                job.future.set_exception(missed)
                continue
            jobs.append(job)
            samples += len(job.x)
            if job.deadline is not None:
                tightest = min(tightest, job.deadline)
        self._gauge()
        return jobs

    def _queue_cap_ms(self, now: float) -> float:
        """How long the batch about to run may take so that every request still waiting
        can be answered by its deadline at its first possible exit (by the profile,
        max_batch at a time, earliest deadline first): the batch's share of a queue it
        sees. Infinite when no waiting request has a deadline."""
        cap = math.inf
        if not self._with_deadline:
            return cap
        ahead = 0
        for key, _, job in sorted(self._pending):
            if key == math.inf:
                break
            ahead += len(job.x)
            runs = -(-ahead // self.max_batch)
            first = self._first_cost_ms(min(ahead, self.max_batch), job.options)
            cap = min(cap, (key - now) * 1e3 - runs * first)
        return cap

    def _saturated(self) -> bool:
        """Whether the server is too busy for any batch to go past its first exits (only
        with degrade_above; a request refused for its deadline sets _shed as well)."""
        if self.degrade_above is None:
            return False
        share = self.busy.share()
        if self.metrics is not None:
            self.metrics.busy.set(share)
        return share > self.degrade_above

    def _time_left(self, group: list[_Job], started: float) -> list[float] | None:
        """Per sample of the batch, the ms it may take: what the batch's tightest request
        has left (every answer is handed back when the whole batch is done), less what the
        requests waiting behind it need; None when none of it has a deadline or waits
        behind it."""
        degrade = self._shed or self._saturated()
        self._shed = False
        cap = 0.0 if degrade else self._queue_cap_ms(started)
        if cap == math.inf and all(job.deadline is None for job in group):
            return None
        if degrade and self.metrics is not None and any(j.deadline is not None for j in group):
            self.metrics.degraded.inc()
        tightest = min((job.deadline for job in group if job.deadline is not None),
                       default=math.inf)
        ms = min((tightest - started) * 1e3, cap)
        return [ms] * sum(len(job.x) for job in group)

    def _infer(self, x: np.ndarray, options: PredictOptions,
               time_left_ms: list[float] | None = None) -> _Run:
        # The runtime's warnings are in result.warnings (each answer carries them); here
        # they go to the log, once each, and a `-W error` setting cannot fail a batch.
        cpu = time.thread_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = (self.model.run_checked(x, options) if time_left_ms is None else
                      self.model.run_checked(x, self._planned(options), True, time_left_ms))
        for w in caught:
            if str(w.message) not in self._logged:
                self._logged.add(str(w.message))
                log.warning("%s", w.message)
        probs = result.probabilities
        if probs is None:
            return _Run(result, None, None, None, _exit_counts(result.exits),
                        time.thread_time() - cpu)
        # Ranking per batch, here, rather than per request on the event loop.
        order = np.argsort(-probs, axis=1, kind="stable")
        return _Run(result, probs, order, np.take_along_axis(probs, order, axis=1),
                    _exit_counts(result.exits), time.thread_time() - cpu)

    async def _run(self, options: PredictOptions, group: list[_Job]) -> None:
        x = group[0].x if len(group) == 1 else np.concatenate([j.x for j in group])
        started = time.perf_counter()
        left = self._time_left(group, started)
        try:
            run = await self.call(lambda: self._infer(x, options, left))
        except Exception as e:  # this batch's requests fail; the worker goes on
            for job in group:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        answered = time.perf_counter()
        seconds = answered - started
        self._run_s = seconds if not self._run_s else 0.8 * self._run_s + 0.2 * seconds
        self.busy.ran(seconds, run.cpu_s)
        result, probs = run.result, run.probabilities
        self._observe_first(len(x), options, result, seconds)
        if self.metrics is not None:
            self.metrics.observe_batch(len(x), len(group), seconds, run.exit_counts)
        if self.audit is not None:
            self.audit.offer(x, result)
        at = 0
        for job in group:
            s = slice(at, at + len(job.x))
            at = s.stop
            queue_ms = (started - job.submitted) * 1e3
            if self.metrics is not None:
                self.metrics.queue_seconds.observe(queue_ms / 1e3)
            if not job.future.done():
                job.future.set_result(Answer(
                    result.rows(s), None if probs is None else probs[s], len(x),
                    len(group), queue_ms,
                    None if run.ranked_classes is None else run.ranked_classes[s],
                    None if run.ranked_probabilities is None else run.ranked_probabilities[s],
                    deadline_at=job.deadline, ready_at=answered))
