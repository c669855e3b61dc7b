"""How busy the server is lately, as a share in [0, 1] that the degrade rule compares.

    meter = BusyMeter()
    meter.ran(wall_s=0.004, cpu_s=0.004)  # the inference thread reports each model run
    meter.share()                          # on the event loop's thread: a moving average

`serve --slo-ms` answers at first exits while the share is above `--slo-busy`
(runtime/batching.py). A queue alone tells too late that a server is overloaded: at twice
the deepest exit's capacity on a 2-core VM the queue stayed short while the server's core
was nearly always busy (HTTP work, which no deadline can shorten, beside the model), and the
bursts of a Poisson load then found no headroom and were shed. The share is the largest of:

- the event loop's thread's CPU time over the wall time: one Python thread does all of the
  HTTP work, and it tops out at one core however many the machine has;
- the model's wall time: where it waits on a GPU, the CPU clocks do not see it;
- the event loop's and the model's CPU time together over the usable CPUs' time: on one
  core, they share it.

Only the server's own two threads are counted (not, say, a client in the same process).
"""

from __future__ import annotations

import math
import os
import time


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


class BusyMeter:
    """A moving average, over about `tau_s`, of how busy the server was. `share` must be
    called on the event loop's thread; `ran` from anywhere."""

    def __init__(self, tau_s: float = 0.2, cpus: int | None = None,
                 min_interval_s: float = 0.02) -> None:
        self.tau_s = tau_s
        self.cpus = cpus or usable_cpus()
        self.min_interval_s = min_interval_s  # shorter intervals are too coarse to read
        self._wall: float | None = None
        self._loop_cpu = 0.0
        self._model_wall = self._model_cpu = 0.0  # since the last reading
        self._share = 0.0

    def ran(self, wall_s: float, cpu_s: float) -> None:
        """The model ran for `wall_s`, using `cpu_s` of its thread's CPU time."""
        self._model_wall += wall_s
        self._model_cpu += cpu_s

    def share(self) -> float:
        """The moving average, brought up to now."""
        wall, loop_cpu = time.perf_counter(), time.thread_time()
        if self._wall is None:  # the first reading: a baseline
            self._wall, self._loop_cpu = wall, loop_cpu
            self._model_wall = self._model_cpu = 0.0
            return self._share
        dt = wall - self._wall
        if dt < self.min_interval_s:
            return self._share
        loop = loop_cpu - self._loop_cpu
        sample = max(loop / dt, self._model_wall / dt,
                     (loop + self._model_cpu) / (dt * self.cpus))
        weight = 1.0 - math.exp(-dt / self.tau_s)
        self._share += weight * (min(sample, 1.0) - self._share)
        self._wall, self._loop_cpu = wall, loop_cpu
        self._model_wall = self._model_cpu = 0.0
        return self._share
