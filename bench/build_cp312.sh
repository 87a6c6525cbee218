#!/usr/bin/env bash
# Build llama3_kernels._C here for the device box's Python 3.12, so the device check skips its ~100 s build:
#   bash bench/build_cp312.sh     (needs a Python 3.12 with headers: $PY312, else pyenv's 3.12)
# then run(command='L3K_PREBUILT=1 bash bench/device_check.sh "$OUT"',
#          carry=[".whl", "python/llama3_kernels/_C.cpython-312-x86_64-linux-gnu.so"], ...).
# The extension has no torch dependency (pybind11 + static cudart), so a build against any 3.12 loads there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-$(ls -d /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -n 1)}
[[ -x $PY312 ]] || { echo "no Python 3.12 found: set PY312"; exit 2; }
VENV=${VENV312:-/tmp/l3k-build-py312}
if [[ ! -x $VENV/bin/python ]]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q pybind11 setuptools wheel cmake ninja
  "$VENV/bin/pip" install -q --no-deps nvidia-cutlass==4.2.0.0
fi
LLAMA3_KERNELS_CUDA=1 "$VENV/bin/python" setup.py build_ext --inplace
ls -la python/llama3_kernels/_C.cpython-312-*.so
