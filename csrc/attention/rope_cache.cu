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
//
// rope_rotate, the training form: x [T, H, D] (any token stride, heads dense) rotated by rot [T, D/2], or by its
// conjugate (the backward: a rotation's gradient is the inverse rotation), into out [T, H, D] dense. A flat grid
// over 16-byte vectors, each read and written once; the model's complex-multiply form writes and reads fp32 copies.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "attention/attention.h"
#include "attention/flash_common.cuh"
#include "attention/rope_cache.cuh"
#include "common.h"

namespace l3k::attn {
namespace {

constexpr int kRopeThreads = 256;  // a token of Llama 3 8B is 768 vectors: 3 dependent load-store rounds a thread

struct RopeParams {
  const void* qkv;
  int64_t qkv_stride;  // elements between consecutive tokens
  RopeCacheTarget out;
};

template <typename T>
__global__ void __launch_bounds__(kRopeThreads) rope_kv_cache_kernel(const RopeParams p) {
  pdl_wait();  // a decode-step kernel: may be a PDL launch (common.h)
  pdl_launch_dependents();
  const RopeCacheTarget& c = p.out;
  const int64_t tok = blockIdx.x;
  const int64_t pos = c.positions[tok];
  const bool in_cache = pos >= 0 && pos < c.L;
  const int vecs_per_head = c.d / 8, nvec = (c.hq + 2 * c.hkv) * vecs_per_head;
  const T* src = static_cast<const T*>(p.qkv) + tok * p.qkv_stride;
  const float2* rot = c.rot + tok * (c.d / 2);
  for (int vi = threadIdx.x; vi < nvec; vi += kRopeThreads) {
    const int head = vi / vecs_per_head, col = (vi % vecs_per_head) * 8;
    T* dst = rope_cache_dst<T>(c, tok, pos, head, col);
    if (dst == nullptr) continue;
    uint4 x = *reinterpret_cast<const uint4*>(src + int64_t(head) * c.d + col);
    if (head < c.hq + c.hkv) {
      uint32_t* w = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // pair col / 2 + i: (x0, x1) by (cos, sin)
        const float2 v = Half<T>::unpack(w[i]), cs = rot[col / 2 + i];
        float2 y = rope_pair(v.x, v.y, cs.x, cs.y);
        if (!in_cache) y.x = y.y = __int_as_float(0x7fc00000);  // only q heads get here without a cache slot
        w[i] = Half<T>::pack(y.x, y.y);
      }
    }
    *reinterpret_cast<uint4*>(dst) = x;
  }
}

constexpr int kRotateThreads = 256;

template <typename T, bool kInverse>
__global__ void __launch_bounds__(kRotateThreads) rope_rotate_kernel(const T* x, int64_t x_stride, const float2* rot,
                                                                    T* out, int64_t nvec, int heads, int d) {
  const int vecs_per_token = heads * (d / 8), vecs_per_head = d / 8;
  for (int64_t v = blockIdx.x * int64_t(kRotateThreads) + threadIdx.x; v < nvec;
       v += int64_t(gridDim.x) * kRotateThreads) {
    const int64_t tok = v / vecs_per_token;
    const int within = int(v - tok * vecs_per_token), head = within / vecs_per_head;
    const int col = (within - head * vecs_per_head) * 8;
    uint4 u = *reinterpret_cast<const uint4*>(x + tok * x_stride + int64_t(head) * d + col);
    const float4* cs4 = reinterpret_cast<const float4*>(rot + tok * (d / 2) + col / 2);  // 4 pairs: 32 bytes
    const float4 cs01 = cs4[0], cs23 = cs4[1];
    const float2 cs[4] = {{cs01.x, cs01.y}, {cs01.z, cs01.w}, {cs23.x, cs23.y}, {cs23.z, cs23.w}};
    uint32_t* w = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 p = Half<T>::unpack(w[i]);
      const float2 y = rope_pair(p.x, p.y, cs[i].x, kInverse ? -cs[i].y : cs[i].y);  // conjugate: (cos, -sin)
      w[i] = Half<T>::pack(y.x, y.y);
    }
    *reinterpret_cast<uint4*>(out + v * 8) = u;  // out is dense: vector v sits at element 8 v
  }
}

}  // namespace
}  // namespace l3k::attn

namespace l3k {

RopeCacheTarget rope_cache_target(std::uintptr_t rot, std::uintptr_t positions, std::uintptr_t q_out,
                                  std::uintptr_t k_cache, std::uintptr_t v_cache, std::int64_t tokens, int S, int hq,
                                  int hkv, int d, int L, std::int64_t k_stride_b, std::int64_t k_stride_l,
                                  std::int64_t v_stride_b, std::int64_t v_stride_l) {
  require(d > 0 && d % 2 == 0, "d", "expected a positive even head dim, got " + std::to_string(d));
  require(hq > 0 && hkv > 0, "hkv", "expected positive head counts, got hq=" + std::to_string(hq) +
                                        " hkv=" + std::to_string(hkv));
  require(S > 0 && tokens % S == 0, "S", "expected a positive divisor of the token count, got " + std::to_string(S));
  require(L > 0, "L", "expected a positive cache length, got " + std::to_string(L));
  if (tokens > 0) {  // (no token: the outputs are empty, and their pointers may be null)
    const std::pair<const char*, std::uintptr_t> pointers[] = {
        {"q_out", q_out}, {"k_cache", k_cache}, {"v_cache", v_cache}, {"positions", positions}};
    for (const auto& [name, address] : pointers) require(address != 0, name, "null pointer");
    require(rot != 0 && rot % 8 == 0, "rot", "expected an 8-byte aligned fp32 (cos, sin) pair array");
    require(positions % 8 == 0, "positions", "expected an aligned int64 array");
  }
  RopeCacheTarget c{};
  c.rot = as_ptr<const float2>(rot);
  c.positions = as_ptr<const std::int64_t>(positions);
  c.q = as_ptr<void>(q_out);
  c.k_cache = as_ptr<void>(k_cache);
  c.v_cache = as_ptr<void>(v_cache);
  c.k_stride_b = k_stride_b;
  c.k_stride_l = k_stride_l;
  c.v_stride_b = v_stride_b;
  c.v_stride_l = v_stride_l;
  c.S = S;
  c.hq = hq;
  c.hkv = hkv;
  c.d = d;
  c.L = L;
  return c;
}

void rope_kv_cache(std::uintptr_t qkv, std::int64_t qkv_row_stride, std::uintptr_t rot, std::uintptr_t positions,
                   std::uintptr_t q_out, std::uintptr_t k_cache, std::uintptr_t v_cache, std::int64_t tokens, int S,
                   int hq, int hkv, int d, int L, std::int64_t k_stride_b, std::int64_t k_stride_l,
                   std::int64_t v_stride_b, std::int64_t v_stride_l, int dtype, std::uintptr_t stream) {
  using namespace attn;
  const DType dt = to_dtype(dtype, "dtype");
  require(dt == DType::BF16 || dt == DType::F16, "dtype", "expected bf16 or fp16, got code " + std::to_string(dtype));
  require(d > 0 && d % 8 == 0 && d <= 512, "d", "expected a head dim that is a multiple of 8 (<= 512), got " +
                                                     std::to_string(d));
  require(tokens >= 0 && tokens <= 0x7fffffff, "tokens", "expected 0 <= tokens < 2^31, got " + std::to_string(tokens));
  RopeParams p{};
  p.out = rope_cache_target(rot, positions, q_out, k_cache, v_cache, tokens, S, hq, hkv, d, L, k_stride_b, k_stride_l,
                            v_stride_b, v_stride_l);
  require(qkv_row_stride >= (int64_t(hq) + 2 * int64_t(hkv)) * d && qkv_row_stride % 8 == 0, "qkv_row_stride",
          "expected a multiple of 8 that covers (hq + 2 hkv) * d, got " + std::to_string(qkv_row_stride));
  for (std::int64_t s : {k_stride_b, k_stride_l, v_stride_b, v_stride_l})
    require(s % 8 == 0, "k_cache", "cache strides must be multiples of 8 elements (16-byte rows)");
  if (tokens == 0) return;
  // the kernel moves 16-byte vectors
  const std::pair<const char*, std::uintptr_t> pointers[] = {
      {"qkv", qkv}, {"q_out", q_out}, {"k_cache", k_cache}, {"v_cache", v_cache}};
  for (const auto& [name, address] : pointers) {
    require(address != 0, name, "null pointer");
    require(address % 16 == 0, name, "expected a 16-byte aligned pointer");
  }
  p.qkv = as_ptr<const void>(qkv);
  p.qkv_stride = qkv_row_stride;
  const cudaStream_t s = as_stream(stream);
  if (dt == DType::BF16) launch_pdl(rope_kv_cache_kernel<__nv_bfloat16>, dim3(unsigned(tokens)), dim3(kRopeThreads), 0, s, 1u, p);
  else launch_pdl(rope_kv_cache_kernel<__half>, dim3(unsigned(tokens)), dim3(kRopeThreads), 0, s, 1u, p);
  L3K_CHECK_LAUNCH("rope_kv_cache_kernel");
}

void rope_rotate(std::uintptr_t x, std::int64_t x_row_stride, std::uintptr_t rot, std::uintptr_t out,
                 std::int64_t tokens, int heads, int d, bool inverse, int dtype, int num_sms, std::uintptr_t stream) {
  using namespace attn;
  const DType dt = to_dtype(dtype, "dtype");
  require(dt == DType::BF16 || dt == DType::F16, "dtype", "expected bf16 or fp16, got code " + std::to_string(dtype));
  require(d > 0 && d % 8 == 0 && d <= 512, "d", "expected a head dim that is a multiple of 8 (<= 512), got " +
                                                     std::to_string(d));
  require(heads > 0, "heads", "expected a positive head count, got " + std::to_string(heads));
  require(tokens >= 0, "tokens", "expected >= 0, got " + std::to_string(tokens));
  require(num_sms > 0, "num_sms", "expected > 0, got " + std::to_string(num_sms));
  require(tokens <= 1 || (x_row_stride >= int64_t(heads) * d && x_row_stride % 8 == 0), "x_row_stride",
          "expected a multiple of 8 that covers heads * d, got " + std::to_string(x_row_stride));
  if (tokens == 0) return;
  const std::pair<const char*, std::uintptr_t> pointers[] = {{"x", x}, {"out", out}, {"rot", rot}};
  for (const auto& [name, address] : pointers) {
    require(address != 0, name, "null pointer");
    require(address % 16 == 0, name, "expected a 16-byte aligned pointer");
  }
  const std::int64_t nvec = tokens * heads * (d / 8);
  const unsigned grid = unsigned(std::min<std::int64_t>((nvec + kRotateThreads - 1) / kRotateThreads,
                                                        std::int64_t(num_sms) * (2048 / kRotateThreads)));
  const cudaStream_t s = as_stream(stream);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = as_ptr<const T>(x);
    T* op = as_ptr<T>(out);
    const float2* rp = as_ptr<const float2>(rot);
    if (inverse) rope_rotate_kernel<T, true><<<grid, kRotateThreads, 0, s>>>(xp, x_row_stride, rp, op, nvec, heads, d);
    else rope_rotate_kernel<T, false><<<grid, kRotateThreads, 0, s>>>(xp, x_row_stride, rp, op, nvec, heads, d);
  };
  if (dt == DType::BF16) launch(__nv_bfloat16{});
  else launch(__half{});
  L3K_CHECK_LAUNCH("rope_rotate_kernel");
}

}  // namespace l3k
