#!/usr/bin/env bash
# The training side at the floor of the declared torch range (pyproject's [train] extra:
# torch and torchvision), on this machine's default Python: the model, loss, training,
# export, int8, calibration and CLI tests (not the slow ones).
#
# Not part of CI: PyPI's torch 2.4 is a CUDA build of about 3 GB with its NVIDIA libraries,
# too much to download on every run. Run it by hand when the range or the export code
# changes; the venv goes to $BYOT_COMPAT_DIR (default: $TMPDIR/byot-compat) and is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${BYOT_COMPAT_DIR:-${TMPDIR:-/tmp}/byot-compat}
VENV=$DIR/train-torch-floor
TORCH=$(grep -oE '"torch>=[0-9.]+"' pyproject.toml | grep -oE '[0-9.]+[0-9]')
VISION=$(grep -oE '"torchvision>=[0-9.]+"' pyproject.toml | grep -oE '[0-9.]+[0-9]')
PINS="torch==$TORCH.* torchvision==$VISION.*"
mkdir -p "$DIR"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/floors.stamp" 2>/dev/null)" != "$PINS" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086  # one word per requirement
  "$VENV/bin/python" -m pip install -q $PINS
  "$VENV/bin/python" -m pip install -q -e ".[train,onnxruntime,serve,dev]"
  echo "$PINS" > "$VENV/floors.stamp"
fi
echo "compat: training side with $("$VENV/bin/python" -c \
  'import torch, torchvision, sys; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}")')"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -p no:cacheprovider \
  -m "not slow" "$@" tests/test_models.py tests/test_losses.py tests/test_train.py \
  tests/test_export_onnx.py tests/test_export_manifest.py tests/test_data.py \
  tests/test_export_int8.py tests/test_calibrate_engine.py tests/test_runtime.py \
  tests/test_bench.py tests/test_cli.py tests/test_calibrate.py tests/test_cli_bad_inputs.py \
  tests/test_gates.py tests/test_policies.py tests/test_risk_control.py
