"""docs/results.md's tables of `benchmarks/policies.py` reports, printed from their JSON (so the
figures quoted are the measured ones, not typed by hand).

    python benchmarks/policies_table.py docs/results/policies_cifar10.json \\
        docs/results/policies_fashion_mnist.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def resplit_rows(name: str, r: dict[str, Any]) -> list[str]:
    out = []
    for method, s in r["methods"].items():
        lat = s["mean_latency_ratio"]
        out.append(f"| {name} | {method} | {s['mean_drop_points']:+.2f} | "
                   f"{s['worst_drop_points']:+.2f} | **{100 * s['exceed_fraction']:.0f}%** | "
                   f"{s['mean_flops_ratio']:.2f}x | "
                   f"{'-' if lat is None else f'{lat:.2f}x'} |")
    return out


def grid_rows(name: str, g: dict[str, Any]) -> list[str]:
    out = []
    for policy, s in g["summary"].items():
        if policy == "max_softmax":
            continue
        closed = s["gap_closed"]
        out.append(f"| {name} | {policy} | {s['mean_gain_points']:+.2f} | {s['wins']} / "
                   f"{s['losses']} of {s['budgets']} | "
                   f"{'-' if closed is None else f'{100 * closed:.0f}%'} |")
    return out


def runtime_rows(name: str, r: dict[str, Any]) -> list[str]:
    out = []
    for mode, row in r.items():
        if not isinstance(row, dict):
            continue
        mm = row.get("replay_mismatches")
        shares = " / ".join(f"{100 * s:.0f}" for s in row["exit_shares"])
        mismatches = "-" if mm is None else f"{mm['exits']} / {mm['predictions']}"
        out.append(f"| {name} | {mode} | {100 * row['accuracy']:.2f}% | {row['mean_ms']:.3f} | "
                   f"{row['ratio_to_deepest']:.2f}x | {shares} | "
                   f"{mismatches} |")
    return out


def main() -> None:
    reports = [(json.loads(Path(p).read_text()), p) for p in sys.argv[1:]]

    def name(rep: dict[str, Any], path: str) -> str:
        return Path(path).stem.removeprefix("policies_")

    print("| model | method | mean drop (pts) | worst | splits over target | FLOPs | latency |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rep, p in reports:
        print("\n".join(resplit_rows(name(rep, p), rep["resplits"])))
    print()
    print("| model | policy | mean gain over max softmax (pts) | wins / losses | oracle gap "
          "closed |")
    print("| --- | --- | --- | --- | --- |")
    for rep, p in reports:
        print("\n".join(grid_rows(name(rep, p), rep["budget_grid"])))
    print()
    print("| model | cascade | test top-1 | mean ms | vs deepest | answered at 1/2/3/4 (%) | "
          "replay mismatches (exits / answers) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rep, p in reports:
        print("\n".join(runtime_rows(name(rep, p), rep["runtime"])))


if __name__ == "__main__":
    main()
