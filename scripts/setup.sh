#!/usr/bin/env bash
# Creates .venv (if missing) and installs byot-edge with what training, deployment, serving
# and the tests need. Idempotent.
# PyTorch comes from your pip configuration: the CUDA or CPU build your index serves.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch and torchvision first, together, so pip picks a matching pair.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "installing torch + torchvision (several GB for a CUDA build; a few minutes)..."
  .venv/bin/python -m pip install -q torch torchvision
fi
.venv/bin/python -m pip install -q -e ".[train,onnxruntime,serve,timm,dev]"
