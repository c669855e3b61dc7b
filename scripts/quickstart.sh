#!/usr/bin/env bash
# The main job, end to end on a real dataset with no internet: Fashion-MNIST from Debian's
# package (or torchvision's download on a machine that is online). Trains a small BYOT
# ResNet-18 on the CPU on all 54,000 training images (about 5 minutes on 2 idle cores),
# evaluates every exit, exports every exit and the cascade segments to ONNX, times them
# (`profile`), calibrates early-exit thresholds on the held-out split priced by those
# timings (with Learn-then-Test's guarantee), benches on all 10,000 test images, and
# answers a few images through the anytime runtime. Leaves runs/quickstart/ ready for every
# example in the README's "Using it".
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step says how long it took (docs/results.md quotes these times).
step() { local start=$SECONDS; "$@"; echo "== ${2#*/} done in $((SECONDS - start)) s"; }
step bash scripts/setup.sh
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
step byot-edge train --dataset fashion-mnist --data-dir "$DATA" "${DOWNLOAD[@]}" \
  --arch resnet18 --width 0.25 --recipe quick --epochs 2 --lr 0.2 \
  --val-split 0.1 --out "$RUN"
step byot-edge eval "$RUN/best.pt" --data-dir "$DATA" --split test --json "$RUN/test_eval.json"
step byot-edge eval "$RUN/best.pt" --data-dir "$DATA" --split val --save-logits "$RUN/val_logits.npz"

# Deploy: every exit and the cascade segments as ONNX, checked against PyTorch on real images.
step byot-edge export "$RUN/best.pt" --out "$RUN/deploy" --segments --data-dir "$DATA"
# What every exit, segment and cascade plan costs on this machine (quick), so that budgets
# work and calibration prices each plan as measured rather than by FLOPs.
step byot-edge profile "$RUN/deploy/manifest.json" --backend onnxruntime --batch 1
# Early-exit thresholds from the held-out validation logits (never the test set). The margin
# criterion (top-1 minus top-2 probability): on this model's validation split it gave the
# cheapest cascade of the criteria at the same guarantee (0.30 ms expected against max
# softmax's 0.37 ms; docs/results.md, "The quickstart").
step byot-edge calibrate "$RUN/deploy/manifest.json" --logits "$RUN/val_logits.npz" --max-drop 0.5 \
  --criterion margin \
  --plot "$RUN/calibration.png"
# What each exit costs here, and the cascade's accuracy on the test split (a short run).
step byot-edge bench "$RUN/deploy/manifest.json" --backend onnxruntime --batch 1,32 --data-dir "$DATA" \
  --limit 10000 --runs 50 --max-seconds 0.3 --out "$RUN/bench"
# A few test images as PNG files, answered by the anytime model.
python - "$DATA" "$RUN/images" <<'PY'
import re
import sys
from pathlib import Path
from PIL import Image
from byot_edge.datasets import load_arrays
test = load_arrays("fashion-mnist", sys.argv[1], "test")
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
for i in range(6):
    name = re.sub(r"[^a-z0-9]+", "-", test.class_names[test.labels[i]].lower())
    Image.fromarray(test.images[i, 0]).save(out / f"test{i}_{name}.png")
PY
step byot-edge predict "$RUN/deploy/manifest.json" "$RUN"/images/*.png
# The figures above in one small JSON (the README's come from one run's: docs/results/quickstart.json).
python scripts/quickstart_summary.py "$RUN" --seconds "$SECONDS"
echo "done in $SECONDS s: checkpoints, deploy/ (ONNX + manifest), bench/, plots and summary.json are in $RUN"
echo "next: source .venv/bin/activate && cd $RUN   # then try the README's \"Using it\" examples"
