"""The one timing harness: warm-up, interleaved rounds, percentiles in milliseconds.

    timings = interleave({"ours": lambda: model.predict(x, exit=1),
                          "plain": lambda: session.run(None, feed)}, runs=200)
    timings["ours"].stats.p50 / timings["plain"].stats.p50

Calls that are compared take turns, `block` calls at a time: timed one after another, the
same ONNX segment came out 10% apart on a shared VM, more than most differences measured
here. The profile (`byot-edge profile`) and every benchmark time through this module, so
their figures mean the same thing. Numpy only: the runtime install uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from byot_edge.errors import ByotError

STATS = ("p50", "p90", "p99", "mean")
T = TypeVar("T")
Clock = Callable[[], float]


def check_stat(stat: str) -> str:
    if stat not in STATS:
        raise ByotError(f"unknown latency statistic {stat!r}; choose one of: {', '.join(STATS)}")
    return stat


@dataclass(frozen=True)
class Stats:
    """Summary of timed calls, in ms (as a profile stores it in the manifest)."""

    p50: float
    p90: float
    p99: float
    mean: float
    runs: int

    def get(self, stat: str) -> float:
        return float(getattr(self, check_stat(stat)))

    def scaled(self, factor: float) -> Stats:
        return Stats(self.p50 * factor, self.p90 * factor, self.p99 * factor,
                     self.mean * factor, self.runs)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stats:
        return cls(float(d["p50"]), float(d["p90"]), float(d["p99"]), float(d["mean"]),
                   int(d.get("runs", 0)))


def summarize(times_ms: Sequence[float]) -> Stats:
    a = np.asarray(times_ms, dtype=np.float64)
    if a.size == 0:
        raise ByotError("no timed calls to summarise")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return Stats(float(p50), float(p90), float(p99), float(a.mean()), int(a.size))


@dataclass(frozen=True)
class Timed(Generic[T]):
    """Every timed call of one function: its ms and what it returned."""

    ms: list[float]
    results: list[T]

    @property
    def stats(self) -> Stats:
        return summarize(self.ms)


MIN_RUNS = 5  # never fewer, whatever the time limit


def interleave(fns: Mapping[str, Callable[[], T]], *, warmup: int = 10, runs: int = 100,
               max_seconds: float = 10.0, block: int = 10,
               clock: Clock = time.perf_counter,
               setup: Mapping[str, Callable[[], object]] | None = None) -> dict[str, Timed[T]]:
    """Warm every function up (`warmup` untimed calls each), then time them in turns of
    `block` calls until each has `runs` calls or `max_seconds` per function have passed
    (but at least MIN_RUNS each; `math.inf`: no time limit).

    `setup[name]`, where given, runs untimed before every timed call of `fns[name]`: work a
    measurement needs done first but must not include (a training benchmark's warm-up
    steps after the other variants had the device). A function that must wait for a device
    (CUDA) synchronises inside itself, so the time it returns after is the time it took."""
    if runs < 1 or warmup < 0 or block < 1:
        raise ByotError(f"runs and block must be >= 1 and warmup >= 0, got runs={runs}, "
                        f"warmup={warmup}, block={block}")
    unknown = set(setup or {}) - set(fns)
    if unknown:
        raise ByotError(f"setup for functions that are not timed: {sorted(unknown)}")
    before = setup or {}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timed: dict[str, Timed[T]] = {name: Timed([], []) for name in fns}
    deadline = clock() + max_seconds * len(fns)
    floor = min(MIN_RUNS, runs)

    def more() -> bool:
        counts = [len(t.ms) for t in timed.values()]
        return any(c < runs for c in counts) and (min(counts) < floor or clock() < deadline)

    while more():
        for name, fn in fns.items():
            t = timed[name]
            prepare = before.get(name)
            for _ in range(min(block, runs - len(t.ms))):
                if prepare is not None:
                    prepare()
                t0 = clock()
                out = fn()
                t.ms.append((clock() - t0) * 1e3)
                t.results.append(out)
    return timed


def time_call(fn: Callable[[], object], *, warmup: int = 10, runs: int = 100,
              max_seconds: float = 10.0, clock: Clock = time.perf_counter) -> Stats:
    """One function alone, with the same rules as `interleave`."""
    return interleave({"fn": fn}, warmup=warmup, runs=runs, max_seconds=max_seconds,
                      clock=clock)["fn"].stats


# Where long jobs (profiling, benchmarks) say what they are doing: a line at a time.
Progress = Callable[[str], None]
