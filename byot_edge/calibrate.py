"""Choosing per-exit confidence thresholds on held-out validation logits.

Input: the logits of every exit on a validation split ([K, N, C], `byot-edge eval
--save-logits`), never the test split. Every candidate set of thresholds is scored by an
offline replay of the cascade (`exits_for_thresholds`, the runtime's own rule) for its
accuracy and its expected cost per sample: FLOPs of the segments each sample runs, or their
measured latency when the manifest holds a profile. An exit whose threshold is off costs
nothing beyond its section: the runtime skips its branch (and, where it can, runs the
sections up to the next exit that is on as one span). The exits that are on make the
candidate's plan; its latency is the plan as the profile timed it through the runtime, to
the end of each step, else composed from the files' times (older profiles, K > 5).

Candidates come from three searches, and the best one that meets the objective wins:
- MSDNet's budgeted search (Huang et al., ICLR 2018, `dynamic_evaluate`): a one-parameter
  family where a fraction proportional to p^k of the samples leaves at exit k, each
  threshold set so that this fraction of the samples still running leaves there;
- a greedy path from "everyone to the deepest exit" down to "everyone at exit 1", each step
  lowering the one threshold that loses the least accuracy per unit of cost saved;
- a direct (coordinate) search from the best feasible candidate: each threshold in turn is
  moved to whichever grid value improves the objective while keeping it feasible, until
  nothing moves. With `--max-drop` this finds the least expected cost meeting the accuracy
  target; with a FLOPs or latency budget, the best accuracy within it.

Grid thresholds sit halfway between consecutive observed scores, so a backend whose logits
differ in the last float bits (ONNX Runtime vs PyTorch vs fp16 TensorRT) still makes the
same decisions as the replay.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.extras import require
from byot_edge.manifest import LatencyProfile, Manifest, Thresholds, load_manifest
from byot_edge.runtime.policies import NEVER, check_criterion, confidence, exits_for_thresholds
from byot_edge.runtime.profile import parse_plan_key

MSDNET_P = np.arange(1, 40) / 20  # the reference code's p = 0.05 .. 1.95


# -- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValLogits:
    logits: np.ndarray  # [K, N, C] float32
    labels: np.ndarray  # [N] int64
    split: str
    dataset: str
    path: Path

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]


def load_logits(path: str | Path) -> ValLogits:
    """Read a logits file (`np.savez(logits=[K,N,C], labels=[N], split, dataset, exits)`)."""
    path = Path(path)
    if not path.is_file():
        raise ByotError(f"logits file {path} does not exist; write one with `byot-edge eval "
                        "CHECKPOINT --split val --save-logits FILE.npz`")
    try:
        with np.load(path, allow_pickle=False) as d:
            data = {k: d[k] for k in d.files}
    except (ValueError, OSError) as e:
        raise ByotError(f"{path} is not a readable .npz logits file ({e}); write one with "
                        "`byot-edge eval --save-logits`") from None
    missing = [k for k in ("logits", "labels") if k not in data]
    if missing:
        raise ByotError(f"{path} lacks {', '.join(missing)}; write it with `byot-edge eval "
                        "--save-logits`")
    logits, labels = data["logits"], data["labels"]
    if logits.ndim != 3 or labels.ndim != 1 or logits.shape[1] != len(labels):
        raise ByotError(f"{path} holds logits {list(logits.shape)} and labels "
                        f"{list(labels.shape)}; expected [exits, N, classes] and [N]")
    if len(labels) == 0:
        raise ByotError(f"{path} holds no samples")
    if not np.isfinite(logits).all():
        raise ByotError(f"{path} has NaN or inf logits; evaluate a healthy checkpoint")
    if labels.min() < 0 or labels.max() >= logits.shape[2]:
        raise ByotError(f"{path} has labels outside 0..{logits.shape[2] - 1}")
    split = str(data["split"]) if "split" in data else "unknown"
    dataset = str(data["dataset"]) if "dataset" in data else ""
    return ValLogits(logits.astype(np.float32), labels.astype(np.int64), split, dataset, path)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al., 2017):
    golden-section search on log T, which is unimodal in practice."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        logp = s[np.arange(len(y)), y] - np.log(np.exp(s).sum(axis=1))
        return float(-logp.mean())

    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))


# -- costs -------------------------------------------------------------------------------


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
    plan_latency: dict[tuple[int, ...], list[float]] = field(default_factory=dict)

    def plan_costs(self, plan: Sequence[int], metric: str) -> list[float]:
        """Per exit k (index k-1) in `plan` (the exits that are on, ending at the deepest):
        the cost of a sample answered there. Exits outside the plan get the cost of the
        next one in it (no sample answers there)."""
        num_exits = len(self.flops_cascade)
        on = set(plan)
        if metric == "flops":
            skipped = np.cumsum([0.0] + [b if k not in on else 0.0
                                         for k, b in enumerate(self.branch_flops or [], 1)])
            cost = [c - skipped[min(k, len(skipped) - 1)]
                    for k, c in enumerate(self.flops_cascade)]
        elif tuple(plan) in self.plan_latency:  # measured as a whole
            cost = [0.0] * num_exits
            for k, ms in zip(plan, self.plan_latency[tuple(plan)], strict=True):
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
    entries = sorted(p.exits, key=lambda e: e["exit"])
    if not all("segment" in e for e in entries):
        costs.notes.append("the latency profile has no segment timings; costs are FLOPs "
                           "(re-export with --segments and re-run `byot-edge profile`)")
        return costs
    per_sample = [{w: e[w][stat] / p.batch for w in ("segment", "truncated") if w in e}
                  for e in entries]
    seg = [e["segment"] for e in per_sample]
    # Every step and every single-exit call also pays the runtime's own time: the profiled
    # cascade through every segment, less the segments, per step.
    runtime = entries[-1].get("cascade")
    overhead = max(0.0, runtime[stat] / p.batch - sum(seg)) / len(seg) if runtime else 0.0
    cascade = list(np.cumsum(np.add(seg, overhead)))
    extra = overhead
    spans = {(int(first), e["exit"]): v[stat] / p.batch + overhead
             for e in entries for first, v in e.get("spans", {}).items()}
    plans = {parse_plan_key(key): [v[stat] / p.batch for v in at]
             for key, at in entries[-1].get("plans", {}).items()}
    source = f"{p.backend} on {p.device}, batch {p.batch}, {stat}"
    deepest = plans.get((len(entries),))
    if deepest and "truncated" in per_sample[-1]:
        # The deepest exit alone is its plan's one step; exits alone pay the same extra over
        # their files as it does.
        extra = max(0.0, deepest[0] - per_sample[-1]["truncated"])
        cascade = plans.get(tuple(range(1, len(entries) + 1)), cascade)
        source += f", {len(plans)} plans timed through the runtime"
    elif runtime:
        source += f", {overhead * p.batch:.3g} ms of runtime per step"
        if not plans:
            costs.notes.append("the latency profile predates plan timing: each plan's cost is "
                               "composed from its files (less exact); re-run `byot-edge "
                               "profile`")
    else:
        costs.notes.append("the latency profile predates runtime timing: costs leave out the "
                           "runtime's time per step; re-run `byot-edge profile`")
    alone = [e["truncated"] + extra if "truncated" in e else c
             for e, c in zip(per_sample, cascade, strict=True)]
    if deepest:  # as measured, even where it came out faster than its file alone
        alone[-1] = deepest[0]
    return replace(costs, latency_cascade=[float(c) for c in cascade],
                   latency_alone=[float(c) for c in alone], latency_source=source,
                   span_latency=spans, plan_latency=plans)


# -- search ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    method: str
    thresholds: tuple[float, ...]  # K-1 values; NEVER switches an exit off
    accuracy: float
    flops: float  # expected per sample
    latency_ms: float | None
    fractions: tuple[float, ...]  # share of samples answered at each exit 1..K
    # What the slowest sample costs: one that no exit lets go before the first exit that
    # answers everyone (threshold 0), else the deepest (the cascade's worst case)
    worst_flops: float = 0.0
    worst_latency_ms: float | None = None

    def cost(self, metric: str) -> float:
        return self.flops if metric == "flops" else float(self.latency_ms or 0.0)

    def worst(self, metric: str) -> float:
        return self.worst_flops if metric == "flops" else float(self.worst_latency_ms or 0.0)


@dataclass
class Calibration:
    criterion: str
    temperatures: list[float] | None
    metric: str  # "flops" or "latency": what expected cost means below
    objective: str  # human description
    chosen: Candidate
    candidates: list[Candidate]  # every distinct candidate evaluated
    exits_alone: list[Candidate]  # exit k for everyone, its truncated file's cost
    deepest_accuracy: float
    num_samples: int
    costs: Costs
    notes: list[str] = field(default_factory=list)

    def frontier(self, metric: str | None = None) -> list[Candidate]:
        """Candidates no other beats on both accuracy and expected cost (`metric`, default
        the one optimised), cheapest first."""
        metric = metric or self.metric
        best, out = -1.0, []
        for c in sorted(self.candidates, key=lambda c: (c.cost(metric), -c.accuracy)):
            if c.accuracy > best:
                out.append(c)
                best = c.accuracy
        return out


class _Evaluator:
    """Scores thresholds by replaying the cascade on the recorded scores."""

    def __init__(self, scores: np.ndarray, correct: np.ndarray, costs: Costs) -> None:
        self.scores = scores  # [K-1, N]
        self.correct = correct  # [K, N] bool
        self.costs = costs
        self.num_exits, self.n = correct.shape
        self.seen: dict[tuple[float, ...], Candidate] = {}
        self._plans: dict[tuple[tuple[int, ...], str], list[float]] = {}

    def _plan_costs(self, plan: tuple[int, ...], metric: str) -> list[float]:
        if (plan, metric) not in self._plans:
            self._plans[plan, metric] = self.costs.plan_costs(plan, metric)
        return self._plans[plan, metric]

    def __call__(self, thresholds: Sequence[float], method: str) -> Candidate:
        key = tuple(float(t) for t in thresholds)
        if key in self.seen:
            return self.seen[key]
        e = exits_for_thresholds(self.scores, key)
        counts = np.bincount(e, minlength=self.num_exits)
        acc = float(self.correct[e, np.arange(self.n)].mean())
        plan = (*(k for k, t in enumerate(key, start=1) if t <= 1), self.num_exits)
        # Scores are >= 0: past an exit with threshold 0 no sample goes on.
        last = next((k for k, t in enumerate(key, start=1) if t <= 0), self.num_exits)
        flops_at = self._plan_costs(plan, "flops")
        flops, worst_flops = float(counts @ np.asarray(flops_at)) / self.n, flops_at[last - 1]
        latency = worst_latency = None
        if self.costs.latency_cascade is not None:
            latency_at = self._plan_costs(plan, "latency")
            latency = float(counts @ np.asarray(latency_at)) / self.n
            worst_latency = latency_at[last - 1]
        if all(t > 1 for t in key):  # all off: the runtime runs the full network alone
            flops = worst_flops = self.costs.flops_alone[-1]
            latency = worst_latency = (self.costs.latency_alone[-1] if self.costs.latency_alone
                                       else None)
        c = Candidate(method, key, acc, flops, latency, tuple(float(v) for v in counts / self.n),
                      worst_flops, worst_latency)
        self.seen[key] = c
        return c


def threshold_grid(scores: np.ndarray, size: int = 100) -> np.ndarray:
    """Thresholds halfway between consecutive distinct scores (at most `size` of them, spread
    over the quantiles), plus 0 (everyone leaves) and NEVER (no one does)."""
    u = np.unique(scores)
    mids = (u[1:] + u[:-1]) / 2
    if len(mids) > size:
        mids = mids[np.unique(np.linspace(0, len(mids) - 1, size).round().astype(int))]
    return np.unique(np.concatenate([[0.0], mids, [NEVER]]))


def msdnet_thresholds(scores: np.ndarray, p: float, num_exits: int) -> list[float]:
    """MSDNet's rule: a share q_k ~ p^k of all samples leaves at exit k, taking the most
    confident of those still running; the threshold falls between the last leaving and the
    first staying sample."""
    n = scores.shape[1]
    q = p ** np.arange(1, num_exits + 1, dtype=np.float64)
    q /= q.sum()
    running = np.ones(n, dtype=bool)
    out = []
    for k in range(num_exits - 1):
        leave = int(np.floor(n * q[k]))
        s = np.sort(scores[k, running])[::-1]
        if leave <= 0 or len(s) == 0:
            t = NEVER
        elif leave >= len(s):
            t = 0.0
        else:
            t = float((s[leave - 1] + s[leave]) / 2) if s[leave - 1] > s[leave] else float(
                np.nextafter(s[leave - 1], np.inf))
        out.append(t)
        running &= scores[k] < t
    return out


def _greedy_path(ev: _Evaluator, grids: list[np.ndarray], metric: str) -> None:
    """From all thresholds at NEVER down to all at 0, one grid step at a time."""
    idx = [len(g) - 1 for g in grids]
    cur = ev([g[i] for g, i in zip(grids, idx, strict=True)], "greedy")
    while any(i > 0 for i in idx):
        best: tuple[float, int, Candidate] | None = None
        for j, g in enumerate(grids):
            if idx[j] == 0:
                continue
            t = [gg[i] for gg, i in zip(grids, idx, strict=True)]
            t[j] = g[idx[j] - 1]
            c = ev(t, "greedy")
            saved = cur.cost(metric) - c.cost(metric)
            gain = c.accuracy - cur.accuracy
            # Free moves (no cost change, no loss) first; then least loss per cost saved.
            score = np.inf if saved <= 0 and gain >= 0 else gain / saved if saved > 0 else -np.inf
            if best is None or score > best[0]:
                best = (score, j, c)
        assert best is not None
        idx[best[1]] -= 1
        cur = best[2]


def _direct_search(ev: _Evaluator, grids: list[np.ndarray], start: Candidate,
                   feasible: Callable[[Candidate], bool],
                   key: Callable[[Candidate], tuple[float, float]], radius: int = 8,
                   passes: int = 50) -> Candidate:
    """Pattern search on the grid: move one threshold anywhere on its grid, or two at once
    within `radius` grid steps (one threshold alone often cannot move without breaking the
    constraint, while trading between two exits still pays), to the best feasible point."""
    pos = [int(np.searchsorted(g, t)) for g, t in zip(grids, start.thresholds, strict=True)]
    cur = start

    def at(p: list[int]) -> Candidate:
        return ev([float(g[i]) for g, i in zip(grids, p, strict=True)], "direct")

    def better(p: list[int]) -> bool:
        nonlocal cur, pos
        c = at(p)
        if feasible(c) and key(c) < key(cur):
            cur, pos = c, p
            return True
        return False

    for _ in range(passes):
        moved = False
        for j, g in enumerate(grids):  # one threshold, anywhere
            for i in range(len(g)):
                moved |= better([*pos[:j], i, *pos[j + 1:]])
        if moved:
            continue
        for a, b in itertools.combinations(range(len(grids)), 2):  # two, nearby
            base = list(pos)
            for da in range(-radius, radius + 1):
                for db in range(-radius, radius + 1):
                    p = list(base)
                    p[a] = min(max(base[a] + da, 0), len(grids[a]) - 1)
                    p[b] = min(max(base[b] + db, 0), len(grids[b]) - 1)
                    moved |= better(p)
        if not moved:
            break
    return cur


def calibrate(val: ValLogits, costs: Costs, *, criterion: str = "max_softmax",
              temperature: bool = False, max_drop: float | None = None,
              flops_budget: float | None = None, latency_budget_ms: float | None = None,
              max_worst_case: float | None = None, grid_size: int = 100) -> Calibration:
    """Choose thresholds for exits 1..K-1 meeting exactly one objective:
    `max_drop` (accuracy points below the deepest exit, at the least expected cost), or the
    best accuracy within `flops_budget` (FLOPs per sample) or `latency_budget_ms`.

    `max_worst_case` also bounds what a sample no exit lets go costs, as a multiple of the
    deepest exit alone (1.1: at most 10% more): the branches of the exits that are on are
    that overhead, so it limits which exits may be on."""
    check_criterion(criterion)
    given = [v for v in (max_drop, flops_budget, latency_budget_ms) if v is not None]
    if len(given) > 1:
        raise ByotError("choose one of --max-drop, --flops-budget and --latency-budget-ms")
    if not given:
        max_drop = 0.5
    num_exits = val.num_exits
    if len(costs.flops_cascade) != num_exits:
        raise ByotError(f"the logits have {num_exits} exits but the model has "
                        f"{len(costs.flops_cascade)}; evaluate the checkpoint this manifest "
                        "was exported from")
    if max_worst_case is not None and not max_worst_case >= 1:
        raise ByotError(f"--max-worst-case is a multiple of the deepest exit's cost, at least 1 "
                        f"(1.1 allows 10% more), got {max_worst_case}")
    if latency_budget_ms is not None and costs.latency_cascade is None:
        raise ByotError("--latency-budget-ms needs a latency profile with segment timings in "
                        "the manifest; run `byot-edge profile MANIFEST` first, or use "
                        "--flops-budget")
    metric = "flops" if flops_budget is not None or costs.latency_cascade is None else "latency"
    temps = ([fit_temperature(val.logits[k], val.labels) for k in range(num_exits)]
             if temperature else None)
    scores = np.stack([confidence(val.logits[k], criterion, temps[k] if temps else 1.0)
                       for k in range(num_exits - 1)])
    correct = val.logits.argmax(axis=2) == val.labels[None]
    ev = _Evaluator(scores, correct, costs)
    deepest = float(correct[-1].mean())

    if max_drop is not None:
        if not max_drop >= 0:
            raise ByotError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")
        target = deepest - max_drop / 100
        objective = (f"least expected {metric} with accuracy >= {100 * target:.2f}% "
                     f"(deepest exit {100 * deepest:.2f}% - {max_drop:g} points)")

        def feasible(c: Candidate) -> bool:
            return c.accuracy >= target - 1e-12

        def key(c: Candidate) -> tuple[float, float]:
            return (c.cost(metric), -c.accuracy)
    else:
        budget = float(flops_budget if flops_budget is not None else latency_budget_ms)  # type: ignore[arg-type]
        unit = "FLOPs" if metric == "flops" else "ms"
        if not budget > 0:
            raise ByotError(f"the budget must be positive, got {budget:g} {unit}")
        objective = f"best accuracy with expected {metric} <= {budget:.4g} {unit} per sample"

        def feasible(c: Candidate) -> bool:
            return c.cost(metric) <= budget * (1 + 1e-12)

        def key(c: Candidate) -> tuple[float, float]:
            return (-c.accuracy, c.cost(metric))

    if max_worst_case is not None:
        ceiling = max_worst_case * (costs.flops_alone[-1] if metric == "flops"
                                    else float(costs.latency_alone[-1]))  # type: ignore[index]
        objective += f", worst case <= {max_worst_case:g}x the deepest exit alone"
        meets_objective = feasible

        def feasible(c: Candidate) -> bool:
            return meets_objective(c) and c.worst(metric) <= ceiling * (1 + 1e-12)

    grids = [threshold_grid(scores[k], grid_size) for k in range(num_exits - 1)]
    for p in MSDNET_P:
        ev(msdnet_thresholds(scores, float(p), num_exits), f"msdnet p={p:.2f}")
    _greedy_path(ev, grids, metric)
    start = [c for c in ev.seen.values() if feasible(c)]
    if not start:
        cheapest = min(ev.seen.values(), key=lambda c: c.cost(metric))
        raise ByotError(f"no thresholds meet: {objective}; the cheapest cascade costs "
                        f"{cheapest.cost(metric):.4g} per sample. Raise the budget")
    # Several starts: the best feasible candidates of each search.
    for method in ("msdnet", "greedy"):
        ranked = sorted((c for c in start if c.method.startswith(method)), key=key)
        for c in ranked[:2]:
            _direct_search(ev, grids, c, feasible, key)
    chosen = min((c for c in ev.seen.values() if feasible(c)), key=key)

    alone = []
    for k in range(num_exits):
        lat = costs.latency_alone[k] if costs.latency_alone else None
        fr = tuple(1.0 if j == k else 0.0 for j in range(num_exits))
        alone.append(Candidate(f"exit {k + 1} alone", (), float(correct[k].mean()),
                               costs.flops_alone[k], lat, fr, costs.flops_alone[k], lat))
    notes = list(costs.notes)
    if val.split == "test":
        notes.insert(0, f"{val.path} says it holds the TEST split: thresholds tuned on test data "
                        "make every test figure optimistic; use `byot-edge eval --split val "
                        "--save-logits` instead")
    elif val.split not in ("val", "validation"):
        notes.insert(0, f"{val.path} holds the {val.split!r} split, not a held-out validation "
                        "split; thresholds may be miscalibrated")
    return Calibration(criterion, temps, metric, objective, chosen, list(ev.seen.values()),
                       alone, deepest, len(val.labels), costs, notes)


# -- results -----------------------------------------------------------------------------


def write_thresholds(manifest: Manifest, cal: Calibration, source: str) -> Path:
    """Store the chosen thresholds in the manifest, every other field untouched."""
    c = cal.chosen
    expected: dict[str, float] = {
        "accuracy": c.accuracy, "deepest_accuracy": cal.deepest_accuracy,
        "accuracy_drop_points": 100 * (cal.deepest_accuracy - c.accuracy),
        "flops": c.flops, "deepest_flops": cal.exits_alone[-1].flops,
        "worst_case_flops": c.worst_flops,
        **{f"exit{k}_fraction": f for k, f in enumerate(c.fractions, start=1)},
    }
    if c.latency_ms is not None:
        expected["latency_ms"] = c.latency_ms
        expected["worst_case_latency_ms"] = float(c.worst_latency_ms or 0.0)
        if cal.exits_alone[-1].latency_ms:
            expected["deepest_latency_ms"] = float(cal.exits_alone[-1].latency_ms)
    manifest.thresholds = Thresholds(cal.criterion, list(c.thresholds), cal.temperatures,
                                     source, expected)
    return manifest.save()


def plot_calibration(cal: Calibration, path: str | Path) -> Path:
    """Accuracy against expected cost: the frontier of candidates, each exit alone, the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from byot_edge.fileio import atomic_write

    axes_spec = [("flops", "expected MFLOPs per sample", 1e-6)]
    if cal.chosen.latency_ms is not None:
        axes_spec.insert(0, ("latency", "expected latency per sample (ms)", 1.0))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(6 * len(axes_spec), 4.5), squeeze=False)
    for ax, (metric, label, scale) in zip(axes[0], axes_spec, strict=True):
        pts = sorted(cal.candidates, key=lambda c: c.cost(metric))
        ax.scatter([c.cost(metric) * scale for c in pts], [100 * c.accuracy for c in pts],
                   s=4, color="0.75", label="candidates")
        fr = cal.frontier(metric)
        ax.plot([c.cost(metric) * scale for c in fr], [100 * c.accuracy for c in fr],
                "-", color="tab:blue", label=f"thresholds ({cal.criterion})")
        for c in cal.exits_alone:
            x = c.cost(metric) * scale
            ax.plot(x, 100 * c.accuracy, "s", color="tab:orange")
            ax.annotate(c.method.replace(" alone", ""), (x, 100 * c.accuracy),
                        textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.plot(cal.chosen.cost(metric) * scale, 100 * cal.chosen.accuracy, "*", ms=14,
                color="tab:red", label="chosen")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(cal.objective, fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return out


def calibrate_manifest(manifest_path: str | Path, logits_path: str | Path, *,
                       criterion: str = "max_softmax", temperature: bool = False,
                       max_drop: float | None = None, flops_budget: float | None = None,
                       latency_budget_ms: float | None = None,
                       max_worst_case: float | None = None, backend: str | None = None,
                       batch: int | None = None, plot: str | Path | None = None,
                       write: bool = True) -> Calibration:
    """Load, calibrate, write the thresholds into the manifest, optionally plot."""
    if plot:  # before any work, rather than after the thresholds are written
        require("matplotlib", "for --plot")
    manifest = load_manifest(manifest_path)
    val = load_logits(logits_path)
    if val.logits.shape[2] != len(manifest.class_names):
        raise ByotError(f"{val.path} has {val.logits.shape[2]} classes but the manifest has "
                        f"{len(manifest.class_names)}; evaluate the checkpoint it was exported "
                        "from")
    cal = calibrate(val, manifest_costs(manifest, backend, batch=batch), criterion=criterion,
                    temperature=temperature, max_drop=max_drop, flops_budget=flops_budget,
                    latency_budget_ms=latency_budget_ms, max_worst_case=max_worst_case)
    if val.dataset and manifest.dataset and val.dataset != manifest.dataset:
        cal.notes.insert(0, f"{val.path} is from dataset {val.dataset!r} but the model was "
                            f"trained on {manifest.dataset!r}")
    for note in cal.notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    if write:
        source = f"{val.path.name}: split={val.split}, n={len(val.labels)}, {cal.objective}"
        write_thresholds(manifest, cal, source)
    if plot:
        plot_calibration(cal, plot)
    return cal
