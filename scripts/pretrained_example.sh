#!/usr/bin/env bash
# A pretrained start against a start from scratch, with weights this machine can make (no
# download): a ResNet-18 x0.5 trained plainly on CIFAR-10's six animal classes, then
# fine-tuned with BYOT on its four vehicle classes (4,000 training images, 10 epochs), against
# the same network trained from scratch on the same images for the same epochs. Writes
# docs/results/pretrained_start_cifar10.json (per-exit test accuracy on all 4,000 vehicle
# test images). About 40 minutes on 2 CPU cores, most of it the pretraining.
# Usage: bash scripts/pretrained_example.sh [WORK_DIR]   (default runs/pretrained_example)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/pretrained_example}
SHARED=${SHARED:-../shared}
B=.venv/bin/byot-edge
mkdir -p "$WORK"
if [ ! -d "$WORK/cifar10/train" ]; then
  .venv/bin/python "$SHARED/data/cifar10-jpeg/unpack.py" "$WORK/cifar10" --format imagefolder
fi
split() {  # split NAME CLASS...: an ImageFolder of some classes, by links
  local name=$1; shift
  for part in train test; do
    mkdir -p "$WORK/$name/$part"
    for c in "$@"; do
      ln -sfn "$(realpath "$WORK/cifar10/$part/$c")" "$WORK/$name/$part/$c"
    done
  done
}
split animals bird cat deer dog frog horse
split vehicles airplane automobile ship truck
DATA="--dataset imagefolder --image-size 32 --arch resnet18 --width 0.5"
[ -f "$WORK/pre_animals/best.pt" ] || $B train $DATA --data-dir "$WORK/animals" \
  --method plain --epochs 10 --lr 0.1 --out "$WORK/pre_animals"
FT="$DATA --data-dir $WORK/vehicles --max-train-samples 4000 --epochs 10"
run() {  # run NAME OPTIONS...: train on the vehicles, then evaluate on their test split
  local name=$1; shift
  [ -f "$WORK/$name/best.pt" ] || $B train $FT "$@" --out "$WORK/$name"
  $B eval "$WORK/$name/best.pt" --data-dir "$WORK/vehicles" --json "$WORK/${name}_test.json"
}
run ft_pretrained --recipe finetune --pretrained "$WORK/pre_animals/best.pt"
run scratch_quick --recipe quick
run scratch_finetune --recipe finetune --backbone-lr 1
.venv/bin/python scripts/pretrained_example_summary.py "$WORK"
