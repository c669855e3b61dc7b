"""The accuracy study's tables as they stand, from what `benchmarks/accuracy.py` runs wrote.

    python benchmarks/study_table.py runs/study-cpu/byot runs/study-cpu/dsn > table.md

Finished runs give test top-1 per exit and the ensemble (`partial.json`, written after each
run); runs still training give their last epoch's validation top-1 (`metrics.jsonl`, written
after each epoch), so a study stopped midway still has its table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cells(values: list[float]) -> str:
    return " | ".join(f"{100 * v:.2f}" for v in values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outs", nargs="+", type=Path, help="--out folders of accuracy.py")
    args = p.parse_args()
    tested, training = [], []
    for out in args.outs:
        partial = out / "partial.json"
        done = json.loads(partial.read_text())["runs"] if partial.is_file() else {}
        for method, runs in done.items():
            for r in runs:
                tested.append(f"| {method} | {r['seed']} | {_cells(r['top1'])} | "
                              f"{r['train_s'] / 60:.0f} |")
        for log in sorted(out.glob("*/metrics.jsonl")):
            lines = [json.loads(line) for line in log.read_text().splitlines() if line]
            if lines:
                last = lines[-1]
                minutes = sum(e["seconds"] for e in lines) / 60
                training.append(f"| {log.parent.name} | {last['epoch']} | "
                                f"{_cells([*last['val_accuracy'], last['val_ensemble']])} | "
                                f"{minutes:.0f} |")
    if tested:
        print("Test top-1 (%), finished runs:\n")
        print("| method | seed | exit 1 | exit 2 | exit 3 | exit 4 | ensemble | minutes |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(tested), end="\n\n")
    if training:
        print("Validation top-1 (%) at each run's last finished epoch:\n")
        print("| run | epoch | exit 1 | exit 2 | exit 3 | exit 4 | ensemble | minutes |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(training))


if __name__ == "__main__":
    main()
