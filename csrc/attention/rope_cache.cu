// RoPE on the q and k heads of a fused qkv projection, with the rotated k and the v appended to a KV cache: the
// decode step's rotate-and-append as one kernel. It replaces five per layer (the model's fp32 cast, complex
// multiply and cast back for q and k, and one index_put each for the k and v caches).
//
// qkv [T, (Hq + 2 Hkv) D] (token rows, any row stride), rot [T, D/2] (cos, sin) fp32 pairs, positions [T] int64,
// with T = B·S tokens (token t belongs to batch row t / S); caches [Bmax, L, Hkv, D] with (head, d) dense. Writes
// q [T, Hq, D] dense, k_cache[b, pos, h] = rotate(k_h), v_cache[b, pos, h] = v_h. Pairs are Meta's interleaved
// (x[2i], x[2i+1]), rotated in fp32 as the complex product (x0 + i x1)(cos + i sin), rounded once to T.
// A token whose position lies outside [0, L) writes no cache entry and gets a NaN q: positions live on the GPU
// (a CUDA graph replays them), so no host check can run; the NaN makes the caller's bug visible downstream.
//
// One CTA per token, each thread one 16-byte vector (4 pairs) at a time: the whole step moves a few KB per token.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include "attention/attention.h"
#include "attention/flash_common.cuh"
#include "common.h"

namespace l3k::attn {
namespace {

constexpr int kRopeThreads = 256;  // a token of Llama 3 8B is 768 vectors: 3 dependent load-store rounds a thread

struct RopeParams {
  const void* qkv;
  int64_t qkv_stride;  // elements between consecutive tokens
  const float2* rot;   // [T, D/2]
  const int64_t* positions;
  void* q;             // [T, Hq, D]
  void* k_cache;
  void* v_cache;
  int64_t k_stride_b, k_stride_l, v_stride_b, v_stride_l;
  int S, hq, hkv, d, L;
};

template <typename T>
__global__ void __launch_bounds__(kRopeThreads) rope_kv_cache_kernel(const RopeParams p) {
  const int64_t tok = blockIdx.x;
  const int64_t b = tok / p.S;
  const int64_t pos = p.positions[tok];
  const bool in_cache = pos >= 0 && pos < p.L;
  const int vecs_per_head = p.d / 8, nvec = (p.hq + 2 * p.hkv) * vecs_per_head;
  const T* src = static_cast<const T*>(p.qkv) + tok * p.qkv_stride;
  const float2* rot = p.rot + tok * (p.d / 2);
  for (int vi = threadIdx.x; vi < nvec; vi += kRopeThreads) {
    const int head = vi / vecs_per_head, col = (vi % vecs_per_head) * 8;
    T* dst;
    if (head < p.hq) {
      dst = static_cast<T*>(p.q) + (tok * p.hq + head) * p.d + col;
    } else if (!in_cache) {
      continue;
    } else if (head < p.hq + p.hkv) {
      dst = static_cast<T*>(p.k_cache) + b * p.k_stride_b + pos * p.k_stride_l + int64_t(head - p.hq) * p.d + col;
    } else {
      dst = static_cast<T*>(p.v_cache) + b * p.v_stride_b + pos * p.v_stride_l +
            int64_t(head - p.hq - p.hkv) * p.d + col;
    }
    uint4 x = *reinterpret_cast<const uint4*>(src + int64_t(head) * p.d + col);
    if (head < p.hq + p.hkv) {
      uint32_t* w = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // pair col / 2 + i: (x0, x1) by (cos, sin)
        const float2 v = Half<T>::unpack(w[i]), cs = rot[col / 2 + i];
        float y0 = v.x * cs.x - v.y * cs.y, y1 = v.x * cs.y + v.y * cs.x;
        if (!in_cache) y0 = y1 = __int_as_float(0x7fc00000);  // only q heads get here without a cache slot
        w[i] = Half<T>::pack(y0, y1);
      }
    }
    *reinterpret_cast<uint4*>(dst) = x;
  }
}

}  // namespace
}  // namespace l3k::attn

namespace l3k {

void rope_kv_cache(std::uintptr_t qkv, std::int64_t qkv_row_stride, std::uintptr_t rot, std::uintptr_t positions,
                   std::uintptr_t q_out, std::uintptr_t k_cache, std::uintptr_t v_cache, std::int64_t tokens, int S,
                   int hq, int hkv, int d, int L, std::int64_t k_stride_b, std::int64_t k_stride_l,
                   std::int64_t v_stride_b, std::int64_t v_stride_l, int dtype, std::uintptr_t stream) {
  using namespace attn;
  const DType dt = to_dtype(dtype, "dtype");
  require(dt == DType::BF16 || dt == DType::F16, "dtype", "expected bf16 or fp16, got code " + std::to_string(dtype));
  require(d > 0 && d % 8 == 0 && d <= 512, "d", "expected a head dim that is a multiple of 8 (<= 512), got " +
                                                     std::to_string(d));
  require(hq > 0 && hkv > 0, "hkv", "expected positive head counts, got hq=" + std::to_string(hq) +
                                        " hkv=" + std::to_string(hkv));
  require(tokens >= 0 && tokens <= 0x7fffffff, "tokens", "expected 0 <= tokens < 2^31, got " + std::to_string(tokens));
  require(S > 0 && tokens % S == 0, "S", "expected a positive divisor of the token count, got " + std::to_string(S));
  require(L > 0, "L", "expected a positive cache length, got " + std::to_string(L));
  require(qkv_row_stride >= int64_t(hq + 2 * hkv) * d && qkv_row_stride % 8 == 0, "qkv_row_stride",
          "expected a multiple of 8 that covers (hq + 2 hkv) * d, got " + std::to_string(qkv_row_stride));
  for (std::int64_t s : {k_stride_b, k_stride_l, v_stride_b, v_stride_l})
    require(s % 8 == 0, "k_cache", "cache strides must be multiples of 8 elements (16-byte rows)");
  if (tokens == 0) return;
  const std::pair<const char*, std::uintptr_t> pointers[] = {
      {"qkv", qkv}, {"q_out", q_out}, {"k_cache", k_cache}, {"v_cache", v_cache}};
  for (const auto& [name, address] : pointers) {
    require(address != 0, name, "null pointer");
    require(address % 16 == 0, name, "expected a 16-byte aligned pointer");
  }
  require(rot != 0 && rot % 8 == 0, "rot", "expected an 8-byte aligned fp32 (cos, sin) pair array");
  require(positions != 0 && positions % 8 == 0, "positions", "expected an aligned int64 array");

  RopeParams p{};
  p.qkv = as_ptr<const void>(qkv);
  p.qkv_stride = qkv_row_stride;
  p.rot = as_ptr<const float2>(rot);
  p.positions = as_ptr<const std::int64_t>(positions);
  p.q = as_ptr<void>(q_out);
  p.k_cache = as_ptr<void>(k_cache);
  p.v_cache = as_ptr<void>(v_cache);
  p.k_stride_b = k_stride_b;
  p.k_stride_l = k_stride_l;
  p.v_stride_b = v_stride_b;
  p.v_stride_l = v_stride_l;
  p.S = S;
  p.hq = hq;
  p.hkv = hkv;
  p.d = d;
  p.L = L;
  const cudaStream_t s = as_stream(stream);
  if (dt == DType::BF16) rope_kv_cache_kernel<__nv_bfloat16><<<unsigned(tokens), kRopeThreads, 0, s>>>(p);
  else rope_kv_cache_kernel<__half><<<unsigned(tokens), kRopeThreads, 0, s>>>(p);
  L3K_CHECK_LAUNCH("rope_kv_cache_kernel");
}

}  // namespace l3k
