# The README's two commands: `make run` (set up + the main job) and `make test` (set up + the tests).
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup run test lint device-check

# torch: the CPU build 2.13.0 where none is installed; never replace an installed (CUDA) build.
# The CUDA extension builds when nvcc is found (LLAMA3_KERNELS_CUDA=auto|0|1), for sm_90a.
setup:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	command -v cmake >/dev/null || $(PIP) "cmake>=3.24"
	$(PIP) setuptools wheel pybind11 ninja
	$(PIP) --no-deps nvidia-cutlass==4.2.0.0
	$(PIP) --no-build-isolation -e ".[dev,model]"

run: setup
	$(PY) -m llama3_kernels.cli demo

test: setup
	$(PY) -m pytest -q tests

lint:
	ruff check . && ruff format --check .

# On an H100 box (see bench/device_check.sh): build with all cores, GPU tests, compute-sanitizer, benches.
device-check:
	bash bench/device_check.sh
