#!/usr/bin/env bash
# Fetch the wheels the device check installs offline (the H100 box has no network) into .whl/ (git-ignored).
#   bash bench/fetch_wheels.sh            then carry .whl with the device run
# nvidia-cutlass provides the CUTLASS headers the build needs; liger-kernel is a bench peer (pure Python,
# its triton and torch come with the image). Pinned so runs compare like with like.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl nvidia-cutlass==4.2.0.0 liger-kernel==0.8.5
ls -la .whl
