"""What a cascade plan costs per sample: FLOPs, as export counted them, and latency, from
the manifest's latency profile.

A sample answered at exit k pays the segments up to k. An exit whose threshold is off costs
nothing beyond its section: the runtime skips its branch (and, where it can, runs the
sections up to the next exit that is on as one span). The exits that are on make the
candidate's plan; its latency is the plan as the profile timed it through the runtime, to
the end of each step, else composed from the files' times (older profiles, K > 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import LatencyProfile, Manifest
from byot_edge.plans import Plan
from byot_edge.runtime.latency import Latencies, ProfileChoice, resolve


@dataclass(frozen=True)
class Costs:
    """Per exit k (index k-1): what a sample answered there cost, through the cascade with
    every exit on (segments 1..k) and alone (the truncated network). A cascade with exits
    switched off skips their branches; `plan_costs` prices that, as measured where the
    profile timed the plan."""

    flops_cascade: list[float]
    flops_alone: list[float]
    # ms per sample, the runtime's own time per step included where the profile measured it
    latency_cascade: list[float] | None = None
    latency_alone: list[float] | None = None
    latency_source: str = ""
    notes: list[str] = field(default_factory=list)
    branch_flops: list[float] | None = None  # per exit 1..K-1; None: not counted
    # (first, last) -> ms per sample of segments first..last joined (first < last)
    span_latency: dict[tuple[int, int], float] = field(default_factory=dict)
    # plan -> ms per sample at the end of each of its steps, timed through the runtime
    plan_latency: dict[Plan, list[float]] = field(default_factory=dict)

    def plan_costs(self, plan: Plan | Sequence[int], metric: str) -> list[float]:
        """Per exit k (index k-1) in `plan` (the exits that are on, ending at the deepest):
        the cost of a sample answered there. Exits outside the plan get the cost of the
        next one in it (no sample answers there)."""
        plan = Plan.of(plan)
        num_exits = len(self.flops_cascade)
        on = set(plan)
        if metric == "flops":
            skipped = np.cumsum([0.0] + [b if k not in on else 0.0
                                         for k, b in enumerate(self.branch_flops or [], 1)])
            cost = [c - skipped[min(k, len(skipped) - 1)]
                    for k, c in enumerate(self.flops_cascade)]
        elif plan in self.plan_latency:  # measured as a whole
            cost = [0.0] * num_exits
            for k, ms in zip(plan, self.plan_latency[plan], strict=True):
                cost[k - 1] = ms
        else:
            assert self.latency_cascade is not None
            seg = np.diff([0.0, *self.latency_cascade])
            cost, total, prev = [0.0] * num_exits, 0.0, 0
            for k in sorted(on):
                step = self.span_latency.get((prev + 1, k)) if k > prev + 1 else None
                total += step if step is not None else float(seg[prev:k].sum())
                cost[k - 1], prev = total, k
        out, nxt = list(cost), cost[-1]
        for k in range(num_exits, 0, -1):  # exits that are off: priced as the next one on
            nxt = out[k - 1] if k in on else nxt
            out[k - 1] = nxt
        return [float(c) for c in out]


def segment_flops(manifest: Manifest) -> tuple[list[float], list[float]]:
    """Per segment at batch 1, as export counted them: the FLOPs of its section (the stem
    included in the first) and of its exit's branch."""
    sections = [e.section_flops for e in manifest.exits]
    branches = [e.branch_flops for e in manifest.exits]
    if any(v is None for v in (*sections, *branches)):
        raise ByotError(f"the manifest in {manifest.root} predates per-segment FLOPs, which "
                        "calibration prices a cascade by; re-export it with `byot-edge export "
                        f"CHECKPOINT --out {manifest.root} --segments` (thresholds and profiles "
                        "are kept)")
    return [float(v) for v in sections], [float(v) for v in branches]  # type: ignore[arg-type]


def manifest_costs(manifest: Manifest, backend: str | None = None, stat: str = "p50",
                   batch: int | None = None) -> Costs:
    """FLOPs always; latency too when the manifest holds a profile (of `backend`, if named).
    Latency is per sample, from the profile at `batch`, else the smallest profiled batch
    (batch 1 is the anytime case; a server batching requests is priced at its own batch)."""
    notes: list[str] = []
    alone = [float(e.flops) for e in manifest.exits]
    sections, heads = segment_flops(manifest)
    cascade = list(np.cumsum(np.add(sections, heads)))
    costs = Costs([float(c) for c in cascade], alone, notes=notes, branch_flops=heads[:-1])
    profiles = [p for p in manifest.latency_profiles if backend in (None, p.backend)]
    if backend and not profiles and manifest.latency_profiles:
        notes.append(f"the manifest has no latency profile for {backend}; costs are FLOPs")
    if batch is not None and profiles and all(p.batch != batch for p in profiles):
        have = sorted({p.batch for p in profiles})
        raise ByotError(f"the manifest has no latency profile at batch {batch} (it has batch "
                        f"{', '.join(map(str, have))}); run `byot-edge profile --batch {batch}` "
                        "first, or pick one of those")
    if profiles:
        size = batch if batch is not None else min(p.batch for p in profiles)
        costs = _with_latency(costs, max((p for p in profiles if p.batch == size),
                                         key=lambda p: p.created), stat)
    return costs


def _with_latency(costs: Costs, p: LatencyProfile, stat: str) -> Costs:
    """`costs` with latency per sample from profile `p`: measured plans where it timed them
    through the runtime, else composed from the files' timings and the runtime's time per
    step."""
    lat = resolve(ProfileChoice(p, 1.0, None), stat)
    if lat.segments is None:
        costs.notes.append("the latency profile has no segment timings; costs are FLOPs "
                           "(re-export with --segments and re-run `byot-edge profile`)")
        return costs
    per_sample = _per_sample(lat, p.batch)
    seg = per_sample.segments
    assert seg is not None
    # Every step and every single-exit call also pays the runtime's own time: the profiled
    # cascade through every segment, less the segments, per step.
    runtime = per_sample.cascade
    overhead = max(0.0, runtime - sum(seg)) / len(seg) if runtime is not None else 0.0
    cascade = list(np.cumsum(np.add(seg, overhead)))
    extra = overhead
    spans = {key: ms + overhead for key, ms in per_sample.spans.items()}
    plans = per_sample.plans
    source = f"{p.backend} on {p.device}, batch {p.batch}, {stat}"
    deepest = plans.get(Plan((len(seg),)))
    truncated = per_sample.truncated
    if deepest and truncated[-1] is not None:
        # The deepest exit alone is its plan's one step; exits alone pay the same extra over
        # their files as it does.
        extra = max(0.0, deepest[0] - truncated[-1])
        cascade = plans.get(Plan.every_exit(len(seg)), cascade)
        source += f", {len(plans)} plans timed through the runtime"
    elif runtime is not None:
        source += f", {overhead * p.batch:.3g} ms of runtime per step"
        if not plans:
            costs.notes.append("the latency profile predates plan timing: each plan's cost is "
                               "composed from its files (less exact); re-run `byot-edge "
                               "profile`")
    else:
        costs.notes.append("the latency profile predates runtime timing: costs leave out the "
                           "runtime's time per step; re-run `byot-edge profile`")
    alone = [t + extra if t is not None else c for t, c in zip(truncated, cascade, strict=True)]
    if deepest:  # as measured, even where it came out faster than its file alone
        alone[-1] = deepest[0]
    return replace(costs, latency_cascade=[float(c) for c in cascade],
                   latency_alone=[float(c) for c in alone], latency_source=source,
                   span_latency=spans, plan_latency=plans)


def _per_sample(lat: Latencies, batch: int) -> Latencies:
    """The figures of a profile at `batch`, divided by it."""
    return Latencies(
        truncated=[None if t is None else t / batch for t in lat.truncated],
        segments=None if lat.segments is None else [s / batch for s in lat.segments],
        spans={key: ms / batch for key, ms in lat.spans.items()},
        plans={plan: [ms / batch for ms in at] for plan, at in lat.plans.items()},
        cascade=None if lat.cascade is None else lat.cascade / batch)
