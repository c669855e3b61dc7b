#!/usr/bin/env bash
# The GPU recipe, for a machine with a CUDA GPU: the paper's CIFAR schedule with ResNet-18 on
# CIFAR-10 (JPEG q75), then training throughput with and without AMP, channels-last and
# torch.compile. Prints the per-exit table and the throughput ratios; about 1-2 h on one
# modern GPU for the 250 epochs (set EPOCHS to shorten). Needs ../shared beside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-250}
OUT=${OUT:-runs/gpu-paper}
DATA=${DATA_DIR:-/tmp/cifar10}
[ -d "$DATA/cifar-10-batches-py" ] || python ../shared/data/cifar10-jpeg/unpack.py "$DATA" --format cifar
python benchmarks/train_throughput.py --device cuda --width 1 --batch 128 --steps 20 \
  --warmup 5 --variants all --json "$OUT-throughput.json"
byot-edge train --arch resnet18 --dataset cifar10 --data-dir "$DATA" --recipe paper \
  --epochs "$EPOCHS" --device cuda --amp auto --channels-last --out "$OUT"
byot-edge eval "$OUT/best.pt" --data-dir "$DATA" --device cuda --json "$OUT/test_eval.json"
