#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (CPU only; about 5 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Real data for the training tests: Debian's Fashion-MNIST where apt is usable; otherwise the
# tests fall back to the CIFAR-10 (JPEG q75) slice from ../shared.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "could not install dataset-fashion-mnist; tests use the CIFAR-10 slice"
fi
# TensorRT for RTX (about 100 MB) builds real engines on the CPU, so the export tests can
# check engine builds here; without it those tests skip with the reason.
.venv/bin/python -c "import tensorrt_rtx" >/dev/null 2>&1 \
  || .venv/bin/python -m pip install -q tensorrt-rtx \
  || echo "tensorrt-rtx could not be installed; TensorRT build tests will skip"
# A real tritonserver with the Python backend (nvidia-pytriton's wheel, about 100 MB) for the
# Triton tests. --no-deps: only its binary is used, and its Python package pins numpy<2,
# which would downgrade the venv's. Its Python backend reads numpy 2 arrays as empty, so
# the models get numpy 1 from a folder of their own. Without them those tests skip.
.venv/bin/python -c "import pytriton" >/dev/null 2>&1 \
  || .venv/bin/python -m pip install -q --no-deps nvidia-pytriton \
  || echo "nvidia-pytriton could not be installed; the Triton server tests will skip"
if .venv/bin/python -c "import numpy, sys; sys.exit(int(numpy.__version__[0]) < 2)" \
   && [ ! -d .venv/triton-stub-site/numpy ]; then
  .venv/bin/python -m pip install -q --target .venv/triton-stub-site 'numpy<2' \
    || echo "numpy<2 could not be installed for the Triton stub; the Triton server tests will skip"
fi
.venv/bin/ruff check byot_edge tests benchmarks
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # see byot_edge/__init__.py
exec .venv/bin/python -m pytest "$@"
