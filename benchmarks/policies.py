"""Exit policies on data calibration never saw: guarantees, frontiers and the runtime.

For one model (a profiled deploy folder, its validation and test logits from `byot-edge eval
--save-logits`, and its test images), in one run:

1. **Resplits.** The validation and test logits are pooled and split at random `--resplits`
   times into a calibration half and a held-out half. Each method calibrates on the first
   (`calibrate`, `--max-drop`) and is measured on the second: mean and worst held-out drop
   against the deepest exit, the share of splits whose drop exceeds `--max-drop` (at most
   `--delta` for the guaranteed methods), and the mean expected cost (FLOPs and latency as
   the manifest's profile prices them), as a share of the deepest exit alone.
2. **Frontiers on the test split.** Each policy (max softmax, entropy, margin, max softmax
   with fitted temperatures, learned gates) is calibrated on the validation logits; every
   candidate on its validation frontier is replayed on the test logits: test accuracy
   against expected latency, beside every exit alone and the consistency oracle (each
   sample answered at the first exit that agrees with the deepest one, priced with every
   exit on). The gates are also compared with max softmax at the same expected latency,
   and every policy at a grid of latency budgets (each choosing on validation, measured on
   test), beside whether answering with the running ensemble of exits 1..k would pay.
3. **The runtime.** The chosen cascades run through `AnytimeModel` on the real test images
   (batch 1, taking turns block by block): measured mean latency and accuracy, and the
   runtime's exits and answers against an offline replay of the same backend's logits
   (which must agree exactly).

    python benchmarks/policies.py --manifest runs/c10/deploy/manifest.json \\
        --val-logits runs/c10/val_logits.npz --test-logits runs/c10/test_logits.npz \\
        --dataset cifar10 --data-dir /tmp/cifar10 --out docs/results/policies_cifar10.json \\
        --png docs/img/policies_cifar10.png

Writes the JSON as each part finishes and prints a table per part.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.calibrate import Calibration, Evaluator, ValLogits, calibrate, load_logits
from byot_edge.calibrate.costs import Costs, manifest_costs
from byot_edge.calibrate.gate_fit import PlanFeatures, plan_scores
from byot_edge.manifest import load_manifest
from byot_edge.plans import Plan
from byot_edge.runtime.gates import GATE, ExitGates
from byot_edge.runtime.policies import ConfidenceThresholds, Policy, confidence, simulate

# name -> calibrate() keyword arguments (besides max_drop)
METHODS: dict[str, dict[str, Any]] = {
    "max_softmax, point estimate": {},
    "max_softmax, LTT drop": {"delta": "DELTA"},
    "max_softmax, LTT disagreement": {"delta": "DELTA", "risk": "disagreement"},
    "gate, point estimate": {"criterion": GATE},
    "gate, LTT drop": {"criterion": GATE, "delta": "DELTA"},
}
POLICIES: dict[str, dict[str, Any]] = {
    "max_softmax": {},
    "entropy": {"criterion": "entropy"},
    "margin": {"criterion": "margin"},
    "max_softmax + temperature": {"temperature": True},
    "gate": {"criterion": GATE},
}


def say(msg: str) -> None:
    print(f"[policies] {msg}", flush=True)


def held_out_evaluator(cal: Calibration, logits: np.ndarray, labels: np.ndarray,
                       costs: Costs) -> Evaluator:
    """Replays `cal`'s policy, at any thresholds, on held-out logits."""
    pred = logits.argmax(axis=2)
    by_plan = None
    if cal.gates is not None:
        by_plan = plan_scores(PlanFeatures(logits, cal.temperatures), cal.gates)
        scores = by_plan[Plan.every_exit(logits.shape[0])]
    else:
        temps = cal.temperatures or [1.0] * logits.shape[0]
        scores = np.stack([confidence(logits[k], cal.criterion, temps[k])
                           for k in range(logits.shape[0] - 1)])
    return Evaluator(scores, pred == labels[None], costs, pred == pred[-1:], by_plan)


def ratio(c: Any, costs: Costs, metric: str) -> float:
    deepest = costs.flops_alone[-1] if metric == "flops" else costs.latency_alone[-1]
    return c.cost(metric) / deepest


def resplits(pool: ValLogits, costs: Costs, args: argparse.Namespace) -> dict[str, Any]:
    n = len(pool.labels)
    half = n // 2
    out: dict[str, dict[str, list[float]]] = {m: {"drop": [], "flops": [], "latency": []}
                                               for m in METHODS}
    t0 = time.time()
    for r in range(args.resplits):
        perm = np.random.default_rng(1000 + r).permutation(n)
        cal_idx, held_idx = np.sort(perm[:half]), np.sort(perm[half:])
        part = ValLogits(pool.logits[:, cal_idx], pool.labels[cal_idx], "val", pool.dataset,
                         pool.path)
        held_logits, held_labels = pool.logits[:, held_idx], pool.labels[held_idx]
        deepest = float((held_logits[-1].argmax(1) == held_labels).mean())
        for name, kw in METHODS.items():
            kw = {k: (args.delta if v == "DELTA" else v) for k, v in kw.items()}
            cal = calibrate(part, costs, max_drop=args.max_drop, seed=r, **kw)
            c = held_out_evaluator(cal, held_logits, held_labels, costs)(cal.chosen.thresholds,
                                                                          "held out")
            out[name]["drop"].append(100 * (deepest - c.accuracy))
            out[name]["flops"].append(ratio(c, costs, "flops"))
            if costs.latency_alone:
                out[name]["latency"].append(ratio(c, costs, "latency"))
        if (r + 1) % 10 == 0:
            say(f"resplit {r + 1}/{args.resplits} ({time.time() - t0:.0f} s)")
    summary = {}
    for name, v in out.items():
        d = np.asarray(v["drop"])
        summary[name] = {
            "mean_drop_points": float(d.mean()), "worst_drop_points": float(d.max()),
            "exceed_fraction": float((d > args.max_drop).mean()),
            "mean_flops_ratio": float(np.mean(v["flops"])),
            "mean_latency_ratio": float(np.mean(v["latency"])) if v["latency"] else None,
            "drops": [round(x, 4) for x in d.tolist()],
        }
    return {"splits": args.resplits, "calibration_samples": half, "held_out_samples": n - half,
            "max_drop_points": args.max_drop, "delta": args.delta, "methods": summary}


def oracle(logits: np.ndarray, labels: np.ndarray, costs: Costs, metric: str) -> dict[str, float]:
    """Each sample at the first exit agreeing with the deepest one, every exit on."""
    pred = logits.argmax(axis=2)
    first = (pred == pred[-1:]).argmax(axis=0)
    per_exit = costs.plan_costs(tuple(range(1, logits.shape[0] + 1)), metric)
    cost = float(np.mean(np.asarray(per_exit)[first]))
    deepest = costs.flops_alone[-1] if metric == "flops" else costs.latency_alone[-1]
    return {"accuracy": float((pred[-1] == labels).mean()), "cost": cost,
            "ratio": cost / deepest}


def frontiers(val: ValLogits, test: ValLogits, costs: Costs,
              args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Calibration]]:
    metric = "latency" if costs.latency_alone else "flops"
    out: dict[str, Any] = {"metric": metric, "policies": {}}
    cals = {}
    for name, kw in POLICIES.items():
        cal = calibrate(val, costs, max_drop=args.max_drop, **kw)
        cals[name] = cal
        ev = held_out_evaluator(cal, test.logits, test.labels, costs)
        pts = [ev(c.thresholds, "test") for c in cal.frontier(metric)]
        out["policies"][name] = [{"cost": c.cost(metric), "ratio": ratio(c, costs, metric),
                                  "test_accuracy": c.accuracy} for c in pts]
    pred = test.logits.argmax(axis=2)
    out["exits_alone"] = [{"exit": k + 1, "test_accuracy": float((pred[k] == test.labels).mean()),
                           "cost": (costs.latency_alone or costs.flops_alone)[k]}
                          for k in range(test.num_exits)]
    out["oracle"] = oracle(test.logits, test.labels, costs, metric)
    return out, cals


def same_latency(val: ValLogits, test: ValLogits, costs: Costs, max_softmax: Calibration,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Gates given the max-softmax cascade's expected latency as their budget (or, where no
    gate candidate is that cheap, the cheapest one: the profile prices each plan as timed,
    so the same first step can cost a little more in one plan than in another)."""
    metric = "latency" if costs.latency_alone else "flops"
    budget = max_softmax.chosen.cost(metric)
    cheapest = min(c.cost(metric) for c in calibrate(val, costs, criterion=GATE,
                                                     max_drop=100).candidates
                   if not c.method.startswith("direct"))  # where a budgeted search starts
    budget = max(budget, cheapest)
    kw = {"latency_budget_ms": budget} if metric == "latency" else {"flops_budget": budget}
    gate = calibrate(val, costs, criterion=GATE, **kw)
    deepest = float((test.logits[-1].argmax(1) == test.labels).mean())
    res: dict[str, Any] = {"budget": budget, "metric": metric, "deepest_accuracy": deepest}
    for name, cal in (("max_softmax", max_softmax), ("gate", gate)):
        c = held_out_evaluator(cal, test.logits, test.labels, costs)(cal.chosen.thresholds, "t")
        res[name] = {"thresholds": list(cal.chosen.thresholds), "test_accuracy": c.accuracy,
                     "cost": c.cost(metric), "ratio": ratio(c, costs, metric)}
    gap = deepest - res["max_softmax"]["test_accuracy"]
    res["oracle_gap_points"] = 100 * gap
    res["gap_closed"] = ((res["gate"]["test_accuracy"] - res["max_softmax"]["test_accuracy"])
                         / gap if gap > 0 else None)
    res["gate_calibration"] = gate
    return res


def budget_grid(val: ValLogits, test: ValLogits, costs: Costs,
                oracle_cost: float) -> dict[str, Any]:
    """Every policy at a grid of expected-latency budgets (a share of the deepest exit's):
    each chooses on the validation logits the best thresholds within the budget, measured
    on the test logits. One budget's difference is within the test split's noise (a few
    tenths of a point); summed over the grid it is steadier. The share of the gap closed is
    over the budgets the oracle fits in, where it answers at the deepest exit's accuracy."""
    from byot_edge.errors import ByotError

    metric = "latency" if costs.latency_alone else "flops"
    deepest_cost = (costs.latency_alone or costs.flops_alone)[-1]
    deepest = float((test.logits[-1].argmax(1) == test.labels).mean())
    shares = [round(float(s), 2) for s in np.arange(0.40, 0.951, 0.05)]
    rows: dict[str, list[float | None]] = {name: [] for name in POLICIES}
    for share in shares:
        b = share * deepest_cost
        kw_b = {"latency_budget_ms": b} if metric == "latency" else {"flops_budget": b}
        for name, kw in POLICIES.items():
            try:
                cal = calibrate(val, costs, **kw, **kw_b)
            except ByotError:  # no plan is that cheap
                rows[name].append(None)
                continue
            c = held_out_evaluator(cal, test.logits, test.labels, costs)(cal.chosen.thresholds,
                                                                          "t")
            rows[name].append(c.accuracy)
    base = rows["max_softmax"]
    summary = {}
    for name, accs in rows.items():
        pairs = [(a, m, s) for a, m, s in zip(accs, base, shares, strict=True)
                 if a is not None and m is not None]
        fits = [(a, m) for a, m, s in pairs if s * deepest_cost >= oracle_cost]
        gap = sum(deepest - m for _, m in fits)
        summary[name] = {
            "mean_gain_points": 100 * float(np.mean([a - m for a, m, _ in pairs])),
            "wins": sum(a > m for a, m, _ in pairs), "losses": sum(a < m for a, m, _ in pairs),
            "budgets": len(pairs),
            "gap_closed": sum(a - m for a, m in fits) / gap if gap > 0 else None}
    return {"metric": metric, "budget_shares": shares, "deepest_accuracy": deepest,
            "oracle_cost_share": oracle_cost / deepest_cost, "test_accuracy": rows,
            "summary": summary}


def ensemble_answers(test: ValLogits) -> dict[str, list[float]]:
    """Test accuracy at each exit of its own answer and of the running mean of the softmax
    of exits 1..k (Zero Time Waste's ensemble): whether answering with the ensemble would
    pay on this model."""
    z = test.logits.astype(np.float64)
    p = np.exp(z - z.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    mean = np.cumsum(p, axis=0) / np.arange(1, len(p) + 1)[:, None, None]
    return {"exit_alone": [float((q.argmax(1) == test.labels).mean()) for q in p],
            "running_ensemble": [float((q.argmax(1) == test.labels).mean()) for q in mean]}


def policy_of(cal: Calibration, num_exits: int) -> Policy:
    if cal.gates is not None:
        return ExitGates.for_model(cal.gates, cal.chosen.thresholds, num_exits, cal.temperatures)
    return ConfidenceThresholds.for_model(cal.chosen.thresholds, num_exits, cal.criterion,
                                          cal.temperatures)


def runtime(args: argparse.Namespace, chosen: dict[str, Calibration]) -> dict[str, Any]:
    """The chosen cascades and the deepest exit through the runtime on the test images."""
    from byot_edge.calibrate.engine_logits import _batch_logits
    from byot_edge.datasets import load_arrays
    from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
    from byot_edge.runtime.preprocess import normalise

    model = AnytimeModel.load(args.manifest, backend=args.backend, threads=args.threads)
    k_max = model.num_exits
    data = load_arrays(args.dataset, args.data_dir, "test")
    x = normalise(data.images[:args.limit], model.manifest.input)
    y = data.labels[:len(x)]
    # The backend's own logits, one image at a time as the cascade runs them, to replay.
    logits = np.concatenate([_batch_logits(model.backend, x[i:i + 1]) for i in range(len(x))],
                            axis=1)
    modes: dict[str, Callable[[np.ndarray], Any]] = {
        "deepest exit": lambda b: model.run(b, PredictOptions(exit=k_max), probabilities=False)}
    policies = {name: policy_of(cal, k_max) for name, cal in chosen.items()}
    for name, pol in policies.items():
        modes[name] = lambda b, pol=pol: model.run_policy(b, pol, probabilities=False)
    model.warmup(1)
    for fn in modes.values():
        for i in range(20):
            fn(x[i:i + 1])
    wall: dict[str, list[float]] = {m: [] for m in modes}
    exits: dict[str, list[int]] = {m: [] for m in modes}
    preds: dict[str, list[int]] = {m: [] for m in modes}
    names = list(modes)
    for j, start in enumerate(range(0, len(x), args.block)):
        for m in names[j % len(names):] + names[:j % len(names)]:
            for i in range(start, min(start + args.block, len(x))):
                t0 = time.perf_counter()
                r = modes[m](x[i:i + 1])
                wall[m].append((time.perf_counter() - t0) * 1e3)
                exits[m] += r.exits
                preds[m] += r.indices
    deepest_ms = float(np.mean(wall["deepest exit"]))
    res: dict[str, Any] = {"device": model.backend.device, "samples": len(x),
                           "backend": model.backend.name, "threads": args.threads}
    for m in names:
        e, p = np.asarray(exits[m]), np.asarray(preds[m])
        row = {"accuracy": float((p == y).mean()), "mean_ms": float(np.mean(wall[m])),
               "ratio_to_deepest": float(np.mean(wall[m])) / deepest_ms,
               "exit_shares": [float((e == k).mean()) for k in range(1, k_max + 1)]}
        if m in policies:
            sim = simulate(logits, policies[m])
            row["replay_mismatches"] = {"exits": int((sim.exits != e).sum()),
                                        "predictions": int((sim.predictions != p).sum())}
        res[m] = row
    model.close()
    return res


def plot(front: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "ms" if front["metric"] == "latency" else "MFLOPs"
    scale = 1.0 if front["metric"] == "latency" else 1e-6
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, pts in front["policies"].items():
        pts = sorted(pts, key=lambda p: p["cost"])
        ax.plot([p["cost"] * scale for p in pts], [100 * p["test_accuracy"] for p in pts],
                "-", lw=1.4 if name == "gate" else 1.0, label=name)
    ex = front["exits_alone"]
    ax.plot([e["cost"] * scale for e in ex], [100 * e["test_accuracy"] for e in ex], "s--",
            color="0.4", label="each exit alone")
    o = front["oracle"]
    ax.plot(o["cost"] * scale, 100 * o["accuracy"], "*", ms=14, color="tab:red",
            label="oracle (first exit agreeing with the deepest)")
    ax.set_xlabel(f"expected {front['metric']} per sample ({unit}, as profiled)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True, help="a profiled deploy folder's")
    p.add_argument("--val-logits", type=Path, required=True)
    p.add_argument("--test-logits", type=Path, required=True)
    p.add_argument("--dataset", required=True, help="for the test images (part 3)")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON report")
    p.add_argument("--png", type=Path, help="the test frontiers as a PNG")
    p.add_argument("--resplits", type=int, default=100)
    p.add_argument("--max-drop", type=float, default=0.5)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="the profile's batch that prices plans")
    p.add_argument("--limit", type=int, default=None, help="test images through the runtime")
    p.add_argument("--block", type=int, default=100, help="images per turn in part 3")
    p.add_argument("--parts", default="resplits,frontiers,runtime")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    manifest = load_manifest(args.manifest)
    costs = manifest_costs(manifest, args.backend, batch=args.batch)
    val, test = load_logits(args.val_logits), load_logits(args.test_logits)
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update({"manifest": str(args.manifest), "latency_source": costs.latency_source,
                   "val_samples": len(val.labels), "test_samples": len(test.labels),
                   "test_exit_accuracy": [float((z.argmax(1) == test.labels).mean())
                                          for z in test.logits]})

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")

    if "resplits" in parts:
        pool = ValLogits(np.concatenate([val.logits, test.logits], axis=1),
                         np.concatenate([val.labels, test.labels]), "val+test", val.dataset,
                         args.val_logits)
        say(f"{args.resplits} resplits of {len(pool.labels)} pooled val+test samples")
        report["resplits"] = resplits(pool, costs, args)
        save()
        for name, s in report["resplits"]["methods"].items():
            say(f"{name:32s} mean drop {s['mean_drop_points']:+.2f}  worst "
                f"{s['worst_drop_points']:+.2f}  exceeds {100 * s['exceed_fraction']:.0f}% of "
                f"splits  flops {s['mean_flops_ratio']:.3f}x  latency "
                f"{s['mean_latency_ratio'] or float('nan'):.3f}x")
    if "frontiers" in parts or "runtime" in parts:
        front, cals = frontiers(val, test, costs, args)
        same = same_latency(val, test, costs, cals["max_softmax"], args)
        gate_same = same.pop("gate_calibration")
        report["frontiers"], report["same_latency"] = front, same
        report["ensemble_answers"] = ensemble_answers(test)
        save()
        report["budget_grid"] = grid = budget_grid(val, test, costs, front["oracle"]["cost"])
        save()
        for name, g in grid["summary"].items():
            say(f"budget grid {name:26s} mean gain {g['mean_gain_points']:+.2f} pts over "
                f"max_softmax ({g['wins']} wins, {g['losses']} losses of {g['budgets']}), gap "
                f"closed {g['gap_closed']}")
        if args.png:
            plot(front, args.png, f"{manifest.dataset} {manifest.model.get('arch')} x"
                                  f"{manifest.model.get('width')}: calibrated on validation, "
                                  "replayed on test")
        say(f"same expected {same['metric']}: max_softmax "
            f"{100 * same['max_softmax']['test_accuracy']:.2f}%, gate "
            f"{100 * same['gate']['test_accuracy']:.2f}%, deepest "
            f"{100 * same['deepest_accuracy']:.2f}%; gap closed {same['gap_closed']}")
        if "runtime" in parts:
            ltt = {name: calibrate(val, costs, max_drop=args.max_drop, delta=args.delta, **kw)
                   for name, kw in (("max_softmax LTT", {}), ("gate LTT", {"criterion": GATE}))}
            chosen = {"max_softmax point": cals["max_softmax"], **ltt,
                      "gate, same latency": gate_same}
            report["runtime"] = runtime(args, chosen)
            report["runtime_thresholds"] = {n: list(c.chosen.thresholds)
                                            for n, c in chosen.items()}
            save()
            for name, row in report["runtime"].items():
                if isinstance(row, dict):
                    say(f"{name:24s} {100 * row['accuracy']:.2f}%  {row['mean_ms']:.3f} ms "
                        f"({row['ratio_to_deepest']:.3f}x)  "
                        f"{row.get('replay_mismatches', '')}")
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
