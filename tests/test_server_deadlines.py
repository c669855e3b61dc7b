"""Anytime under load: end-to-end deadlines (queue time counted, earliest deadline first, a
request that cannot make it answered 504 at once), degrading before dropping (--slo-ms),
bad deadlines, and the online audit (never on a request's path; its drift alarm).

The model is the session's small export behind a backend that sleeps a fixed time per
call, with a latency profile saying so: what a slow device looks like, deterministically."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from server_fixtures import Deployed, client, deployed_model, in_thread, wait_until
from test_server_app import Requests, npy

from byot_edge.errors import ByotError
from byot_edge.manifest import load_manifest
from byot_edge.runtime.anytime import AnytimeModel, CascadeResult, PredictOptions
from byot_edge.runtime.audit import Audit, ExitAudit, Expectation
from byot_edge.runtime.batching import Answer, Batcher
from byot_edge.runtime.busy import BusyMeter
from byot_edge.runtime.latency import Latencies
from byot_edge.runtime.metrics import ServerMetrics
from byot_edge.runtime.preprocess import load_images
from byot_edge.runtime.server import ServeConfig, create_app
from byot_edge.runtime.server.deadlines import MAX_DEADLINE_MS

STEP_S = 0.010  # what each backend call sleeps
PROFILED_MS = 15.0  # what the profile says each segment takes (more: the safe side, with
# room for a slow CI machine, where a 10 ms sleep and the tiny model took up to 14 ms)
NEVER_EARLY = {"threshold": 1.0}  # max softmax never reaches 1: every sample goes deepest


class SlowModel(AnytimeModel):
    """Each backend call sleeps STEP_S; the profile says PROFILED_MS per segment. Runs wait
    on `gate`; each run's batch size and the time left it was given are recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.runs: list[tuple[int, list[float] | None]] = []
        run = self.backend.run

        def slow(name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            time.sleep(STEP_S)
            return run(name, inputs)

        self.backend.run = slow  # type: ignore[method-assign]

    def _profiled(self, n: int, stat: str, notes: list[str]) -> Latencies:
        k = self.num_exits
        return Latencies(truncated=[PROFILED_MS * e for e in range(1, k + 1)],
                         segments=[PROFILED_MS] * k)

    def run_checked(self, x: np.ndarray, options: PredictOptions, probabilities: bool = True,
                    time_left_ms: Any = None) -> CascadeResult:
        self.entered.set()
        assert self.gate.wait(30)
        self.runs.append((len(x), None if time_left_ms is None else list(time_left_ms)))
        return super().run_checked(x, options, probabilities, time_left_ms)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    return deployed_model(tmp_path_factory)


@pytest.fixture(scope="module")
def x(deployed: Deployed) -> np.ndarray:
    return load_images(deployed.images, load_manifest(deployed.manifest).input)


@pytest.fixture
def slow(deployed: Deployed) -> Iterator[SlowModel]:
    with SlowModel.load(deployed.manifest, threads=1) as m:
        yield m  # type: ignore[misc]


SERVED: list[Any] = []  # the app `serving` runs (its context holds the audit)


@contextmanager
def serving(model: AnytimeModel, **config: Any) -> Iterator[httpx.Client]:
    settings = {"warmup": False, "max_wait_ms": 0, **config}
    app = create_app(model, ServeConfig(**settings))
    SERVED[:] = [app]
    with in_thread(app) as url, client(url) as c:
        try:
            wait_until(lambda: c.get("/readyz").status_code == 200, 30, "/readyz")
            yield c
        finally:
            if isinstance(model, SlowModel):
                model.gate.set()


def post(c: httpx.Client, x: np.ndarray, headers: dict[str, str] | None = None,
         **params: Any) -> httpx.Response:
    return c.post("/v1/predict", content=npy(x), params=params,
                  headers={"Content-Type": "application/x-npy", **(headers or {})})


def block(model: SlowModel, reqs: Requests, x: np.ndarray, samples: int = 1) -> None:
    """Request 0 (no deadline, `samples` images) enters the model and waits there; the next
    ones queue. What its run is seen to take, the wait included, counts for its size."""
    model.gate.clear()
    reqs.post(0, np.concatenate([x] * samples)[:samples], exit=1)
    assert model.entered.wait(30)


# -- deadline arithmetic ---------------------------------------------------------------


def test_the_time_spent_queueing_is_taken_from_the_deadline(slow: SlowModel,
                                                            x: np.ndarray) -> None:
    with serving(slow) as c:
        reqs = Requests(c)
        block(slow, reqs, x)
        reqs.post(1, x[:1], deadline_ms=900, **NEVER_EARLY)
        time.sleep(0.3)  # request 1 waits this long behind request 0
        slow.gate.set()
        r = reqs.join()[1]
    assert r.status_code == 200, r.text
    body = r.json()
    (_, left), = [run for run in slow.runs if run[1] is not None]
    assert 0 < left[0] <= 900 - 250  # its run was given what the queue left of 900 ms
    assert body["deadline_ms"] == 900
    assert body["deadline_left_ms"] < left[0]  # the run took some of it
    assert body["predictions"][0]["exit"] == slow.num_exits  # 600 ms is plenty for 4 steps


def test_a_deadline_no_exit_can_meet_is_answered_504_at_once(slow: SlowModel,
                                                              x: np.ndarray) -> None:
    with serving(slow) as c:
        t0 = time.perf_counter()
        r = post(c, x[:1], deadline_ms=5)  # exit 1 alone takes 15 ms by the profile
        assert r.status_code == 504, r.text
        assert time.perf_counter() - t0 < 1.0
        assert "deadline cannot be met" in r.json()["detail"]
        assert "15 ms" in r.json()["detail"]
        assert slow.runs == []  # never ran
        # One that waits past its deadline behind a busy model: answered 504 when its turn
        # comes, without running.
        reqs = Requests(c)
        block(slow, reqs, x)
        reqs.post(1, x[:1], deadline_ms=100)
        time.sleep(0.4)
        slow.gate.set()
        late = reqs.join()[1]
        metrics = c.get("/metrics").text
    assert late.status_code == 504, late.text
    assert "Retry-After" not in late.headers  # too late already: retrying it cannot help
    assert [n for n, _ in slow.runs] == [1]  # only request 0 ran
    assert 'byot_edge_rejected_requests_total{reason="deadline"} 2.0' in metrics


class PerSampleSlowModel(SlowModel):
    """SlowModel whose profile says each sample costs PER_SAMPLE_MS per segment."""

    def _profiled(self, n: int, stat: str, notes: list[str]) -> Latencies:
        k = self.num_exits
        return Latencies(truncated=[PER_SAMPLE_MS * n * e for e in range(1, k + 1)],
                         segments=[PER_SAMPLE_MS * n] * k)


PER_SAMPLE_MS = 50.0


@pytest.fixture
def per_sample(deployed: Deployed) -> Iterator[PerSampleSlowModel]:
    with PerSampleSlowModel.load(deployed.manifest, threads=1) as m:
        yield m  # type: ignore[misc]


def test_a_batch_stops_growing_before_it_would_answer_its_earliest_request_late(
        per_sample: PerSampleSlowModel, x: np.ndarray) -> None:
    model = per_sample
    with serving(model, max_batch=8) as c:
        reqs = Requests(c)
        block(model, reqs, x, samples=8)  # its wait counts for a batch of 8, not smaller
        reqs.post(1, x[:1], deadline_ms=400)  # about 200 ms left when its turn comes
        time.sleep(0.05)
        for key in range(2, 9):  # ample deadlines, after request 1's
            reqs.post(key, x[:1], deadline_ms=20_000)
        time.sleep(0.15)
        model.gate.set()
        responses = reqs.join()
    assert {r.status_code for r in responses.values()} == {200}, \
        {k: (r.status_code, r.text[-200:]) for k, r in responses.items()}
    sizes = [n for n, _ in model.runs[1:]]
    # A batch of 8 would take 400 ms by the profile to its first answers; request 1 had
    # about 200: its batch stopped at what fits (3 or so), the rest ran after it.
    assert sum(sizes) == 8 and 1 <= sizes[0] <= 4, sizes
    assert responses[1].json()["deadline_left_ms"] > 0


def test_a_tight_request_behind_lax_ones_is_priced_by_what_runs_before_it(
        per_sample: PerSampleSlowModel, x: np.ndarray) -> None:
    """Earliest deadline first: a request that will run first is not refused for the
    queue behind it (8 waiting x 50 ms by the profile is 400 ms; it has 300)."""
    model = per_sample
    with serving(model, max_batch=8) as c:
        reqs = Requests(c)
        block(model, reqs, x, samples=8)
        for key in range(1, 8):
            reqs.post(key, x[:1], deadline_ms=20_000)
        time.sleep(0.1)
        reqs.post(8, x[:1], deadline_ms=300)
        time.sleep(0.05)
        model.gate.set()
        responses = reqs.join()
    assert responses[8].status_code == 200, responses[8].text
    assert responses[8].json()["deadline_left_ms"] > 0
    first = model.runs[1]
    assert first[1] is not None and min(first[1]) < 300  # its batch ran first


def test_a_batch_is_held_to_its_tightest_request(slow: SlowModel, x: np.ndarray) -> None:
    """Every answer of a batch is handed back when the whole batch is done, so a request
    with time to spare cannot take its batch past a tighter one's deadline."""
    with serving(slow, max_batch=8) as c:
        reqs = Requests(c)
        block(slow, reqs, x)
        reqs.post(1, x[:1], deadline_ms=600, **NEVER_EARLY)
        reqs.post(2, x[:1], deadline_ms=20_000, **NEVER_EARLY)
        time.sleep(0.2)
        slow.gate.set()
        responses = reqs.join()
    assert {r.status_code for r in responses.values()} == {200}
    (n, left), = [run for run in slow.runs if run[1] is not None]
    assert n == 2 and left[0] == left[1] < 600, left
    assert responses[1].json()["deadline_left_ms"] > 0


def test_a_late_answer_says_so_and_is_counted(slow: SlowModel, x: np.ndarray) -> None:
    """A request admitted in time whose run then overran (here: held in the model) is
    answered, with a negative deadline_left_ms, and counted as missed."""
    with serving(slow) as c:
        reqs = Requests(c)
        slow.gate.clear()
        reqs.post(1, x[:1], deadline_ms=100)
        assert slow.entered.wait(30)
        time.sleep(0.3)
        slow.gate.set()
        late = reqs.join()[1]
        metrics = c.get("/metrics").text
    assert late.status_code == 200, late.text
    assert late.json()["deadline_left_ms"] < -150
    assert "byot_edge_deadline_missed_total 1.0" in metrics


def test_waiting_requests_run_earliest_deadline_first(slow: SlowModel, x: np.ndarray) -> None:
    with serving(slow, max_batch=1) as c:
        reqs = Requests(c)
        block(slow, reqs, x)
        for key, deadline in enumerate([9000, 3000, None, 6000], start=1):
            params = {} if deadline is None else {"deadline_ms": deadline}
            reqs.post(key, x[:1], **params, **NEVER_EARLY)
            time.sleep(0.1)  # they arrive in this order
        slow.gate.set()
        responses = reqs.join()
    assert all(r.status_code == 200 for r in responses.values())
    # runs after request 0: by deadline (the time each had left), the one without last
    lefts = [None if left is None else left[0] for _, left in slow.runs[1:]]
    assert lefts[-1] is None and len(lefts) == 4, lefts
    assert 2000 < lefts[0] < 3000 < 5000 < lefts[1] < 6000 < 8000 < lefts[2] < 9000, lefts


# -- degrade before dropping -----------------------------------------------------------


def test_under_a_burst_the_slo_moves_answers_to_shallower_exits_before_it_sheds(
        slow: SlowModel, x: np.ndarray) -> None:
    slo = 240.0  # the deepest exit takes 40-60 ms: 4 of them in a row fit, 8 do not
    with serving(slow, max_batch=1, slo_ms=slo) as c:
        reqs = Requests(c)
        for key in range(8):  # at once: 8 x 40 ms of deepest exits would end at 320 ms
            reqs.post(key, x[:1], **NEVER_EARLY)
        burst = reqs.join()
        # Once the burst is over and the server has been idle a moment (its busy share falls
        # within about 0.2 s), the same request alone is answered as without an SLO.
        time.sleep(0.6)
        alone = post(c, x[:1], **NEVER_EARLY).json()
    assert {r.status_code for r in burst.values()} == {200}, [r.text for r in burst.values()]
    bodies = [r.json() for r in burst.values()]
    exits = [b["predictions"][0]["exit"] for b in bodies]
    assert min(exits) < slow.num_exits, exits  # some were moved to shallower exits...
    assert all(b["deadline_left_ms"] > -15 for b in bodies), bodies  # ...and none was late
    assert alone["predictions"][0]["exit"] == slow.num_exits
    assert alone["deadline_ms"] == slo


def test_past_what_exit_1_can_keep_up_with_the_slo_sheds_with_504_only(
        slow: SlowModel, x: np.ndarray) -> None:
    with serving(slow, max_batch=1, slo_ms=60.0, max_queue=64) as c:
        reqs = Requests(c)
        for key in range(16):  # at once; exit 1 takes 10-15 ms: 60 ms holds about 4
            reqs.post(key, x[:1])
        statuses = [r.status_code for r in reqs.join().values()]
    assert set(statuses) == {200, 504}, statuses
    assert statuses.count(200) >= 3


class FixedBusy(BusyMeter):
    """A busy share the test sets."""

    def __init__(self, share: float) -> None:
        super().__init__()
        self.value = share

    def share(self) -> float:
        return self.value


@pytest.mark.parametrize(("busy", "degraded"), [(0.9, True), (0.5, False)])
def test_a_busy_server_answers_at_first_exits_and_an_idle_one_runs_the_cascade(
        slow: SlowModel, x: np.ndarray, busy: float, degraded: bool) -> None:
    metrics = ServerMetrics(slow.num_exits)

    async def go() -> Any:
        batcher = Batcher(slow, max_batch=8, max_wait_ms=0, metrics=metrics,
                          degrade_above=0.7, busy=FixedBusy(busy))
        batcher.start()
        try:  # a deadline with time for every exit (4 x 15 ms by the profile)
            return await batcher.submit(x[:2], PredictOptions(threshold=1.0),
                                        time.perf_counter() + 5.0)
        finally:
            await batcher.close()

    answer = asyncio.run(go())
    assert answer.result.exits == ([1, 1] if degraded else [slow.num_exits] * 2)
    assert answer.deadline_left_ms > 0
    text = metrics.render().decode()
    assert f"byot_edge_busy_share {busy}" in text
    assert f"byot_edge_degraded_batches_total {float(degraded)}" in text


def test_without_the_rule_a_busy_share_changes_nothing(slow: SlowModel, x: np.ndarray) -> None:
    async def go() -> Any:
        batcher = Batcher(slow, max_batch=8, max_wait_ms=0, busy=FixedBusy(1.0))
        batcher.start()
        try:
            return await batcher.submit(x[:1], PredictOptions(threshold=1.0),
                                        time.perf_counter() + 5.0)
        finally:
            await batcher.close()

    assert asyncio.run(go()).result.exits == [slow.num_exits]


def test_the_busy_share_follows_the_model_and_the_event_loops_cpu() -> None:
    meter = BusyMeter(tau_s=0.2, cpus=1)
    assert meter.share() == 0.0  # the baseline
    for _ in range(6):  # the model ran the whole time: the share climbs towards 1
        t0 = time.perf_counter()
        time.sleep(0.1)
        meter.ran(time.perf_counter() - t0, 0.0)
        climbing = meter.share()
    assert climbing > 0.85
    time.sleep(0.6)  # idle: it falls back
    idle = meter.share()
    assert idle < 0.1
    end = time.thread_time() + 0.3
    while time.thread_time() < end:  # this thread (the event loop's) busy on the CPU
        pass
    assert meter.share() > idle
    time.sleep(0.01)  # readings closer than min_interval_s keep the last value
    assert meter.share() == meter.share()


def test_a_slowdown_seen_once_cannot_lock_requests_out_for_good(slow: SlowModel) -> None:
    """How much slower than the profile batches ran raises every estimate; unseen, it fades
    back to the profile's, so a slow spell that priced every request above its deadline
    (and so ran no batch that could show it had passed) does not refuse them for good."""
    batcher = Batcher(slow, max_batch=8, max_wait_ms=0)
    options = PredictOptions(threshold=1.0)
    profiled = batcher._first_cost_ms(4, options)
    assert profiled == pytest.approx(PROFILED_MS)  # SlowModel's profile, at any size
    batcher._slowdown, batcher._slowdown_at = 3.0, time.perf_counter()
    assert batcher._first_cost_ms(4, options) == pytest.approx(3 * PROFILED_MS, rel=0.05)
    assert batcher._first_cost_ms(1, options) > 2.5 * PROFILED_MS  # every size
    batcher._slowdown_at = time.perf_counter() - 10
    assert batcher._first_cost_ms(4, options) == pytest.approx(profiled, rel=1e-3)
    deadline = time.perf_counter() + 0.05  # 50 ms: enough by the profile (15 ms)
    assert batcher.hopeless(options, deadline, 4) is None
    # A batch that took twice the profile's time raises the slowdown a fifth of the way.
    run = CascadeResult.__new__(CascadeResult)
    run.step_ms = []
    batcher._observe_first(4, options, run, 2 * PROFILED_MS / 1e3)
    assert batcher._slowdown == pytest.approx(1.2, rel=1e-3)
    # An answer that took 10 ms after it was ready to reach its request adds a fifth of
    # that to every estimate (a moving average), fading too.
    batcher._slowdown = 1.0
    answer = Answer(run, None, 1, 1, 0.0, ready_at=time.perf_counter() - 0.010)
    batcher.handed_back(answer)
    assert batcher._first_cost_ms(4, options) == pytest.approx(PROFILED_MS + 2.0, abs=0.2)
    batcher._handback_at -= 10
    assert batcher._first_cost_ms(4, options) == pytest.approx(PROFILED_MS, abs=0.01)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_a_bad_slo_busy_is_refused_in_one_line(value: float) -> None:
    with pytest.raises(ByotError, match="--slo-busy is a share"):
        ServeConfig(slo_ms=50.0, slo_busy=value)


def test_with_an_slo_and_no_overload_answers_are_exactly_the_calibrated_cascades(
        deployed: Deployed, x: np.ndarray) -> None:
    with AnytimeModel.load(deployed.manifest, threads=1) as model:
        expected = model.run(x, PredictOptions(), probabilities=False)
        with serving(model, slo_ms=10_000.0) as c:
            got = [post(c, x[i:i + 1]).json()["predictions"][0] for i in range(len(x))]
    assert [p["exit"] for p in got] == expected.exits
    assert [p["index"] for p in got] == expected.indices
    assert [p["confidence"] for p in got] == expected.confidences


# -- bad deadlines ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5", "nan", "NaN", "inf", "1e12", "abc", "", "5ms"])
def test_a_bad_deadline_is_a_400_that_says_what_a_deadline_is(deployed: Deployed,
                                                             x: np.ndarray, value: str) -> None:
    with AnytimeModel.load(deployed.manifest, threads=1) as model, serving(model) as c:
        query = post(c, x[:1], deadline_ms=value)
        header = post(c, x[:1], headers={"X-Deadline-Ms": value})
        v2 = c.post("/v2/models/byot/infer", json={
            "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x[:1].shape),
                        "data": x[:1].ravel().tolist()}],
            "parameters": {"deadline_ms": value}})
    for r, where in ((query, "deadline_ms"), (header, "X-Deadline-Ms"), (v2, "deadline_ms")):
        assert r.status_code == 400, (where, r.status_code, r.text)
        text = r.text
        assert where in text and "milliseconds" in text and f"{MAX_DEADLINE_MS:g}" in text


def test_a_v2_request_carries_its_deadline_and_hears_what_was_left(deployed: Deployed,
                                                                   x: np.ndarray) -> None:
    with AnytimeModel.load(deployed.manifest, threads=1) as model, serving(model) as c:
        for parameter in (500, "500"):
            r = c.post("/v2/models/byot/infer", json={
                "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x[:1].shape),
                            "data": x[:1].ravel().tolist()}],
                "parameters": {"deadline_ms": parameter}})
            assert r.status_code == 200, r.text
            params = r.json()["parameters"]
            assert params["deadline_ms"] == 500 and 0 < params["deadline_left_ms"] < 500
        bad = c.post("/v2/models/byot/infer", json={
            "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x[:1].shape),
                        "data": x[:1].ravel().tolist()}], "parameters": {"deadline_ms": True}})
    assert bad.status_code == 400


# -- the audit -------------------------------------------------------------------------


def test_a_blocked_audit_never_delays_a_request(deployed: Deployed, x: np.ndarray) -> None:
    with AnytimeModel.load(deployed.manifest, threads=1) as model:
        release = threading.Event()
        with serving(model, audit_rate=1.0) as c:
            ctx_audit = SERVED[0].state.context.audit
            check = ctx_audit.check
            entered = threading.Event()

            def blocked(batch: Any) -> None:
                entered.set()
                release.wait(30)
                check(batch)

            ctx_audit.check = blocked  # type: ignore[method-assign]
            # Answers before the deepest exit get audited: the first takes the audit thread
            # and blocks it; requests must still come back at their usual speed.
            timings = []
            for i in range(20):
                t0 = time.perf_counter()
                r = post(c, x[i % len(x):i % len(x) + 1])
                timings.append(time.perf_counter() - t0)
                assert r.status_code == 200
            assert entered.wait(10), "the audit never ran"
            assert max(timings[5:]) < 1.0, timings  # the audit is blocked for 30 s
            release.set()
            wait_until(lambda: 'byot_edge_audit_samples_total{exit="1"}' in c.get(
                "/metrics").text, 10, "audited samples")


def _audit(expected: dict[int, Expectation]) -> tuple[Audit, ServerMetrics]:
    class Fake:
        num_exits = 2
        manifest = type("M", (), {"thresholds": None, "num_exits": 2})()

    metrics = ServerMetrics(2)
    audit = Audit(Fake(), 1.0, metrics)  # type: ignore[arg-type]
    audit.exits = {k: ExitAudit(e) for k, e in expected.items()}
    return audit, metrics


def test_the_audit_alarm_fires_on_drift_once_and_not_on_the_calibrated_distribution(
        caplog: pytest.LogCaptureFixture) -> None:
    calibrated = Expectation(agreeing=2850, samples=3000)  # 95% at exit 1
    audit, metrics = _audit({1: calibrated})
    rng = random.Random(0)
    # A long undrifted run: verdicts drawn at the calibrated rate never raise the alarm.
    for _ in range(20_000):
        audit.record([1], [0], [0 if rng.random() < 0.95 else 1])
        assert not audit.exits[1].alarm
    # Drift: agreement falls to 75%. The alarm fires within 250 audited samples (the window
    # of 400 is still mostly the calibrated rate then).
    with caplog.at_level(logging.WARNING, logger="uvicorn.error.byot_edge"):
        drifted = 0
        while not audit.exits[1].alarm and drifted < 400:
            audit.record([1], [0], [0 if rng.random() < 0.75 else 1])
            drifted += 1
        for _ in range(50):
            audit.record([1], [0], [1])
    assert audit.exits[1].alarm and drifted <= 250, drifted
    assert 'byot_edge_audit_alarm{exit="1"} 1.0' in metrics.render().decode()
    assert sum("input may have drifted" in r.message for r in caplog.records) == 1


def test_the_audit_offers_only_early_answers_and_drops_the_oldest_when_full() -> None:
    audit, metrics = _audit({1: Expectation(90, 100)})
    audit._queue = type(audit._queue)(maxlen=3)
    result = CascadeResult([0, 1, 2, 3], [0.9] * 4, [1, 2, 1, 1], [1.0] * 4, "cascade")
    audit.offer(np.arange(4.0).reshape(4, 1), result)  # exit 2 is the deepest here
    assert [int(s[0][0]) for s in audit._queue] == [0, 2, 3]
    audit.offer(np.arange(4.0).reshape(4, 1), result)
    assert len(audit._queue) == 3
    assert "byot_edge_audit_dropped_total 3.0" in metrics.render().decode()


def test_the_open_loop_client_sends_on_schedule_and_records_each_answer(
        deployed: Deployed, x: np.ndarray) -> None:
    from byot_edge import loadgen

    with AnytimeModel.load(deployed.manifest, threads=1) as model, serving(model) as c:
        sent = loadgen.run_open_loop(str(c.base_url).rstrip("/"), 80.0, 1.0,
                                     loadgen.npy_payloads(x), {"deadline_ms": 500}, seed=1)
    assert 50 < len(sent) < 120  # Poisson, 80 a second for 1 s
    assert {s.status for s in sent} == {200}
    due = [s.due_s for s in sorted(sent, key=lambda s: s.due_s)]
    assert due[0] >= 0 and due[-1] < 1.0
    assert all(s.latency_ms > 0 and len(s.exits) == 1 and 0 <= s.payload < len(x)
               for s in sent)
    assert all(s.send_lag_ms is not None and s.send_lag_ms >= 0 for s in sent)  # never early
