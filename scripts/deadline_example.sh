#!/usr/bin/env bash
# The model and the run behind docs/results.md, "Serving under load": a ResNet-18 x0.75 on
# 20,000 Fashion-MNIST training images (2 epochs of the quick recipe), wide enough that the
# model, not HTTP, is most of a request's cost; exported with its segments, profiled,
# calibrated on the held-out split, then benchmarks/deadline_load.py (three servers at
# 0.5-3x the deepest exit's capacity, and the drift run). About 25 minutes on 2 CPU cores,
# most of it training; the server is pinned to CPU 0 and the client to CPU 1.
# Usage: bash scripts/deadline_example.sh [WORK_DIR]   (default runs/lm)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/lm}
DATA=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
B=.venv/bin/byot-edge
[ -f "$RUN/best.pt" ] || $B train --dataset fashion-mnist --data-dir "$DATA" --arch resnet18 \
  --width 0.75 --recipe quick --epochs 2 --lr 0.2 --val-split 0.1 \
  --max-train-samples 20000 --out "$RUN"
$B eval "$RUN/best.pt" --data-dir "$DATA" --split test --json "$RUN/test_eval.json"
$B eval "$RUN/best.pt" --data-dir "$DATA" --split val --save-logits "$RUN/val_logits.npz"
$B export "$RUN/best.pt" --out "$RUN/deploy" --segments --data-dir "$DATA"
$B profile "$RUN/deploy/manifest.json" --backend onnxruntime --batch 1,32 --threads 1
# Every exit lies within a point of the deepest, so a bound on the drop certifies either the
# deepest exit alone or exit 1 alone; a bound on disagreement with the deepest exit keeps a
# cascade (docs/results.md says which bounds were tried).
$B calibrate "$RUN/deploy/manifest.json" --logits "$RUN/val_logits.npz" --max-drop 3 \
  --risk disagreement --delta 0.1
.venv/bin/python benchmarks/deadline_load.py --manifest "$RUN/deploy/manifest.json" \
  --data-dir "$DATA" --out "$RUN/load" "${@:2}"
