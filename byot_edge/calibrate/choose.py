"""`calibrate`: choose thresholds for exits 1..K-1 meeting one objective, from validation
logits and the costs of each plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from byot_edge.calibrate.candidates import Calibration, Candidate, Evaluator
from byot_edge.calibrate.controlled import learn_then_test
from byot_edge.calibrate.costs import Costs
from byot_edge.calibrate.gate_fit import PlanFeatures, fit_gates, gate_targets, plan_scores
from byot_edge.calibrate.logits import ValLogits, fit_temperature
from byot_edge.calibrate.risk import check_delta, check_risk, split_indices
from byot_edge.calibrate.search import (
    MSDNET_P,
    direct_search,
    greedy_path,
    msdnet_thresholds,
    threshold_grid,
)
from byot_edge.errors import ByotError
from byot_edge.plans import Plan
from byot_edge.runtime.gates import GATE
from byot_edge.runtime.policies import NEVER, check_criterion, confidence


@dataclass(frozen=True)
class Objective:
    """What the search meets (`feasible`) and, among what meets it, minimises (`key`)."""

    description: str
    feasible: Callable[[Candidate], bool]
    key: Callable[[Candidate], tuple[float, float]]
    # The part of `feasible` that does not depend on the samples (the worst case's bound):
    # what risk control keeps when it replaces the accuracy target by a guarantee
    within_bounds: Callable[[Candidate], bool] = lambda c: True


def calibrate(val: ValLogits, costs: Costs, *, criterion: str = "max_softmax",
              temperature: bool = False, max_drop: float | None = None,
              flops_budget: float | None = None, latency_budget_ms: float | None = None,
              max_worst_case: float | None = None, grid_size: int = 100,
              delta: float | None = None, risk: str = "drop", fit_fraction: float = 0.5,
              seed: int = 0) -> Calibration:
    """Choose thresholds for exits 1..K-1 meeting exactly one objective:
    `max_drop` (accuracy points below the deepest exit, at the least expected cost), or the
    best accuracy within `flops_budget` (FLOPs per sample) or `latency_budget_ms`.

    With `delta`, the `max_drop` objective is met with a guarantee (calibrate/risk.py): the
    `risk` ("drop", or "disagreement" with the deepest exit, which needs no labels) on new
    data from the same distribution stays within `max_drop` points with probability at least
    1 - delta. A share `fit_fraction` of the samples (drawn with `seed`) orders the candidates
    and fits the gates; the rest tests them. Without `delta`, the choice is a point estimate.

    `criterion` "gate" learns a gate per exit (runtime/gates.py) on that share first.
    `max_worst_case` also bounds what a sample no exit lets go costs, as a multiple of the
    deepest exit alone (1.1: at most 10% more): the branches of the exits that are on are
    that overhead, so it limits which exits may be on."""
    gated = criterion == GATE
    if not gated:
        check_criterion(criterion)
    max_drop = _check_request(val, costs, max_drop, flops_budget, latency_budget_ms,
                              max_worst_case)
    if delta is not None:
        check_delta(delta)
        if max_drop is None:
            raise ByotError("--delta bounds the risk of --max-drop; a FLOPs or latency budget "
                            "is met as a point estimate: drop --delta, or use --max-drop")
    check_risk(risk)
    if risk == "disagreement" and delta is None:
        raise ByotError("--risk disagreement is a guarantee: give it with --delta (e.g. 0.1)")
    num_exits = val.num_exits
    metric = "flops" if flops_budget is not None or costs.latency_cascade is None else "latency"
    temps = ([fit_temperature(val.logits[k], val.labels) for k in range(num_exits)]
             if temperature else None)
    fit, test = split_indices(len(val.labels), fit_fraction, seed) if (
        gated or delta is not None) else (None, None)
    gates, by_plan = None, None
    if gated:
        features = PlanFeatures(val.logits, temps)
        gates = fit_gates(features, gate_targets(val.logits, val.labels, risk), fit)
        by_plan = plan_scores(features, gates)
        scores = by_plan[Plan.every_exit(num_exits)]
    else:
        scores = np.stack([confidence(val.logits[k], criterion, temps[k] if temps else 1.0)
                           for k in range(num_exits - 1)])
    pred = val.logits.argmax(axis=2)
    correct = pred == val.labels[None]
    ev = Evaluator(scores, correct, costs, pred == pred[-1:], by_plan)
    deepest = float(correct[-1].mean())
    objective = _objective(metric, deepest, max_drop, flops_budget, latency_budget_ms)
    if max_worst_case is not None:
        objective = _bound_worst_case(objective, metric, costs, max_worst_case)
    guarantee = None
    if delta is not None:
        assert fit is not None and test is not None and max_drop is not None
        chosen, guarantee, _ = learn_then_test(
            ev, fit, test, risk=risk, max_risk=max_drop / 100, delta=delta, metric=metric,
            allowed=objective.within_bounds, grid_size=grid_size)
        chosen = replace(chosen, method=f"ltt ({risk}, delta {delta:g})")
        description = guarantee.describe()
        if max_worst_case is not None:
            description += f", worst case <= {max_worst_case:g}x the deepest exit alone"
        objective = replace(objective, description=description)
    else:
        chosen = _search(ev, scores, objective, metric, grid_size)
    notes = _notes(val, costs)
    if guarantee is not None and all(t == NEVER for t in chosen.thresholds):
        notes.append(f"no early exit could be certified on {len(test)} held-back samples "  # type: ignore[arg-type]
                     f"at delta {delta:g}: every sample goes to the deepest exit; use more "
                     "validation samples, a larger --max-drop or --delta, or a point estimate "
                     "(no --delta)")
    return Calibration(criterion, temps, metric, objective.description, chosen,
                       list(ev.seen.values()), _exits_alone(costs, correct), deepest,
                       len(val.labels), costs, notes, guarantee, gates)


def _check_request(val: ValLogits, costs: Costs, max_drop: float | None,
                   flops_budget: float | None, latency_budget_ms: float | None,
                   max_worst_case: float | None) -> float | None:
    """Refuse what cannot be calibrated; the max_drop to use (0.5 when no objective is
    given)."""
    given = [v for v in (max_drop, flops_budget, latency_budget_ms) if v is not None]
    if len(given) > 1:
        raise ByotError("choose one of --max-drop, --flops-budget and --latency-budget-ms")
    if len(costs.flops_cascade) != val.num_exits:
        raise ByotError(f"the logits have {val.num_exits} exits but the model has "
                        f"{len(costs.flops_cascade)}; evaluate the checkpoint this manifest "
                        "was exported from")
    if max_worst_case is not None and not max_worst_case >= 1:
        raise ByotError(f"--max-worst-case is a multiple of the deepest exit's cost, at least 1 "
                        f"(1.1 allows 10% more), got {max_worst_case}")
    if latency_budget_ms is not None and costs.latency_cascade is None:
        raise ByotError("--latency-budget-ms needs a latency profile with segment timings in "
                        "the manifest; run `byot-edge profile MANIFEST` first, or use "
                        "--flops-budget")
    return 0.5 if not given else max_drop


def _objective(metric: str, deepest: float, max_drop: float | None,
               flops_budget: float | None, latency_budget_ms: float | None) -> Objective:
    if max_drop is not None:
        if not max_drop >= 0:
            raise ByotError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")
        target = deepest - max_drop / 100
        return Objective(
            f"least expected {metric} with accuracy >= {100 * target:.2f}% "
            f"(deepest exit {100 * deepest:.2f}% - {max_drop:g} points)",
            lambda c: c.accuracy >= target - 1e-12,
            lambda c: (c.cost(metric), -c.accuracy))
    budget = float(flops_budget if flops_budget is not None else latency_budget_ms)  # type: ignore[arg-type]
    unit = "FLOPs" if metric == "flops" else "ms"
    if not budget > 0:
        raise ByotError(f"the budget must be positive, got {budget:g} {unit}")
    return Objective(f"best accuracy with expected {metric} <= {budget:.4g} {unit} per sample",
                     lambda c: c.cost(metric) <= budget * (1 + 1e-12),
                     lambda c: (-c.accuracy, c.cost(metric)))


def _bound_worst_case(objective: Objective, metric: str, costs: Costs,
                      max_worst_case: float) -> Objective:
    """The objective, also bounding the slowest sample's cost to a multiple of the deepest
    exit alone."""
    ceiling = max_worst_case * (costs.flops_alone[-1] if metric == "flops"
                                else float(costs.latency_alone[-1]))  # type: ignore[index]
    meets = objective.feasible

    def bounded(c: Candidate) -> bool:
        return c.worst(metric) <= ceiling * (1 + 1e-12)

    return Objective(
        objective.description + f", worst case <= {max_worst_case:g}x the deepest exit alone",
        lambda c: meets(c) and bounded(c), objective.key, bounded)


def _search(ev: Evaluator, scores: np.ndarray, objective: Objective, metric: str,
            grid_size: int) -> Candidate:
    """MSDNet's family and the greedy path, then direct searches from the best feasible
    candidates of each: the best feasible candidate seen."""
    num_exits = ev.num_exits
    grids = [threshold_grid(scores[k], grid_size) for k in range(num_exits - 1)]
    for p in MSDNET_P:
        ev(msdnet_thresholds(scores, float(p), num_exits), f"msdnet p={p:.2f}")
    greedy_path(ev, grids, metric)
    start = [c for c in ev.seen.values() if objective.feasible(c)]
    if not start:
        cheapest = min(ev.seen.values(), key=lambda c: c.cost(metric))
        raise ByotError(f"no thresholds meet: {objective.description}; the cheapest cascade "
                        f"costs {cheapest.cost(metric):.4g} per sample. Raise the budget")
    # Several starts: the best feasible candidates of each search.
    for method in ("msdnet", "greedy"):
        ranked = sorted((c for c in start if c.method.startswith(method)), key=objective.key)
        for c in ranked[:2]:
            direct_search(ev, grids, c, objective.feasible, objective.key)
    return min((c for c in ev.seen.values() if objective.feasible(c)), key=objective.key)


def _exits_alone(costs: Costs, correct: np.ndarray) -> list[Candidate]:
    """Exit k for everyone, at its truncated file's cost."""
    num_exits = len(correct)
    alone = []
    for k in range(num_exits):
        lat = costs.latency_alone[k] if costs.latency_alone else None
        fr = tuple(1.0 if j == k else 0.0 for j in range(num_exits))
        alone.append(Candidate(f"exit {k + 1} alone", (), float(correct[k].mean()),
                               costs.flops_alone[k], lat, fr, costs.flops_alone[k], lat))
    return alone


def _notes(val: ValLogits, costs: Costs) -> list[str]:
    notes = list(costs.notes)
    if val.split == "test":
        notes.insert(0, f"{val.path} says it holds the TEST split: thresholds tuned on test data "
                        "make every test figure optimistic; use `byot-edge eval --split val "
                        "--save-logits` instead")
    elif val.split not in ("val", "validation"):
        notes.insert(0, f"{val.path} holds the {val.split!r} split, not a held-out validation "
                        "split; thresholds may be miscalibrated")
    return notes
