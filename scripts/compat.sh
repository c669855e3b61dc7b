#!/usr/bin/env bash
# The compatibility job (CI runs it after the main suite): what pyproject.toml declares must
# work at the floor of every range, on the oldest Python it admits.
#
# 1. Deployment side: Python 3.10 (JetPack 6's), every core, [onnxruntime], [serve] and
#    [plot] dependency pinned at its declared floor (numpy 1.x), no torch; the tests run
#    there, and the ones that need torch skip (tests/conftest.py). The server tests' model is
#    exported beforehand by the main venv (scripts/compat_deployed.py).
# 2. Training side: the main venv's torch beside the numpy floor (1.x), on its own Python;
#    the data, training, int8 export, engine calibration and bench tests (not the slow ones).
#
# Needs the main .venv (scripts/setup.sh). Without a Python 3.10 (pyenv's, python3.10 on
# PATH, or $COMPAT_PYTHON) part 1 is skipped with a message. Venvs go to $BYOT_COMPAT_DIR
# (default: $TMPDIR/byot-compat) and are reused while the floors stay the same.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DIR=${BYOT_COMPAT_DIR:-${TMPDIR:-/tmp}/byot-compat}
mkdir -p "$DIR"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # see byot_edge/__init__.py
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The floors, read from pyproject.toml: name==lowest for each "name>=lowest" we declare.
.venv/bin/python - "$DIR/floors.txt" <<'EOF'
import re
import sys

try:
    import tomllib
except ImportError:  # Python 3.10: the [dev] extra brings tomli
    import tomli as tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
deploy = project["dependencies"] + extras["onnxruntime"] + extras["serve"] + extras["plot"]
floors = {}
for req in deploy:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?>=([0-9][^,;\s]*)\s*(;.*)?", req.strip())
    if not m:
        sys.exit(f"compat: cannot read a floor from {req!r} in pyproject.toml")
    floors[m.group(1).lower()] = f"{m.group(1)}{m.group(2) or ''}=={m.group(3)}{m.group(4) or ''}"
with open(sys.argv[1], "w") as f:
    f.write("".join(f"{line}\n" for line in sorted(floors.values())))
EOF

find_python310() {
  if [ -n "${COMPAT_PYTHON:-}" ]; then echo "$COMPAT_PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    for p in "$(pyenv root)"/versions/3.10*/bin/python3.10; do
      [ -x "$p" ] && { echo "$p"; return; }
    done
  fi
  command -v python3.10 2>/dev/null || true
}

# pip, quiet unless it fails (then its last lines, without the local index's warnings)
pipq() {
  "$@" > "$DIR/pip.log" 2>&1 || { grep -v "^WARNING: Location" "$DIR/pip.log" | tail -20; return 1; }
}

status=0
PY310=$(find_python310)
if [ -z "$PY310" ]; then
  echo "compat: SKIPPED the Python 3.10 job: no Python 3.10 here (install one with pyenv, or" \
       "set COMPAT_PYTHON=/path/to/python3.10)"
else
  VENV=$DIR/py310
  # A new floor (or a new Python) makes a new venv: nothing newer is ever left in it.
  stamp="$("$PY310" -V 2>&1) $(cat "$DIR/floors.txt")"
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/floors.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$VENV"
    "$PY310" -m venv "$VENV"
    # Binary wheels only: a floor with no wheel for this Python is a floor to raise.
    pipq "$VENV/bin/python" -m pip install --only-binary=:all: -r "$DIR/floors.txt" \
      'pytest>=8' 'hypothesis>=6' 'tomli>=2'
    pipq "$VENV/bin/python" -m pip check
    echo "$stamp" > "$VENV/floors.stamp"
  fi
  # The package itself, from this checkout, with nothing else.
  pipq "$VENV/bin/python" -m pip install --no-deps -e .
  echo "compat: $("$VENV/bin/python" -V) with $(tr '\n' ' ' < "$DIR/floors.txt")"
  .venv/bin/python scripts/compat_deployed.py "$DIR/deployed"
  # Every test module: those that need torch skip (tests/conftest.py); the GPU study is a
  # training benchmark run as a script, left to the main suite.
  BYOT_COMPAT_DEPLOYED=$DIR/deployed PYTHONPATH=$REPO/scripts \
    "$VENV/bin/python" -m pytest -p compat_deployed -p no:cacheprovider "$@" tests \
    --ignore tests/test_gpu_study.py || status=1
fi

# Training side: numpy's floor beside the main venv's torch (no second copy of torch: its
# packages are reached through a .pth, after this venv's own numpy, and matplotlib's floor,
# since the main venv's needs a newer numpy).
VENV=$DIR/train-numpy1
FLOORS=$(grep -iE '^(numpy|matplotlib)==' "$DIR/floors.txt" | tr '\n' ' ')
# and the [timm] extra's floor, without its dependencies (torch and the rest come from the
# main venv through the .pth below)
TIMM_FLOOR=$(.venv/bin/python -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['timm'][0].replace('>=', '=='))")
OWN="$FLOORS $TIMM_FLOOR"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/floors.stamp" 2>/dev/null)" != "$OWN" ]; then
  rm -rf "$VENV"
  .venv/bin/python -m venv "$VENV"
  # shellcheck disable=SC2086  # one word per requirement
  pipq "$VENV/bin/python" -m pip install --only-binary=:all: $FLOORS
  pipq "$VENV/bin/python" -m pip install --only-binary=:all: --no-deps "$TIMM_FLOOR"
  echo "$OWN" > "$VENV/floors.stamp"
fi
# Every run: the cached venv may have been made beside another checkout's main venv.
MAIN_SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
OWN_SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
echo "import site; site.addsitedir('$MAIN_SITE')" > "$OWN_SITE/zz_main_venv.pth"
echo "compat: training side with $("$VENV/bin/python" -c \
  'import numpy, torch, timm, sys; print(f"Python {sys.version.split()[0]}, numpy {numpy.__version__}, torch {torch.__version__}, timm {timm.__version__}")')"
"$VENV/bin/python" -m pytest -p no:cacheprovider -m "not slow" "$@" \
  tests/test_data.py tests/test_train.py tests/test_losses.py tests/test_export_int8.py \
  tests/test_calibrate_engine.py tests/test_bench.py tests/test_library_backbones.py \
  tests/test_pretrained.py || status=1
exit $status
