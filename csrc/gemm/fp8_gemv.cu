// FP8 row-wise GEMV for decode (M <= 4 tokens): y[m, n] = x_scale[m] · (w_scale[n] · Σ_k xq[m, k] · wq[n, k]) (+ bias).
//
// Why not the CUTLASS kernel: its narrowest tile covers 64 weight rows, so a weight with N = 2048 rows (Llama 3.2-1B's
// dim) feeds 32 CTAs on a 132-SM GPU and N = 4096 (8B's dim) 64 of them: decode streamed the 8B w2 at ~2.2 TB/s on an
// H200 whose copy reaches 4.25. Here a warp owns two weight rows and streams them in 16-byte chunks, the same x
// chunk (from L1/L2) serving both rows and every token; N / 16 CTAs of 8 warps, so N = 2048 fills 128 SMs.
//
// Precision: each e4m3 × e4m3 product is exact in fp32 (4-bit significands); lanes accumulate their chunks in fp32
// and a warp shuffle tree sums the 32 partials: no tensor-core accumulator truncation, so at least as accurate as
// the wgmma path (whose partial sums are promoted every 128-long k-tile). The epilogue applies the scales in the
// CUTLASS epilogue's order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "gemm/gemm_internal.h"
#include "norm/row.cuh"

namespace l3k {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;

// 16 e4m3 values (one 16-byte chunk) to fp32, through the hardware e4m3x2 → f16x2 conversion.
__device__ __forceinline__ void e4m3x16_to_float(const uint4& raw, float (&out)[16]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const auto pair = static_cast<__nv_fp8x2_storage_t>((words[w] >> (16 * h)) & 0xffffu);
      const __half2 v = __half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));  // .x = low byte
      const float2 f = __half22float2(v);
      out[4 * w + 2 * h] = f.x;
      out[4 * w + 2 * h + 1] = f.y;
    }
  }
}


// M tokens, U chunks of each row in flight per lane (more for fewer tokens: x chunks cost registers too).
template <typename OutT, int M>
__global__ void __launch_bounds__(kWarps * 32) fp8_gemv_kernel(const uint8_t* __restrict__ xq,
                                                               const float* __restrict__ x_scale,
                                                               const uint8_t* __restrict__ wq,
                                                               const float* __restrict__ w_scale,
                                                               const float* __restrict__ bias, OutT* __restrict__ y,
                                                               int n, int k) {
  constexpr int R = kRowsPerWarp, U = M <= 2 ? 4 : 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * kWarps + warp) * R;  // n is a multiple of 16: both rows exist or neither
  if (row0 >= n) return;
  const int chunks = k / 16;
  const uint4* w4 = reinterpret_cast<const uint4*>(wq + int64_t(row0) * k);
  const uint4* x4 = reinterpret_cast<const uint4*>(xq);
  float acc[M][R] = {};

  for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
    uint4 wv[U][R], xv[U][M];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // every load of this step first, then the math
      const int c = c0 + 32 * u;
      if (c < chunks) {
#pragma unroll
        for (int r = 0; r < R; ++r) wv[u][r] = __ldg(w4 + int64_t(r) * chunks + c);
#pragma unroll
        for (int m = 0; m < M; ++m) xv[u][m] = __ldg(x4 + int64_t(m) * chunks + c);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c0 + 32 * u >= chunks) break;
      float xf[M][16];
#pragma unroll
      for (int m = 0; m < M; ++m) e4m3x16_to_float(xv[u][m], xf[m]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float wf[16];
        e4m3x16_to_float(wv[u][r], wf);
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int i = 0; i < 16; ++i) acc[m][r] = fmaf(wf[i], xf[m][i], acc[m][r]);
      }
    }
  }

  const float sum = warp_sum_for_lane(acc, lane);
  if (lane < M * R) {  // lane m·R + r writes y[m, row0 + r]
    const int m = lane / R, r = lane % R, row = row0 + r;
    float v = x_scale[m] * (sum * w_scale[row]);
    if (bias != nullptr) v += bias[row];
    y[int64_t(m) * n + row] = norm::from_f<OutT>(v);
  }
}

template <typename OutT>
void launch(const GemvProblem& p) {
  const dim3 grid(static_cast<unsigned>((p.n + kRowsPerCta - 1) / kRowsPerCta)), block(kWarps * 32);
  const auto* xq = static_cast<const uint8_t*>(p.xq);
  const auto* wq = static_cast<const uint8_t*>(p.wq);
  auto* y = static_cast<OutT*>(p.y);
  switch (p.m) {
    case 1: fp8_gemv_kernel<OutT, 1><<<grid, block, 0, p.stream>>>(xq, p.x_scale, wq, p.w_scale, p.bias, y, p.n, p.k); break;
    case 2: fp8_gemv_kernel<OutT, 2><<<grid, block, 0, p.stream>>>(xq, p.x_scale, wq, p.w_scale, p.bias, y, p.n, p.k); break;
    case 3: fp8_gemv_kernel<OutT, 3><<<grid, block, 0, p.stream>>>(xq, p.x_scale, wq, p.w_scale, p.bias, y, p.n, p.k); break;
    default: fp8_gemv_kernel<OutT, 4><<<grid, block, 0, p.stream>>>(xq, p.x_scale, wq, p.w_scale, p.bias, y, p.n, p.k); break;
  }
  L3K_CHECK_LAUNCH("fp8_gemv_kernel");
}

}  // namespace

void fp8_rowwise_gemv(const GemvProblem& p, bool bf16_out) {
  require(p.m >= 1 && p.m <= kGemvMaxM, "M", "the GEMV takes 1.." + std::to_string(kGemvMaxM) + " tokens");
  require(p.n % 16 == 0 && p.k % 16 == 0, "N", "N and K must be multiples of 16");
  if (bf16_out) return launch<__nv_bfloat16>(p);
  launch<__half>(p);
}

}  // namespace l3k
