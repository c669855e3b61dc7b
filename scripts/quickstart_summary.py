"""The quickstart's figures in one small JSON, assembled from the files it wrote.

    python scripts/quickstart_summary.py runs/quickstart --seconds 440
    python scripts/quickstart_summary.py --tables docs/results/quickstart.json  # docs/results.md's

Reads RUN/test_eval.json (`byot-edge eval --json`), RUN/bench/bench.json (`byot-edge bench`)
and RUN/deploy/manifest.json (the calibrated thresholds and their guarantee), and writes
RUN/summary.json: the test split per exit, the thresholds, and the cascade against the
deepest exit as `bench` measured them. docs/results/quickstart.json is one run's summary;
the README's figures are checked against it (tests/test_readme_figures.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


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
                   "latency_ratio": c["ms_per_image"] / d["ms_per_image"]}
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
    out.write_text(json.dumps(summary(args.run, args.seconds), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
