// Launchers of the gemm family (FP8 row-wise GEMM, 16-bit decode GEMV). Pointers and the stream are device addresses as integers.
#pragma once
#include <cstddef>
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

// Decode GEMV, 16-bit weights, 1..kDecodeGemvMaxM rows: y [M, N] = a · wᵀ with w [N, K] row-major and
// a = prologue(x) rounded to the dtype: 0 a = x [M, K]; 1 a = rms_norm(h) · norm_w with h = x (+ residual [M, K],
// rounded; written to h_out [M, K] when h_out != 0), eps; 2 a = silu(x[:, :K]) · x[:, K:2K]. x rows are x_stride
// elements apart; residual, h_out, y are contiguous; every pointer 16-byte aligned, K a multiple of 8 and M·K·2 bytes
// at most kDecodeGemvMaxSmem (a is staged in shared memory). Throws std::invalid_argument naming the argument.
constexpr int kDecodeGemvMaxM = 4;
constexpr std::size_t kDecodeGemvMaxSmem = 160 * 1024;
void decode_gemv(std::uintptr_t x, std::int64_t x_stride, std::uintptr_t residual, std::uintptr_t norm_w,
                 std::uintptr_t h_out, float eps, int prologue, std::uintptr_t w, std::uintptr_t y, int m, int n,
                 int k, int dtype, int num_sms, std::uintptr_t stream);

// The fused qkv projection of a decode step: the rms_norm prologue (residual and h_out optional, as above), then
// for y = a · wᵀ with N = (hq + 2 hkv) d rows (wq; wk; wv) what rope_kv_cache does next instead of storing y:
// q [M, hq, d] = RoPE(y's q heads), k_cache[t / S, positions[t]] = RoPE(y's k heads), v_cache[...] = y's v heads,
// with rot [M, d/2] fp32 (cos, sin) and int64 positions [M]; caches [Bmax, L, hkv, d] with the given strides (in
// elements, (head, d) dense). A position outside [0, L) writes no cache entry and makes that token's q NaN.
// Bit-identical to decode_gemv (prologue 1) followed by rope_kv_cache.
void decode_gemv_rope_cache(std::uintptr_t x, std::int64_t x_stride, std::uintptr_t residual, std::uintptr_t norm_w,
                            std::uintptr_t h_out, float eps, std::uintptr_t w, int m, int k, std::uintptr_t rot,
                            std::uintptr_t positions, std::uintptr_t q_out, std::uintptr_t k_cache,
                            std::uintptr_t v_cache, int S, int hq, int hkv, int d, int L, std::int64_t k_stride_b,
                            std::int64_t k_stride_l, std::int64_t v_stride_b, std::int64_t v_stride_l, int dtype,
                            int num_sms, std::uintptr_t stream);

}  // namespace l3k
