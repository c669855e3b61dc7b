"""The quickstart's figures in one small JSON, assembled from the files it wrote.

    python scripts/quickstart_summary.py runs/quickstart --seconds 440
    python scripts/quickstart_summary.py --tables docs/results/quickstart.json  # docs/results.md's

Reads RUN/test_eval.json (`byot-edge eval --json`), RUN/bench/bench.json (`byot-edge bench`)
and RUN/deploy/manifest.json (the calibrated thresholds and their guarantee), and writes
RUN/summary.json: the test split per exit, the thresholds, and the cascade against the
deepest exit as `bench` measured them and as the latency profile prices the exits it
answered at on the test split. Prints the quickstart's targets, each met or missed.
docs/results/quickstart.json is one run's summary; the README's figures are checked against
it (tests/test_readme_figures.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from byot_edge.calibrate.costs import manifest_costs
from byot_edge.manifest import load_manifest
from byot_edge.plans import Plan


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def summary(run: Path, seconds: int | None = None) -> dict[str, Any]:
    test = _load(run / "test_eval.json")
    bench = _load(run / "bench" / "bench.json")
    manifest = _load(run / "deploy" / "manifest.json")
    thresholds = manifest.get("thresholds") or {}
    accuracy = {(r["what"], r["batch"]): r for r in bench["accuracy"]}
    deepest = f"exit {len(manifest['exits'])}"
    cascade: dict[str, Any] = {}
    if ("cascade", 1) in accuracy and (deepest, 1) in accuracy:
        c, d = accuracy["cascade", 1], accuracy[deepest, 1]
        cascade = {"batch": 1, "accuracy": c["accuracy"], "ms_per_image": c["ms_per_image"],
                   "exit_share": c["exit_share"], "deepest_accuracy": d["accuracy"],
                   "deepest_ms_per_image": d["ms_per_image"],
                   "points_vs_deepest": 100 * (c["accuracy"] - d["accuracy"]),
                   "latency_ratio": c["ms_per_image"] / d["ms_per_image"],
                   **_profile_priced(run, c["exit_share"], thresholds.get("values"))}
    return {
        "what": "bash scripts/quickstart.sh: ResNet-18 x0.25, BYOT, 2 epochs on Fashion-MNIST",
        "created": bench.get("created"),
        "machine": bench.get("machine"),
        "seconds": seconds,
        "test": {"samples": test["samples"], "exits": test["exits"]},
        "thresholds": {"criterion": thresholds.get("criterion"),
                       "values": thresholds.get("values"),
                       "expected": thresholds.get("expected"),
                       "guarantee": thresholds.get("guarantee")},
        "cascade": cascade,
        "bench": {"accuracy": bench["accuracy"], "latency": bench["latency"]},
    }


def _profile_priced(run: Path, exit_share: list[float],
                    values: list[float] | None) -> dict[str, Any]:
    """The cascade's mean latency on the test split as the profile prices it (batch 1): the
    share answered at each exit, times what its plan's steps cost up to that exit, the
    measure calibration chooses by; against the deepest exit alone, priced the same way."""
    manifest = load_manifest(run / "deploy" / "manifest.json")
    costs = manifest_costs(manifest, "onnxruntime")
    if costs.latency_alone is None or values is None:
        return {}
    plan = Plan.from_thresholds(values, manifest.num_exits)
    per_exit = costs.plan_costs(plan, "latency")
    ms = sum(share * cost for share, cost in zip(exit_share, per_exit, strict=True))
    return {"profile_ms_per_image": ms, "profile_deepest_ms": costs.latency_alone[-1],
            "profile_latency_ratio": ms / costs.latency_alone[-1]}


def _above_the_exits(accuracy: list[dict[str, Any]], ms: float, acc: float) -> bool | None:
    """Whether (ms, acc) lies above the line joining the single exits (batch 1) at ms."""
    exits = sorted((r["ms_per_image"], r["accuracy"]) for r in accuracy
                   if r["batch"] == 1 and r["what"].startswith("exit"))
    for (m0, a0), (m1, a1) in itertools.pairwise(exits):
        if m0 <= ms <= m1:
            return acc > a0 + (a1 - a0) * (ms - m0) / (m1 - m0)
    return None  # outside the exits' range


def targets(s: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 26's targets for the quickstart's model on the test split: (what, measured,
    met)."""
    exits = [r for r in s["test"]["exits"] if r["name"].startswith("exit")]
    deepest, first = 100 * exits[-1]["top1"], 100 * exits[0]["top1"]
    c = s["cascade"]
    rows: list[tuple[str, str, bool | None]] = [
        ("deepest exit >= 90% top-1", f"{deepest:.2f}%", deepest >= 90),
        ("exit 1 >= 1 point below the deepest", f"{deepest - first:.2f} points",
         deepest - first >= 1)]
    if c:
        rows += [("cascade within 0.5 points of the deepest", f"{c['points_vs_deepest']:+.2f}",
                  c["points_vs_deepest"] >= -0.5)]
        if "profile_latency_ratio" in c:
            ratio = c["profile_latency_ratio"]
            rows.append(("cascade <= 0.6x the deepest's latency, profile-priced",
                         f"{ratio:.2f}x ({c['profile_ms_per_image']:.3f} / "
                         f"{c['profile_deepest_ms']:.3f} ms)", ratio <= 0.6))
        rows += [("  the same, as bench timed it", f"{c['latency_ratio']:.2f}x "
                  f"({c['ms_per_image']:.3f} / {c['deepest_ms_per_image']:.3f} ms)",
                  c["latency_ratio"] <= 0.6),
                 ("cascade above the line joining the exits", "bench, batch 1",
                  _above_the_exits(s["bench"]["accuracy"], c["ms_per_image"], c["accuracy"]))]
    return rows


def tables(s: dict[str, Any]) -> str:
    """docs/results.md's quickstart tables, from a summary."""
    lines = ["| exit | top-1 | top-5 | params | MFLOPs |", "| --- | --- | --- | --- | --- |"]
    for r in s["test"]["exits"]:
        lines.append(f"| {r['name'].removeprefix('exit ')} | {100 * r['top1']:.2f}% | "
                     f"{100 * r['top5']:.2f}% | {r['params']:,} | {r['flops'] / 1e6:.1f} |")
    lines += ["", "| batch | exit | p50 ms | p99 ms | img/s | GFLOP/s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in s["bench"]["latency"]:
        if r["artifact"].startswith("exit"):
            ms = ".3f" if r["batch"] == 1 else ".2f"
            lines.append(f"| {r['batch']} | {r['exit']} | {r['p50_ms']:{ms}} | {r['p99_ms']:{ms}} "
                         f"| {r['images_per_s']:,.0f} | {r['gflops_per_s']:.1f} |")
    lines += ["", "| batch | answered by | test top-1 | ms per image | answered at 1/2/3/4 (%) |",
              "| --- | --- | --- | --- | --- |"]
    for r in s["bench"]["accuracy"]:
        shares = " / ".join(f"{100 * x:.0f}" for x in r["exit_share"])
        lines.append(f"| {r['batch']} | {r['what']} | {100 * r['accuracy']:.2f}% | "
                     f"{r['ms_per_image']:.3f} | {shares} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the quickstart's folder (runs/quickstart)")
    p.add_argument("--seconds", type=int, default=None, help="how long the whole script took")
    p.add_argument("--out", type=Path, default=None, help="default RUN/summary.json")
    p.add_argument("--tables", action="store_true",
                   help="RUN is a summary.json: print its tables as markdown instead")
    args = p.parse_args()
    if args.tables:
        print(tables(_load(args.run)))
        return
    out = args.out or args.run / "summary.json"
    s = summary(args.run, args.seconds)
    out.write_text(json.dumps(s, indent=1) + "\n")
    print("the quickstart's targets on the test split:")
    for what, measured, met in targets(s):
        verdict = "-" if met is None else "met" if met else "MISSED"
        print(f"  {what:<56} {measured:<28} {verdict}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
