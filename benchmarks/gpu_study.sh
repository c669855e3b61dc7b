#!/usr/bin/env bash
# The GPU study, prepared for one lent H200 (about 8 minutes, one command): training
# throughput (fp32, bf16 autocast, + channels-last, + torch.compile; TFLOP/s against the bf16
# peak; byot/plain step time), byot vs plain vs dsn on CIFAR-10 (JPEG q75) per exit, and the
# torch runtime on CUDA per exit and as the calibrated cascade at batch 1 and 32. The work is
# done by benchmarks/gpu_study.py; results land in $OUT: summary.md, throughput.json,
# accuracy.json, runtime.json, calibration.png, study.log (each JSON written as its part ends).
#
#   bash benchmarks/gpu_study.sh prepare  # HERE, once: data/gpu_study/ <- data, unpack.py, wheels
#   bash benchmarks/gpu_study.sh          # THERE, with carry ["data/gpu_study"] (55 MiB)
#   TINY=1 OUT=/tmp/s bash benchmarks/gpu_study.sh   # CPU smoke test (tests/test_gpu_study.py)
#   TINY=1 DATASET=cifar10 bash benchmarks/gpu_study.sh   # the same on the staged real data
#
# The device machine gets only the checkout and carried paths (no ../shared, no internet) and
# runs it uninstalled: PYTHONPATH=. and its own python3, which lacks jsonschema (wheels below).
# Settings (environment): OUT (default runs/gpu_study), WORK (checkpoints, exports, unpacked
# data; default runs/gpu_study_work), EPOCHS (15, an upper bound), SEEDS ("0"; "0 1" for two),
# RECIPE (quick), BATCH (the recipe's 128), TIME_BUDGET_S (480 for the whole script: epochs
# are scaled down to fit it; 0 keeps EPOCHS), COMPILE (1), EXPORTER (auto), DEVICE (cuda),
# DATASET (cifar10; synthetic in TINY mode), PARTS (throughput,accuracy,runtime: a rerun of
# one part reuses WORK's checkpoints), PYTHON (python3: the device's, with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s.%N)
STAGE=data/gpu_study
SHARED=../shared/data/cifar10-jpeg
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

if [ "${1:-}" = prepare ]; then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  mkdir -p "$STAGE/wheels"
  install -m 644 "$SHARED/cifar10_jpegq75_bytes.npz" "$SHARED/unpack.py" "$STAGE/"
  # jsonschema and the dependencies the device's image lacks (attrs and typing-extensions
  # come along in case). Its python3 is 3.12 (3.11 and 3.13 too, to be safe: only rpds-py is
  # compiled); the install there picks the wheel that fits.
  for v in 3.11 3.12 3.13; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$STAGE/wheels" jsonschema jsonschema-specifications referencing rpds-py attrs \
      typing-extensions 2> >(grep -v "neither a file nor a directory" >&2)
  done
  (cd "$STAGE" && sha256sum cifar10_jpegq75_bytes.npz unpack.py > SHA256SUMS)
  ls -l "$STAGE" "$STAGE/wheels"
  du -sh "$STAGE"
  exit 0
fi

OUT=${OUT:-runs/gpu_study}
WORK=${WORK:-runs/gpu_study_work}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # see byot_edge/__init__.py
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

# jsonschema (the manifest is validated with it) from the staged wheels, where it is missing
if ! "$PY" -c "import jsonschema" 2>/dev/null; then
  SITE=${TMPDIR:-/tmp}/gpu_study_site
  PKGS="jsonschema jsonschema-specifications referencing rpds-py attrs"
  "$PY" -c "import typing_extensions" 2>/dev/null || PKGS="$PKGS typing-extensions"
  stamp "installing $PKGS from $STAGE/wheels into $SITE"
  # shellcheck disable=SC2086  # PKGS is a list of names
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --find-links "$STAGE/wheels" --target "$SITE" $PKGS
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

# CIFAR-10 (JPEG q75), unpacked from the staged copy into WORK (not into the carried folder)
DATASET=${DATASET:-$([ "${TINY:-0}" = 1 ] && echo synthetic || echo cifar10)}
DATA_ARGS=(--dataset "$DATASET")
if [ "$DATASET" = cifar10 ]; then
  DATA=$WORK/cifar10
  if [ ! -f "$DATA/cifar-10-batches-py/test_batch" ]; then
    [ -f "$STAGE/unpack.py" ] || { echo "no $STAGE/unpack.py: run 'bash $0 prepare' first" >&2; exit 2; }
    (cd "$STAGE" && sha256sum -c --quiet SHA256SUMS)
    stamp "unpacking CIFAR-10 (JPEG q75) into $DATA"
    "$PY" "$STAGE/unpack.py" "$DATA" --format cifar
  fi
  DATA_ARGS+=(--data-dir "$DATA")
fi

if [ "${TINY:-0}" = 1 ]; then
  # CPU smoke test: synthetic data (DATASET=cifar10 takes the staged data), a 1/16-wide
  # ResNet-18, one epoch of 2 steps, a few timed calls; bf16 autocast works on a CPU,
  # torch.compile is left out (minutes of CPU compile). One thread: CI runners are small.
  export OMP_NUM_THREADS=1
  ARGS=(--tiny --device cpu --threads 1 --width 0.0625
        --epochs "${EPOCHS:-1}" --batch-size 32 --max-train-samples 64
        --time-budget-s "${TIME_BUDGET_S:-300}" --runtime-reserve-s 30
        --tp-width 0.0625 --tp-size 16 --tp-batch 4 --tp-steps 1 --tp-warmup 1 --tp-rounds 1
        --tp-amp bf16 --no-compile --exporter "${EXPORTER:-torchscript}"
        --rt-images 256 --rt-calls-b1 3 --rt-calls-b32 2 --rt-rounds 1)
else
  # recipe quick (cosine with warm-up) for all three methods: at 15 epochs the paper's
  # multistep schedule would put two of its three lr drops on the same epoch (1/3, 2/3 and
  # epochs-10 = 5, 10, 10)
  ARGS=(--device "${DEVICE:-cuda}" --recipe "${RECIPE:-quick}" --epochs "${EPOCHS:-15}"
        --seeds ${SEEDS:-0} --time-budget-s "${TIME_BUDGET_S:-480}"
        --exporter "${EXPORTER:-auto}")
  [ -n "${BATCH:-}" ] && ARGS+=(--batch-size "$BATCH")
  [ "${COMPILE:-1}" = 1 ] || ARGS+=(--no-compile)
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
stamp "$("$PY" --version) at $(command -v "$PY"); out $OUT, work $WORK"
# pipefail (above): the study's exit status, not tee's, is the script's
"$PY" benchmarks/gpu_study.py --out "$OUT" --work "$WORK" --t0 "$T0" \
  --parts "${PARTS:-throughput,accuracy,runtime}" "${DATA_ARGS[@]}" "${ARGS[@]}" 2>&1 \
  | tee "$OUT/study.log"
