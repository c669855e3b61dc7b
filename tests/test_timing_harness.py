"""The timing harness's per-call setup (byot_edge.timing.interleave): benchmarks whose
measurement must follow untimed work (train_throughput's warm-up steps) time through it."""

from __future__ import annotations

import math

import pytest

from byot_edge.errors import ByotError
from byot_edge.timing import interleave


class FakeClock:
    """Seconds that pass only when the code under test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1e3


def test_setup_runs_before_every_timed_call_and_is_not_timed() -> None:
    clock, order = FakeClock(), []

    def fn(name: str, ms: float):
        def call() -> str:
            order.append(name)
            clock.spend(ms)
            return name
        return call

    def setup() -> None:
        order.append("setup")
        clock.spend(100.0)

    timed = interleave({"a": fn("a", 1.0), "b": fn("b", 2.0)}, warmup=1, runs=4, block=2,
                       max_seconds=math.inf, clock=clock, setup={"a": setup})
    assert timed["a"].ms == pytest.approx([1.0] * 4)  # setup's 100 ms left out
    assert timed["b"].ms == pytest.approx([2.0] * 4)
    # warm-up without setup, then turns of two calls, each of a's after its setup
    assert order == ["a", "b", *(["setup", "a"] * 2), "b", "b", *(["setup", "a"] * 2), "b", "b"]


def test_setup_for_an_untimed_function_is_refused() -> None:
    with pytest.raises(ByotError, match="not timed"):
        interleave({"a": lambda: None}, setup={"typo": lambda: None})
