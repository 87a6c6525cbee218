// Launchers of the gemm family (FP8 row-wise GEMM). Pointers and the stream are device addresses as integers.
#pragma once
#include <cstdint>
#include <string>

namespace l3k {

// y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · x_scale[m] · w_scale[n] (+ bias[n]), fp32 accumulation.
// xq [M, K] e4m3 row-major, wq [N, K] e4m3 row-major, x_scale [M] / w_scale [N] fp32, bias [N] fp32 or 0
// (bias_dtype -1 without bias), y [M, N] row-major in out_dtype (F16 or BF16). M = 0 or N = 0 launch nothing.
// Throws std::invalid_argument naming the argument: K, N multiples of 16, 16-byte aligned pointers, M >= 0;
// std::runtime_error naming the step, M, N, K and the configuration when a CUTLASS step fails.
void fp8_rowwise_mm(std::uintptr_t xq, std::uintptr_t x_scale, std::uintptr_t wq, std::uintptr_t w_scale,
                    std::uintptr_t bias, int bias_dtype, std::uintptr_t y, std::int64_t m, std::int64_t n,
                    std::int64_t k, int out_dtype, std::uintptr_t stream);

// Name of the tile configuration fp8_rowwise_mm runs for this problem (for tests and benches).
std::string fp8_rowwise_mm_config(std::int64_t m, std::int64_t n, std::int64_t k);

}  // namespace l3k
