#!/usr/bin/env bash
# The main job, end to end on a real dataset with no internet: Fashion-MNIST from Debian's
# package (or torchvision's download on a machine that is online). Trains a small BYOT
# ResNet-18 on the CPU for about a minute, evaluates every exit, exports every exit and the
# cascade segments to ONNX, calibrates early-exit thresholds on the held-out split, and
# answers a few images through the anytime runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

DATA=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
RUN=${RUN_DIR:-runs/quickstart}
DOWNLOAD=()
if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA/train-images-idx3-ubyte" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Fashion-MNIST from Debian's dataset-fashion-mnist package..."
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST is not in $DATA: downloading it with torchvision into data/fashion-mnist"
    echo "(offline? install Debian's dataset-fashion-mnist, or set DATA_DIR to a folder with the idx files)"
    DATA=data/fashion-mnist
    DOWNLOAD=(--download)
  fi
fi

rm -rf "$RUN"
byot-edge train --dataset fashion-mnist --data-dir "$DATA" "${DOWNLOAD[@]}" \
  --arch resnet18 --width 0.25 --recipe quick --epochs 2 --max-train-samples 12000 \
  --val-split 0.1 --out "$RUN"
byot-edge eval "$RUN/best.pt" --data-dir "$DATA" --split test --json "$RUN/test_eval.json"
byot-edge eval "$RUN/best.pt" --data-dir "$DATA" --split val --save-logits "$RUN/val_logits.npz"
