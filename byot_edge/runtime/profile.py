"""Latency profiles: time every truncated exit, segment and span; store them in the manifest.

A profile belongs to one backend, one device and one batch size. Entries follow the
manifest's layout: `{"exit": k, "truncated": {p50, p90, p99, mean, runs}, "segment": {...},
"spans": {"i": {...}}}` in milliseconds for the whole batch, where span i (i < k) is
segments i..k joined, as a cascade runs them when exits i..k-1 are off (backends that
cannot join segments have no spans). The deepest exit's entry also has `"cascade"`: the
runtime's own cascade through every segment with no sample answered early (its worst case
with every exit on), so the time the runtime spends between backend calls (input checks,
the policy, answers, compaction) is measured too; calibration prices it per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.export.manifest import LatencyProfile, Manifest
from byot_edge.runtime.backends import EXIT, SEGMENT, Backend, artifact_name, span_name

STATS = ("p50", "p90", "p99", "mean")
Progress = Callable[[str], None]


def check_stat(stat: str) -> str:
    if stat not in STATS:
        raise ByotError(f"unknown latency statistic {stat!r}; choose one of: {', '.join(STATS)}")
    return stat


def time_call(fn: Callable[[], object], warmup: int = 10, runs: int = 100,
              max_seconds: float = 10.0, clock: Callable[[], float] = time.perf_counter
              ) -> dict[str, float]:
    """Run `fn` `warmup` times untimed, then up to `runs` times timed (stopping early after
    `max_seconds`, but never before 5 runs); statistics in ms."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = clock() + max_seconds
    while len(times) < runs and (len(times) < 5 or clock() < deadline):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    a = np.asarray(times)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "runs": len(a)}


def profile_backend(backend: Backend, batches: Sequence[int] = (1, 8, 32), *,
                    warmup: int = 10, runs: int = 100, max_seconds: float = 10.0,
                    progress: Progress | None = None, seed: int = 0) -> list[LatencyProfile]:
    """Time every truncated exit, segment and span the backend has, at each batch size."""
    manifest = backend.manifest
    if not batches or any(b < 1 for b in batches):
        raise ByotError(f"batch sizes must be positive integers, got {list(batches)}")
    rng = np.random.default_rng(seed)
    profiles = []
    for b in batches:
        x = rng.standard_normal((b, *manifest.input.shape)).astype(manifest.input.dtype)
        entries = []
        h = x  # segment k's input: section k-1's output for this very batch
        inputs = {}
        for k in range(1, manifest.num_exits + 1):
            entry: dict[str, object] = {"exit": k}
            inputs[k] = h
            for kind in (EXIT, SEGMENT):
                name = artifact_name(kind, k)
                if not backend.has(name):
                    continue
                io = backend.load(name)
                feed = {io.input: x if kind == EXIT else h}
                if progress:
                    progress(f"batch {b}: {name}")
                entry["truncated" if kind == EXIT else "segment"] = time_call(
                    lambda name=name, feed=feed: backend.run(name, feed),
                    warmup, runs, max_seconds)
                if kind == SEGMENT and io.section is not None:
                    h = backend.run(name, feed)[io.section]
            spans = {}
            for first in range(1, k):
                name = span_name(first, k)
                if not backend.has(name):
                    continue
                io = backend.load(name)
                feed = {io.input: inputs[first]}
                if progress:
                    progress(f"batch {b}: {name}")
                spans[str(first)] = time_call(lambda name=name, feed=feed: backend.run(name, feed),
                                              warmup, runs, max_seconds)
            if spans:
                entry["spans"] = spans
            entries.append(entry)
        if progress:
            progress(f"batch {b}: the runtime's cascade")
        cascade = _time_cascade(backend, x, warmup, runs, max_seconds)
        if cascade is not None:
            entries[-1]["cascade"] = cascade
        if all(len(e) == 1 for e in entries):
            raise ByotError(f"the manifest has no files the {backend.name} backend can run; "
                            "export them first with `byot-edge export`")
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        profiles.append(LatencyProfile(backend.name, backend.device, b, entries, created))
    return profiles


def _time_cascade(backend: Backend, x: np.ndarray, warmup: int, runs: int,
                  max_seconds: float) -> dict[str, float] | None:
    """The anytime model's worst case with every exit on; None without every segment."""
    from byot_edge.runtime.anytime import AnytimeModel  # deferred: it imports this module
    from byot_edge.runtime.policies import NEVER, ConfidenceThresholds

    num_exits = backend.manifest.num_exits
    model = AnytimeModel(backend.manifest, backend)
    if not model.has_segments():
        return None
    never = ConfidenceThresholds.for_model(NEVER, num_exits)
    plan = tuple(range(1, num_exits + 1))
    return time_call(lambda: model.run_policy(x, never, plan=plan), warmup, runs, max_seconds)


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


def exit_latencies(choice: ProfileChoice, stat: str = "p90") -> list[float]:
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


def segment_latencies(choice: ProfileChoice, stat: str = "p90") -> list[float] | None:
    """Per segment k, its time (None when the profile has no segments)."""
    check_stat(stat)
    segs = [stat_of(e, "segment", stat) for e in sorted(choice.profile.exits,
                                                         key=lambda e: e["exit"])]
    if any(s is None for s in segs):
        return None
    return [s * choice.scale for s in segs]  # type: ignore[operator]
