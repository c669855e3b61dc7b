"""Latency profiles, the timing side: time every truncated exit, segment and span, and every
cascade plan through the anytime model; store them in the manifest.

A profile belongs to one backend, one device and one batch size, and records the precision
of the files it timed (`byot_edge.profiles` has its records and their JSON form;
`runtime.latency` reads them). Span i-k (i < k) is segments i..k joined, as a cascade runs
them when exits i..k-1 are off (backends that cannot join segments have no spans). The
profile also times what the runtime itself takes, through the anytime model with no sample
answered early:
- the cascade: the whole call with every exit on (the worst case with every exit on);
- the plans: for every plan (the exits that are on, "1,3,4"), the time from the first
  step's start to the end of each step. Calibration prices a cascade from these as
  measured: the runtime's checks, policy and answers, the session switches and the
  branches, in place. Composed from the files timed one by one, it had priced a plan at
  1.04x the deepest exit that measured 1.10x.
All calls at one batch size take turns (`byot_edge.timing.interleave`): timed one after
another, the same segment came out 10% apart on a shared VM, more than the differences
being priced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import Manifest
from byot_edge.plans import Plan, all_plans
from byot_edge.profiles import ExitTiming, LatencyProfile
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.backends import EXIT, SEGMENT, Backend, artifact_name, span_name
from byot_edge.runtime.policies import NEVER, ConfidenceThresholds
from byot_edge.timing import Progress, Stats, Timed, interleave, summarize

# Every plan is timed while there are at most this many (K <= 5 exits); beyond, only the
# plan with every exit on, and calibration composes the others from the files' timings.
MAX_PLANS = 16


def profile_backend(backend: Backend, batches: Sequence[int] = (1, 8, 32), *,
                    warmup: int = 10, runs: int = 100, max_seconds: float = 10.0,
                    progress: Progress | None = None, seed: int = 0) -> list[LatencyProfile]:
    """Time every truncated exit, segment and span the backend has, and the runtime's
    cascade plans, at each batch size; at one batch size they all take turns."""
    manifest = backend.manifest
    if not batches or any(b < 1 for b in batches):
        raise ByotError(f"batch sizes must be positive integers, got {list(batches)}")
    rng = np.random.default_rng(seed)
    profiles = []
    for b in batches:
        x = rng.standard_normal((b, *manifest.input.shape)).astype(manifest.input.dtype)
        fns = _calls_to_time(backend, x)
        if not fns:
            raise ByotError(f"the manifest has no files the {backend.name} backend can run; "
                            "export them first with `byot-edge export`")
        if progress:
            progress(f"batch {b}: {len(fns)} files and cascade plans, taking turns")
        timed = interleave(fns, warmup=warmup, runs=runs, max_seconds=max_seconds)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        profiles.append(_profile(backend, b, manifest.num_exits, timed, created))
    return profiles


# A p90 above this multiple of the p50 means the timings were disturbed.
NOISY = 1.5


def noise(profile: LatencyProfile) -> float:
    """The largest p90/p50 over the profile's files: about 1 on a quiet machine."""
    ratios = [s.p90 / s.p50 for e in profile.exits for s in (e.truncated, e.segment)
              if s is not None and s.p50 > 0]
    return max(ratios, default=1.0)


def _calls_to_time(backend: Backend, x: np.ndarray) -> dict[str, Callable[[], Any]]:
    """"truncated/k", "segment/k", "span/i/k" (a backend call each, returning nothing) and
    "plan/1,3,4" (the anytime model's worst case under that plan, returning its step_ms) ->
    the call to time. Each call returns only what the profile keeps: holding every call's
    outputs took 1.6 GB for one batch-32 profile, and new memory on every call."""
    num_exits = backend.manifest.num_exits
    fns: dict[str, Callable[[], Any]] = {}
    h, inputs = x, {}  # segment k's input: section k-1's output for this very batch
    for k in range(1, num_exits + 1):
        inputs[k] = h
        for kind, what in ((EXIT, "truncated"), (SEGMENT, "segment")):
            name = artifact_name(kind, k)
            if backend.has(name):
                io = backend.load(name)
                feed = {io.input: x if kind == EXIT else h}
                fns[f"{what}/{k}"] = _discarding(backend, name, feed)
                if kind == SEGMENT and io.section is not None:
                    h = backend.run(name, feed)[io.section]
        for first in range(1, k):
            name = span_name(first, k)
            if backend.has(name):
                feed = {backend.load(name).input: inputs[first]}
                fns[f"span/{first}/{k}"] = _discarding(backend, name, feed)
    model = AnytimeModel(backend.manifest, backend)
    if model.has_segments():
        never = ConfidenceThresholds.for_model(NEVER, num_exits)
        plans = all_plans(num_exits)
        for plan in plans if len(plans) <= MAX_PLANS else plans[-1:]:  # the last: every exit
            fns[f"plan/{plan.key}"] = (
                lambda plan=plan: model.run_policy(x, never, plan=plan).step_ms)
    return fns


def _discarding(backend: Backend, name: str, feed: dict[str, np.ndarray]) -> Callable[[], None]:
    def run() -> None:
        backend.run(name, feed)
    return run


def _profile(backend: Backend, batch: int, num_exits: int, timed: dict[str, Timed[Any]],
             created: str) -> LatencyProfile:
    """The profile's records from the timed calls (named as `_calls_to_time` names them)."""
    files: dict[int, dict[str, Stats]] = {k: {} for k in range(1, num_exits + 1)}
    spans: dict[int, dict[int, Stats]] = {k: {} for k in range(1, num_exits + 1)}
    plans: dict[Plan, tuple[Stats, ...]] = {}
    for key, t in timed.items():
        what, _, rest = key.partition("/")
        if what == "span":
            first, last = rest.split("/")
            spans[int(last)][int(first)] = t.stats
        elif what == "plan":
            at = np.asarray([[ms for _, ms in step_ms] for step_ms in t.results])
            plans[Plan.parse(rest)] = tuple(summarize(at[:, j]) for j in range(at.shape[1]))
        else:
            files[int(rest)][what] = t.stats
    exits = [ExitTiming(k, files[k].get("truncated"), files[k].get("segment"), spans[k])
             for k in range(1, num_exits + 1)]
    every = f"plan/{Plan.every_exit(num_exits).key}"
    cascade = timed[every].stats if every in timed else None
    return LatencyProfile(backend.name, backend.device, batch, exits, created, cascade, plans,
                          backend.files_precision())


def store_profiles(manifest: Manifest, profiles: Sequence[LatencyProfile]) -> Path:
    """Replace profiles of the same backend, device and batch; keep every other field."""
    keys = {(p.backend, p.device, p.batch) for p in profiles}
    kept = [p for p in manifest.latency_profiles if (p.backend, p.device, p.batch) not in keys]
    manifest.latency_profiles = kept + list(profiles)
    return manifest.save()
