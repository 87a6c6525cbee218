// pybind11 bindings of every launcher: one def each, nothing else. Pointers and streams travel as ints.
#include <pybind11/pybind11.h>

#include "common.h"
#include "norm/norm.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "llama3_kernels compiled kernels (raw-pointer launchers; use the ops in llama3_kernels.ops)";
  m.def("build_info", [] {
    py::dict d;
    d["arch"] = L3K_CUDA_ARCH;
    d["cuda"] = L3K_CUDA_VERSION;
    d["compiler"] = __VERSION__;
    return d;
  });

  // ---- norm family: csrc/norm/ -------------------------------------------------------------------
  // ---- end norm family ---------------------------------------------------------------------------

  // ---- gemm family: csrc/gemm/ -------------------------------------------------------------------
  // ---- end gemm family ---------------------------------------------------------------------------

  // ---- attention family: csrc/attention/ ---------------------------------------------------------
  // ---- end attention family ----------------------------------------------------------------------
}
