// RoPE-then-append, shared by the kernels that write a decode step's rotated q and new k, v: rope_kv_cache
// (rope_cache.cu) and the decode GEMV's q/k/v epilogue (gemm/decode_gemv.cu). Internal (not bound).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace l3k {

// RoPE's rotation of one interleaved pair, (x0 + i x1)(c + i s) in fp32, with the contraction written out (one
// rounded product, then one fma per output) so that every kernel that rotates produces the same bits whatever ptxas
// would have fused. Pass -s for the inverse rotation.
__device__ __forceinline__ float2 rope_pair(float x0, float x1, float c, float s) {
  return make_float2(fmaf(x0, c, -__fmul_rn(x1, s)), fmaf(x0, s, __fmul_rn(x1, c)));
}

// Where a token's rotated q and its k, v go: q [T, hq, d] dense; caches [Bmax, L, hkv, d] ((head, d) dense, strides
// in elements), token t at batch row t / S and slot positions[t]; rot [T, d/2] (cos, sin) per token.
struct RopeCacheTarget {
  const float2* rot;
  const std::int64_t* positions;
  void* q;
  void* k_cache;
  void* v_cache;
  std::int64_t k_stride_b, k_stride_l, v_stride_b, v_stride_l;
  int S, hq, hkv, d, L;
};

// The target of `tokens` tokens, checked (throws std::invalid_argument naming the argument): head counts, S
// dividing the token count, the cache length, d even, non-null outputs and positions, rot and positions aligned.
// Each launcher adds what its own access pattern needs (vector widths, alignment).
RopeCacheTarget rope_cache_target(std::uintptr_t rot, std::uintptr_t positions, std::uintptr_t q_out,
                                  std::uintptr_t k_cache, std::uintptr_t v_cache, std::int64_t tokens, int S, int hq,
                                  int hkv, int d, int L, std::int64_t k_stride_b, std::int64_t k_stride_l,
                                  std::int64_t v_stride_b, std::int64_t v_stride_l);

// Element `col` of head `head` (q heads, then k, then v) of token `tok` at cache slot `pos`: where it goes, or
// nullptr for a k or v head of a token whose position lies outside [0, L) (it writes no cache entry).
template <typename T>
__device__ __forceinline__ T* rope_cache_dst(const RopeCacheTarget& c, std::int64_t tok, std::int64_t pos, int head,
                                             int col) {
  if (head < c.hq) return static_cast<T*>(c.q) + (tok * c.hq + head) * c.d + col;
  if (pos < 0 || pos >= c.L) return nullptr;
  const std::int64_t b = tok / c.S;
  if (head < c.hq + c.hkv)
    return static_cast<T*>(c.k_cache) + b * c.k_stride_b + pos * c.k_stride_l + std::int64_t(head - c.hq) * c.d + col;
  return static_cast<T*>(c.v_cache) + b * c.v_stride_b + pos * c.v_stride_l +
         std::int64_t(head - c.hq - c.hkv) * c.d + col;
}

}  // namespace l3k
