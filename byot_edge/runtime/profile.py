"""Latency profiles: time every truncated exit, segment and span; store them in the manifest.

A profile belongs to one backend, one device and one batch size. Entries follow the
manifest's layout: `{"exit": k, "truncated": {p50, p90, p99, mean, runs}, "segment": {...},
"spans": {"i": {...}}}` in milliseconds for the whole batch, where span i (i < k) is
segments i..k joined, as a cascade runs them when exits i..k-1 are off (backends that
cannot join segments have no spans). The deepest exit's entry also holds what the runtime
itself takes, timed through the anytime model with no sample answered early:
- `"cascade"`: the whole call with every exit on (the worst case with every exit on);
- `"plans"`: for every plan (the exits that are on, "1,3,4"), the time from the first step's
  start to the end of each step. Calibration prices a cascade from these as measured: the
  runtime's checks, policy and answers, the session switches and the branches, in place.
  Composed from the files timed one by one, it had priced a plan at 1.04x the deepest exit
  that measured 1.10x.
All calls at one batch size take turns (see `_interleaved`): timed one after another, the
same segment came out 10% apart on a shared VM, more than the differences being priced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import LatencyProfile, Manifest
from byot_edge.runtime.backends import EXIT, SEGMENT, Backend, artifact_name, span_name

STATS = ("p50", "p90", "p99", "mean")
Progress = Callable[[str], None]
T = TypeVar("T")


def check_stat(stat: str) -> str:
    if stat not in STATS:
        raise ByotError(f"unknown latency statistic {stat!r}; choose one of: {', '.join(STATS)}")
    return stat


# Every plan is timed while there are at most this many (K <= 5 exits); beyond, only the
# plan with every exit on, and calibration composes the others from the files' timings.
MAX_PLANS = 16


def time_call(fn: Callable[[], object], warmup: int = 10, runs: int = 100,
              max_seconds: float = 10.0, clock: Callable[[], float] = time.perf_counter
              ) -> dict[str, float]:
    """Run `fn` `warmup` times untimed, then up to `runs` times timed (stopping early after
    `max_seconds`, but never before 5 runs); statistics in ms."""
    calls = _interleaved({"fn": fn}, warmup, runs, max_seconds, clock)["fn"]
    return _stats([ms for ms, _ in calls])


def _interleaved(fns: Mapping[str, Callable[[], T]], warmup: int, runs: int,
                 max_seconds: float, clock: Callable[[], float] = time.perf_counter,
                 block: int = 10) -> dict[str, list[tuple[float, T]]]:
    """(ms, result) of each timed call of each function, as time_call runs one (with
    `max_seconds` each). The functions take turns, `block` calls at a time, so a machine
    that drifts slower or faster over the seconds this takes shifts them alike: they are
    compared with each other."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls: dict[str, list[tuple[float, T]]] = {name: [] for name in fns}
    deadline = clock() + max_seconds * len(fns)
    while any(len(c) < runs for c in calls.values()) and (
            any(len(c) < 5 for c in calls.values()) or clock() < deadline):
        for name, fn in fns.items():
            for _ in range(min(block, runs - len(calls[name]))):
                t0 = clock()
                out = fn()
                calls[name].append(((clock() - t0) * 1e3, out))
    return calls


def _stats(times_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(times_ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "runs": len(a)}


def cascade_plans(num_exits: int) -> list[tuple[int, ...]]:
    """Every plan a calibration can choose: some shallow exits on, then the deepest."""
    return [(*(k for k in range(1, num_exits) if mask >> (k - 1) & 1), num_exits)
            for mask in range(2 ** (num_exits - 1))]


def plan_key(plan: Sequence[int]) -> str:
    """How a profile names a plan: "1,3,4"."""
    return ",".join(map(str, plan))


def parse_plan_key(key: str) -> tuple[int, ...]:
    return tuple(int(k) for k in key.split(","))


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
        calls = _interleaved(fns, warmup, runs, max_seconds)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        profiles.append(LatencyProfile(backend.name, backend.device, b,
                                       _entries(manifest.num_exits, calls), created))
    return profiles


# A p90 above this multiple of the p50 means the timings were disturbed.
NOISY = 1.5


def noise(profile: LatencyProfile) -> float:
    """The largest p90/p50 over the profile's files: about 1 on a quiet machine."""
    ratios = [e[w]["p90"] / e[w]["p50"] for e in profile.exits for w in ("truncated", "segment")
              if w in e and e[w]["p50"] > 0]
    return max(ratios, default=1.0)


def _calls_to_time(backend: Backend, x: np.ndarray) -> dict[str, Callable[[], Any]]:
    """"truncated/k", "segment/k", "span/i/k" (a backend call each, returning nothing) and
    "plan/1,3,4" (the anytime model's worst case under that plan, returning its step_ms) ->
    the call to time. Each call returns only what the profile keeps: holding every call's
    outputs took 1.6 GB for one batch-32 profile, and new memory on every call."""
    from byot_edge.runtime.anytime import AnytimeModel  # deferred: it imports this module
    from byot_edge.runtime.policies import NEVER, ConfidenceThresholds

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
        plans = cascade_plans(num_exits)
        for plan in plans if len(plans) <= MAX_PLANS else plans[-1:]:  # the last: every exit
            fns[f"plan/{plan_key(plan)}"] = (
                lambda plan=plan: model.run_policy(x, never, plan=plan).step_ms)
    return fns


def _discarding(backend: Backend, name: str, feed: dict[str, np.ndarray]) -> Callable[[], None]:
    def run() -> None:
        backend.run(name, feed)
    return run


def _entries(num_exits: int, calls: dict[str, list[tuple[float, Any]]]) -> list[dict[str, Any]]:
    """The profile's entries (see the module docstring) from the timed calls."""
    entries: list[dict[str, Any]] = [{"exit": k} for k in range(1, num_exits + 1)]
    every = plan_key(range(1, num_exits + 1))
    for key, timed in calls.items():
        what, _, rest = key.partition("/")
        ms = [t for t, _ in timed]
        if what == "span":
            first, last = rest.split("/")
            entries[int(last) - 1].setdefault("spans", {})[first] = _stats(ms)
        elif what == "plan":
            at = np.asarray([[t for _, t in step_ms] for _, step_ms in timed])
            entries[-1].setdefault("plans", {})[rest] = [_stats(at[:, j])
                                                        for j in range(at.shape[1])]
            if rest == every:
                entries[-1]["cascade"] = _stats(ms)
        else:
            entries[int(rest) - 1][what] = _stats(ms)
    return entries


def store_profiles(manifest: Manifest, profiles: Sequence[LatencyProfile]) -> Path:
    """Replace profiles of the same backend, device and batch; keep every other field."""
    keys = {(p.backend, p.device, p.batch) for p in profiles}
    kept = [p for p in manifest.latency_profiles if (p.backend, p.device, p.batch) not in keys]
    manifest.latency_profiles = kept + list(profiles)
    return manifest.save()


@dataclass(frozen=True)
class ProfileChoice:
    profile: LatencyProfile
    scale: float  # multiply the profile's figures by this for the batch at hand
    warning: str | None  # set when the profile is from another backend or device


def select_profile(manifest: Manifest, backend: str, device: str,
                   batch: int = 1) -> ProfileChoice | None:
    """The profile that best describes `backend` on `device` at `batch`.

    Prefers this backend and device; falls back to another device, then another backend,
    with a warning. Among batch sizes: the same, else the smallest larger one (an
    overestimate, which is the safe side for a budget), else the largest, scaled linearly.
    """
    tiers = [
        [p for p in manifest.latency_profiles if p.backend == backend and p.device == device],
        [p for p in manifest.latency_profiles if p.backend == backend],
        list(manifest.latency_profiles),
    ]
    for tier, found in enumerate(tiers):
        if not found:
            continue
        larger = sorted((p for p in found if p.batch >= batch), key=lambda p: (p.batch, p.created))
        if larger:
            same = [p for p in larger if p.batch == larger[0].batch]
            best, scale = same[-1], 1.0  # newest of the closest batch
        else:
            best = max(found, key=lambda p: (p.batch, p.created))
            scale = batch / best.batch
        warning = None
        if tier > 0:
            warning = (f"the latency profile in the manifest was measured with {best.backend} "
                       f"on {best.device}, not {backend} on {device}; budgets may be missed. "
                       f"Run `byot-edge profile {manifest.root / 'manifest.json'} --backend "
                       f"{backend}` on this machine")
        return ProfileChoice(best, scale, warning)
    return None


def stat_of(entry: dict, what: str, stat: str) -> float | None:
    d = entry.get(what)
    return None if d is None else float(d[stat])


def exit_latencies(choice: ProfileChoice, stat: str = "p50") -> list[float]:
    """Per exit k, the time to get exit k's answer by the cheapest recorded route: its
    truncated file, else segments 1..k."""
    check_stat(stat)
    out: list[float] = []
    cascade: float | None = 0.0
    for e in sorted(choice.profile.exits, key=lambda e: e["exit"]):
        seg = stat_of(e, "segment", stat)
        cascade = cascade + seg if seg is not None and cascade is not None else None
        trunc = stat_of(e, "truncated", stat)
        best = trunc if trunc is not None else cascade
        if best is None:
            raise ByotError(f"the latency profile has no timing for exit {e['exit']}; re-run "
                            "`byot-edge profile`")
        out.append(best * choice.scale)
    return out


def segment_latencies(choice: ProfileChoice, stat: str = "p50") -> list[float] | None:
    """Per segment k, its time (None when the profile has no segments)."""
    check_stat(stat)
    segs = [stat_of(e, "segment", stat) for e in sorted(choice.profile.exits,
                                                         key=lambda e: e["exit"])]
    if any(s is None for s in segs):
        return None
    return [s * choice.scale for s in segs]  # type: ignore[operator]
