"""The read side of latency profiles: which profile describes this backend, device and batch,
and its figures resolved for one statistic.

    choice = select_profile(manifest, "onnxruntime", "cpu (AMD EPYC)", batch=8)
    lat = resolve(choice, "p90")
    lat.exits[k - 1]           # exit k's answer by its cheapest route, ms for the batch
    lat.step_ms(plan, j)       # step j of a cascade plan

The anytime model resolves once per batch size and statistic (budgets, deadlines) and
calibration prices plans from the same figures. The timing side, which writes profiles,
is `runtime.profile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from byot_edge.errors import ByotError
from byot_edge.manifest import Manifest, backend_precision
from byot_edge.plans import Plan
from byot_edge.profiles import LatencyProfile
from byot_edge.timing import STATS, Stats, check_stat

__all__ = ["STATS", "Latencies", "ProfileChoice", "check_stat", "resolve", "select_profile"]


@dataclass(frozen=True)
class ProfileChoice:
    profile: LatencyProfile
    scale: float  # multiply the profile's figures by this for the batch at hand
    warning: str | None  # set when the profile is from another backend or device
    # A batch between two profiled sizes: `profile` is the smaller, `upper` the larger, and
    # each figure lies `weight` (0..1) of the way from the smaller's to the larger's.
    upper: LatencyProfile | None = None
    weight: float = 0.0


def select_profile(manifest: Manifest, backend: str, device: str, batch: int = 1,
                   precision: str | None = None) -> ProfileChoice | None:
    """The profile that best describes `backend` on `device` at `batch`, running files of
    `precision` (default: those the manifest lists for `backend`).

    Prefers this backend, device and precision; falls back to another device, then another
    backend or precision, with a warning. A profile that records no precision (written
    before it was recorded) counts as this one. Among batch sizes: the same; else, between
    two profiled sizes, linearly between them; else the smallest larger one (an
    overestimate, the safe side for a budget); else the largest, scaled linearly.

    Between two sizes the larger alone is not safe but wrong: with profiles at 1 and 32, a
    batch of 2 was priced at 32's time (20 ms, against 1.3 ms), and a server refused as
    hopeless every request with a deadline under that which arrived behind another one.
    """
    precision = precision or backend_precision(manifest, backend)
    # fp32 timings priced int8 files as if nothing had changed: another precision is
    # another backend as far as latency goes.
    same = [p for p in manifest.latency_profiles if p.precision in (None, precision)]
    tiers = [
        [p for p in same if p.backend == backend and p.device == device],
        [p for p in same if p.backend == backend],
        list(manifest.latency_profiles),
    ]
    for tier, found in enumerate(tiers):
        if not found:
            continue
        larger = sorted((p for p in found if p.batch >= batch), key=lambda p: (p.batch, p.created))
        smaller = sorted((p for p in found if p.batch < batch), key=lambda p: (p.batch, p.created))
        upper: LatencyProfile | None = None
        weight = 0.0
        if larger:
            same_batch = [p for p in larger if p.batch == larger[0].batch]
            best, scale = same_batch[-1], 1.0  # newest of the closest batch
            if best.batch != batch and smaller:  # newest of the closest smaller batch
                low = [p for p in smaller if p.batch == smaller[-1].batch][-1]
                best, upper = low, best
                weight = (batch - low.batch) / (upper.batch - low.batch)
        else:
            best = max(found, key=lambda p: (p.batch, p.created))
            scale = batch / best.batch
        warning = None
        if tier > 0:
            warning = (f"the latency profile in the manifest was measured with "
                       f"{_measured(best)}, not {backend} on {device} ({precision} files); "
                       "budgets may be missed. Run `byot-edge profile "
                       f"{manifest.root / 'manifest.json'} --backend {backend}` on this machine")
        return ProfileChoice(best, scale, warning, upper, weight)
    return None


def _measured(p: LatencyProfile) -> str:
    return f"{p.backend} on {p.device}" + (f" ({p.precision} files)" if p.precision else "")


@dataclass(frozen=True)
class Latencies:
    """One profile's figures for one statistic, ms for the batch (scaled to it)."""

    truncated: list[float | None]  # per exit k (index k-1): its truncated file
    segments: list[float] | None  # per segment; None when the profile lacks one
    spans: dict[tuple[int, int], float] = field(default_factory=dict)  # (first, last)
    plans: dict[Plan, list[float]] = field(default_factory=dict)  # at the end of each step
    cascade: float | None = None  # the runtime's whole call, every exit on
    warning: str | None = None

    @property
    def exits(self) -> list[float]:
        """Per exit k, the time to get its answer by the cheapest recorded route: its
        truncated file, else segments 1..k."""
        out: list[float] = []
        for k, trunc in enumerate(self.truncated, start=1):
            best = trunc if trunc is not None else (
                sum(self.segments[:k]) if self.segments is not None else None)
            if best is None:
                raise ByotError(f"the latency profile has no timing for exit {k}; re-run "
                                "`byot-edge profile`")
            out.append(best)
        return out

    def section_ms(self, first: int, last: int) -> float | None:
        """Sections first..last as the cascade runs them: one span where profiled, else the
        segments one after another."""
        if (first, last) in self.spans:
            return self.spans[first, last]
        return None if self.segments is None else sum(self.segments[first - 1:last])

    def step_ms(self, plan: Plan, j: int) -> float | None:
        """Step j (0-based) of `plan`: as the profile timed the plan through the runtime,
        else its span or segments; None when the profile has neither."""
        at = self.plans.get(plan)
        if at is not None:
            return at[j] - (at[j - 1] if j else 0.0)
        return self.section_ms(*plan.steps()[j])


def resolve(choice: ProfileChoice, stat: str = "p50") -> Latencies:
    check_stat(stat)
    lat = _figures(choice.profile, choice.scale, stat)
    if choice.upper is not None:
        lat = _between(lat, _figures(choice.upper, 1.0, stat), choice.weight)
    return replace(lat, warning=choice.warning)


def _figures(p: LatencyProfile, scale: float, stat: str) -> Latencies:
    def ms(s: Stats | None) -> float | None:
        return None if s is None else s.get(stat) * scale

    segments = [ms(e.segment) for e in p.exits]
    return Latencies(
        truncated=[ms(e.truncated) for e in p.exits],
        segments=None if any(s is None for s in segments) else segments,  # type: ignore[arg-type]
        spans={(first, e.exit): s.get(stat) * scale
               for e in p.exits for first, s in e.spans.items()},
        plans={plan: [s.get(stat) * scale for s in at] for plan, at in p.plans.items()},
        cascade=ms(p.cascade))


def _between(low: Latencies, high: Latencies, weight: float) -> Latencies:
    """Each figure `weight` of the way from `low`'s to `high`'s; where only one profile has
    a figure, the larger batch's (the safe side), else the smaller's."""
    def mix(a: float | None, b: float | None) -> float | None:
        if a is None or b is None:
            return b if b is not None else a
        return a + weight * (b - a)

    def mix_all(a: list[float] | None, b: list[float] | None) -> list[float] | None:
        if a is None or b is None or len(a) != len(b):
            return b if b is not None else a
        return [mix(a_, b_) for a_, b_ in zip(a, b, strict=True)]  # type: ignore[misc]

    truncated = [mix(a, b) for a, b in zip(low.truncated, high.truncated, strict=True)]
    return Latencies(
        truncated=truncated, segments=mix_all(low.segments, high.segments),
        spans={k: mix(low.spans.get(k), high.spans.get(k))  # type: ignore[misc]
               for k in low.spans.keys() | high.spans.keys()},
        plans={k: mix_all(low.plans.get(k), high.plans.get(k))  # type: ignore[misc]
               for k in low.plans.keys() | high.plans.keys()},
        cascade=mix(low.cascade, high.cascade))
