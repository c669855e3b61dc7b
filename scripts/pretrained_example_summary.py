"""The JSON of scripts/pretrained_example.sh: per-exit test accuracy of each run.

Usage: python scripts/pretrained_example_summary.py WORK_DIR [OUT_JSON]
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

RUNS = {  # run folder -> what it is
    "ft_pretrained": "BYOT from the animals backbone, --recipe finetune",
    "scratch_quick": "BYOT from scratch, --recipe quick (lr 0.1 for every weight)",
    "scratch_finetune": "BYOT from scratch, --recipe finetune --backbone-lr 1",
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(work: Path) -> dict:
    runs = {}
    for name, what in RUNS.items():
        ev = json.loads((work / f"{name}_test.json").read_text())
        epochs = _lines(work / name / "metrics.jsonl")
        runs[name] = {
            "what": what,
            "test_top1": [r["top1"] for r in ev["exits"] if r["name"].startswith("exit ")],
            "test_ensemble": next(r["top1"] for r in ev["exits"] if r["name"] == "ensemble"),
            "test_images": ev["samples"],
            "epochs": len(epochs),
            "train_seconds": round(sum(e["seconds"] for e in epochs), 1),
        }
    pre = _lines(work / "pre_animals" / "metrics.jsonl")
    return {
        "what": "ResNet-18 x0.5 (CIFAR stem) trained plainly on CIFAR-10 (JPEG q75)'s six "
                "animal classes (27,000 images, 10 epochs), then BYOT on its four vehicle "
                "classes: 4,000 training images, 10 epochs, against the same from scratch",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "pretrain_val_top1_deepest": pre[-1]["val_accuracy"][-1],
        "pretrain_epochs": len(pre),
        "runs": runs,
    }


if __name__ == "__main__":
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/results/pretrained_start_cifar10.json")
    data = summary(Path(sys.argv[1]))
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1))
