// Shared between the gemm family's translation units (not bound): the decode GEMV that fp8_rowwise_mm
// dispatches to for a few tokens.
#pragma once
#include <cuda_runtime.h>

namespace l3k {

constexpr int kGemvMaxM = 4;  // fp8_rowwise_mm runs the GEMV for M <= this, the CUTLASS kernels above

struct GemvProblem {
  const void* xq;  // [M, K] e4m3, 16-byte aligned, K a multiple of 16
  const float* x_scale;
  const void* wq;  // [N, K] e4m3
  const float* w_scale;
  const float* bias;  // [N] fp32 or nullptr
  void* y;            // [M, N] bf16 or fp16
  int m, n, k;
  cudaStream_t stream;
};

// y = x_scale[m] · (w_scale[n] · Σ_k xq[m, k] wq[n, k]) (+ bias[n]); checked arguments as in fp8_rowwise_mm.
void fp8_rowwise_gemv(const GemvProblem& p, bool bf16_out);

}  // namespace l3k
