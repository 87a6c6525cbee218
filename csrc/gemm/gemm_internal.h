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

// The GEMVs' epilogue (fp8_gemv.cu, decode_gemv.cu): every lane holds partial sums acc[m][r] of M tokens times R
// weight rows; sums them over the warp and returns to lane m·R + r (< M·R) the total of acc[m][r]. Only constant
// indices touch acc, so it stays in registers.
template <int M, int R>
__device__ __forceinline__ float warp_sum_for_lane(float (&acc)[M][R], int lane) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], off);
  float sum = 0.f;
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (lane == m * R + r) sum = acc[m][r];
  return sum;
}

}  // namespace l3k
