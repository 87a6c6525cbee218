"""Build: setup.py drives CMake, CMake drives nvcc.

LLAMA3_KERNELS_CUDA=auto|0|1   auto (default) builds `llama3_kernels._C` when nvcc is found; 0 never; 1 must.
LLAMA3_KERNELS_ARCH=90a        the one real architecture to compile for (sm_90a: wgmma and TMA need the `a`).
MAX_JOBS=N                     parallel compile jobs (default: all cores).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_cutlass() -> Path:
    spec = importlib.util.find_spec("cutlass_library")  # headers ship in the nvidia-cutlass wheel
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("CUTLASS headers not found: pip install --no-deps nvidia-cutlass==4.2.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / "source"


class CMakeBuild(build_ext):
    def run(self) -> None:
        mode = os.environ.get("LLAMA3_KERNELS_CUDA", "auto").lower()
        if mode not in ("auto", "0", "1"):
            raise RuntimeError(f"LLAMA3_KERNELS_CUDA: expected auto, 0 or 1, got {mode!r}")
        self.nvcc = find_nvcc()
        if mode == "1" and self.nvcc is None:
            raise RuntimeError("LLAMA3_KERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if mode == "0" or self.nvcc is None:
            print("llama3_kernels: no CUDA build (nvcc not found or LLAMA3_KERNELS_CUDA=0); ops run their references")
            self.extensions = []
        super().run()

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # a fixed build folder, so a repeated `pip install -e .` rebuilds only what changed
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cutlass = find_cutlass()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DCUTLASS_INCLUDE_DIR={cutlass / 'include'}",
            f"-DCUTLASS_TOOLS_INCLUDE_DIR={cutlass / 'tools' / 'util' / 'include'}",
            f"-DL3K_CUDA_ARCH={os.environ.get('LLAMA3_KERNELS_ARCH', '90a')}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        start = time.time()
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)
        report = f"llama3_kernels: built _C in {time.time() - start:.0f} s with {jobs} jobs"
        (build_dir / "build_time.txt").write_text(report + "\n")  # pip -q hides this print; CI shows the file
        print(report)


setup(ext_modules=[Extension("llama3_kernels._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
