// Decode GEMV for 16-bit weights (M <= 4 tokens) with the layer's preceding elementwise op fused in as a prologue:
//   y[m, n] = Σ_k a[m, k] · w[n, k],  a = x  |  rms_norm(x (+ residual)) · norm_w  |  silu(gate) · up.
//
// Why: a batch-1 decode step of a small model is a chain of short kernels (per layer: norm, qkv GEMV, RoPE + cache,
// attention, o GEMV, norm, w13 GEMV, SwiGLU, w2 GEMV), each paying a launch and a ramp-up on an almost idle GPU.
// Folding each norm and the SwiGLU into the GEMV that consumes it removes three of them a layer. The prologue is
// tiny (a row of a few thousand elements), so every CTA recomputes it into shared memory (from L2) instead of
// waiting for a separate kernel; CTA 0 also writes the new residual stream h. The weight loads of the first step
// are issued before the prologue, so they are in flight while it runs.
//
// Layout as fp8_gemv.cu: a warp owns two weight rows and streams them in 16-byte chunks (8 elements), 8 warps a
// CTA, 16-row blocks; at most as many CTAs as fit at once, each walking blocks after one prologue (the LM head has
// 8016 blocks). Products accumulate in fp32 per lane, then a shuffle tree. `a` is rounded to the weight dtype
// before the products, exactly as the unfused ops (rms_norm, swiglu) hand it to the GEMM. Unless L3K_PDL=0 the kernel
// is a programmatic dependent launch: its first weight loads may overlap the previous kernel's tail (common.h).
//
// The qkv epilogue (decode_gemv_rope_cache): y is a fused [wq; wk; wv] projection, and instead of storing it the
// kernel does what rope_kv_cache (attention/rope_cache.cu) would do next: q heads rotated into q_out, k heads
// rotated into k_cache, v heads copied into v_cache, at each token's position. A warp owns two adjacent rows, an
// even one first, so it holds whole RoPE pairs (Meta's interleaved (2i, 2i + 1) within a head); each sum is
// rounded to T first and rotated by the same rope_pair arithmetic, so the result is bit-identical to the unfused
// GEMV + rope_kv_cache (one kernel a layer fewer in a decode step).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

#include "attention/rope_cache.cuh"
#include "common.h"
#include "gemm/gemm.h"
#include "gemm/gemm_internal.h"
#include "norm/row.cuh"

namespace l3k {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2, kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kVec = 8;  // 16-bit elements per 16-byte chunk
enum Prologue : int { kNone = 0, kRmsNorm = 1, kSwiglu = 2 };

struct Params {
  const void* x;         // [M, x_stride]: a's input (swiglu: gate in columns 0..K-1, up in K..2K-1)
  int64_t x_stride;      // elements between rows of x
  const void* residual;  // [M, K] or nullptr (rms_norm prologue)
  const void* norm_w;    // [K] (rms_norm prologue)
  void* h_out;           // [M, K] or nullptr: x + residual, written by CTA 0
  float eps;
  const void* w;  // [N, K]
  void* y;        // [M, N] (unused by the qkv epilogue)
  int n, k;
  RopeCacheTarget rope;  // the qkv epilogue's (N = (hq + 2 hkv) d; a position outside [0, L): no write, NaN q)
};

using norm::from_f;
using norm::to_f;

// 8 elements of a 16-byte chunk
template <typename T>
union Chunk {
  uint4 raw;
  T v[kVec];
};

// a = prologue(x) into shared memory as T, [M][K]. Ends with __syncthreads. A thread takes chunks tid, tid + 256,
// ... of each row, kBatch of them at a time with every load issued before the first store (a store to h_out could
// alias x as far as the compiler knows, which would serialize one L2 round trip per chunk).
constexpr int kBatch = 4;

template <typename T, int M, int P>
__device__ __forceinline__ void prologue(const Params& p, T* xs) {
  const int chunks = p.k / kVec;
  float sumsq[M] = {};
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint4* x4 = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + m * p.x_stride);
    const uint4* up4 = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + m * p.x_stride + p.k);
    const uint4* r4 = p.residual ? reinterpret_cast<const uint4*>(static_cast<const T*>(p.residual) + int64_t(m) * p.k)
                                 : nullptr;
    uint4* h4 = (P == kRmsNorm && p.residual && p.h_out && blockIdx.x == 0)
                    ? reinterpret_cast<uint4*>(static_cast<T*>(p.h_out) + int64_t(m) * p.k)
                    : nullptr;
    uint4* s4 = reinterpret_cast<uint4*>(xs + int64_t(m) * p.k);
    for (int c0 = threadIdx.x; c0 < chunks; c0 += kBatch * kThreads) {
      Chunk<T> a[kBatch], b[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {  // loads first
        const int c = c0 + j * kThreads;
        if (c < chunks) {
          a[j].raw = x4[c];
          if (P == kSwiglu) b[j].raw = up4[c];
          if (P == kRmsNorm && r4 != nullptr) b[j].raw = r4[c];
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int c = c0 + j * kThreads;
        if (c >= chunks) break;
        if constexpr (P == kSwiglu) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float g = to_f(a[j].v[e]);
            a[j].v[e] = from_f<T>(__fdividef(g, 1.f + __expf(-g)) * to_f(b[j].v[e]));
          }
        } else if constexpr (P == kRmsNorm) {
          if (r4 != nullptr) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) a[j].v[e] = from_f<T>(to_f(a[j].v[e]) + to_f(b[j].v[e]));
            if (h4 != nullptr) h4[c] = a[j].raw;
          }
#pragma unroll
          for (int e = 0; e < kVec; ++e) sumsq[m] = fmaf(to_f(a[j].v[e]), to_f(a[j].v[e]), sumsq[m]);
        }
        s4[c] = a[j].raw;  // rms_norm: h for now; the same thread rescales it below
      }
    }
  }
  if constexpr (P == kRmsNorm) {
    __shared__ float red[kWarps][M];
    __shared__ float rstd[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float s = sumsq[m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (threadIdx.x % 32 == 0) red[threadIdx.x / 32][m] = s;
    }
    __syncthreads();
    if (threadIdx.x < M) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
      rstd[threadIdx.x] = rsqrtf(s / float(p.k) + p.eps);
    }
    __syncthreads();
    const uint4* g4 = static_cast<const uint4*>(p.norm_w);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      uint4* s4 = reinterpret_cast<uint4*>(xs + int64_t(m) * p.k);
      const float r = rstd[m];
      for (int c = threadIdx.x; c < chunks; c += kThreads) {  // the chunks this thread wrote above
        Chunk<T> h, g;
        h.raw = s4[c];
        g.raw = __ldg(g4 + c);
#pragma unroll
        for (int e = 0; e < kVec; ++e) h.v[e] = from_f<T>(to_f(h.v[e]) * r * to_f(g.v[e]));
        s4[c] = h.raw;
      }
    }
  }
  __syncthreads();
}

// The qkv epilogue for the pair (row0, row0 + 1) of token m: lane m·2 + r holds y[m, row0 + r] as `mine`, `other`
// is its partner's; writes element row0 + r of q, the k cache or the v cache.
template <typename T>
__device__ __forceinline__ void rope_cache_store(const RopeCacheTarget& c, int m, int row0, int r, T mine, T other) {
  const int head = row0 / c.d, col = row0 % c.d + r;
  const int64_t pos = c.positions[m];
  T* dst = rope_cache_dst<T>(c, m, pos, head, col);
  if (dst == nullptr) return;
  if (head >= c.hq + c.hkv) {  // v: copied
    *dst = mine;
    return;
  }
  const float2 cs = c.rot[int64_t(m) * (c.d / 2) + col / 2];
  const float x0 = to_f(r == 0 ? mine : other), x1 = to_f(r == 0 ? other : mine);
  const float2 y = rope_pair(x0, x1, cs.x, cs.y);
  const bool nan_q = head < c.hq && (pos < 0 || pos >= c.L);  // a q head of a token outside the cache
  *dst = from_f<T>(nan_q ? __int_as_float(0x7fc00000) : r == 0 ? y.x : y.y);
}

template <typename T, int M, int P, bool kRope>
__global__ void __launch_bounds__(kThreads) decode_gemv_kernel(const Params p) {
  constexpr int R = kRowsPerWarp, U = M <= 2 ? 4 : 2;  // chunks of each row in flight per lane
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = p.k / kVec;
  const int blocks = (p.n + kRowsPerCta - 1) / kRowsPerCta;  // 16-row blocks; a CTA takes every gridDim.x-th

  int row0 = 0;
  const uint4* w4 = nullptr;
  bool live[R];
  auto select_block = [&](int blk) {
    row0 = (blk * kWarps + warp) * R;
    w4 = reinterpret_cast<const uint4*>(static_cast<const T*>(p.w) + int64_t(row0) * p.k);
#pragma unroll
    for (int r = 0; r < R; ++r) live[r] = row0 + r < p.n;
  };
  uint4 wv[U][R];
  auto load_step = [&](int c0) {  // every weight load of a step first, then the math
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (c < chunks && live[r]) wv[u][r] = __ldg(w4 + int64_t(r) * chunks + c);
    }
  };
  select_block(blockIdx.x);
  load_step(lane);  // in flight while the prologue runs: the weights do not depend on it
  // Launched with PDL (the default), this CTA may have started during the previous kernel's tail: the weight loads
  // above read parameters only, which no kernel of a decode step writes; x, residual, h_out, y (and the qkv
  // epilogue's rot, positions, q and caches) wait for that kernel's completion here.
  pdl_wait();
  pdl_launch_dependents();
  prologue<T, M, P>(p, xs);

  for (int blk = blockIdx.x; blk < blocks; blk += gridDim.x) {  // the prologue is paid once per CTA
    if (blk != int(blockIdx.x)) {
      select_block(blk);
      load_step(lane);
    }
    float acc[M][R] = {};
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
      if (c0 != lane) load_step(c0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (c >= chunks) break;
        float xf[M][kVec];
#pragma unroll
        for (int m = 0; m < M; ++m) {
          Chunk<T> xc;
          xc.raw = reinterpret_cast<const uint4*>(xs + int64_t(m) * p.k)[c];
#pragma unroll
          for (int e = 0; e < kVec; ++e) xf[m][e] = to_f(xc.v[e]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (!live[r]) continue;
          Chunk<T> wc;
          wc.raw = wv[u][r];
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float wf = to_f(wc.v[e]);
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m][r] = fmaf(wf, xf[m][e], acc[m][r]);
          }
        }
      }
    }
    const float sum = warp_sum_for_lane(acc, lane);
    if constexpr (kRope) {
      static_assert(R == 2, "the qkv epilogue needs whole RoPE pairs in a warp");
      const T mine = from_f<T>(sum), other = from_f<T>(__shfl_xor_sync(0xffffffffu, sum, 1));
      if (lane < M * R && row0 < p.n) rope_cache_store<T>(p.rope, lane / R, row0, lane % R, mine, other);
      continue;
    }
    if (lane < M * R) {  // lane m·R + r writes y[m, row0 + r]
      const int m = lane / R, r = lane % R;
      if (row0 + r < p.n) static_cast<T*>(p.y)[int64_t(m) * p.n + row0 + r] = from_f<T>(sum);
    }
  }
}

// Opts every instantiation in to the shared memory limit once per device (its static red/rstd arrays count too,
// so even exactly 48 KB of dynamic memory needs it), then a grid of at most the CTAs that fit at once: each CTA
// computes the prologue once and walks its 16-row blocks.
template <typename T, int M, int P, bool kRope>
void launch(const Params& p, int num_sms, cudaStream_t stream) {
  auto kernel = decode_gemv_kernel<T, M, P, kRope>;
  const size_t smem = size_t(M) * p.k * sizeof(T);
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "decode_gemv: cudaGetDevice");
  const uint64_t bit = uint64_t(1) << (device % 64);
  if (!(opted_in.load() & bit)) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kDecodeGemvMaxSmem)),
               "decode_gemv: shared memory opt-in");
    opted_in.fetch_or(bit);
  }
  const int blocks = (p.n + kRowsPerCta - 1) / kRowsPerCta;
  const dim3 grid(norm::resident_grid(kernel, kThreads, smem, blocks, num_sms));
  launch_pdl(kernel, grid, dim3(kThreads), smem, stream, 1u, p);
  L3K_CHECK_LAUNCH("decode_gemv_kernel");
}

template <typename T, int P, bool kRope = false>
void dispatch_m(const Params& p, int m, int num_sms, cudaStream_t s) {
  switch (m) {
    case 1: return launch<T, 1, P, kRope>(p, num_sms, s);
    case 2: return launch<T, 2, P, kRope>(p, num_sms, s);
    case 3: return launch<T, 3, P, kRope>(p, num_sms, s);
    default: return launch<T, 4, P, kRope>(p, num_sms, s);
  }
}

template <typename T>
void dispatch_prologue(const Params& p, int prologue, int m, int num_sms, cudaStream_t s) {
  switch (prologue) {
    case kNone: return dispatch_m<T, kNone>(p, m, num_sms, s);
    case kRmsNorm: return dispatch_m<T, kRmsNorm>(p, m, num_sms, s);
    default: return dispatch_m<T, kSwiglu>(p, m, num_sms, s);
  }
}

bool aligned16(std::uintptr_t a) { return a % 16 == 0; }

// The arguments both launchers share, checked; y may be 0 (the qkv epilogue writes no y).
Params checked_params(std::uintptr_t x, std::int64_t x_stride, std::uintptr_t residual, std::uintptr_t norm_w,
                      std::uintptr_t h_out, float eps, int prologue, std::uintptr_t w, std::uintptr_t y, int m, int n,
                      int k, int dtype, int num_sms) {
  const DType dt = to_dtype(dtype, "dtype");
  require(dt == DType::BF16 || dt == DType::F16, "dtype", "expected bf16 or fp16, got code " + std::to_string(dtype));
  require(prologue >= kNone && prologue <= kSwiglu, "prologue", "expected 0 (none), 1 (rms_norm) or 2 (swiglu)");
  require(m >= 1 && m <= kDecodeGemvMaxM, "M", "the decode GEMV takes 1.." + std::to_string(kDecodeGemvMaxM) +
                                                   " rows, got " + std::to_string(m));
  require(n >= 1, "N", "expected at least one weight row, got " + std::to_string(n));
  require(k >= kVec && k % kVec == 0, "K", "expected a positive multiple of 8, got " + std::to_string(k));
  require(size_t(m) * k * 2 <= kDecodeGemvMaxSmem, "K",
          "M x K of the staged input exceeds " + std::to_string(kDecodeGemvMaxSmem) + " bytes of shared memory");
  require(x_stride >= (prologue == kSwiglu ? 2 * int64_t(k) : int64_t(k)) && x_stride % kVec == 0, "x_stride",
          "rows of x must hold the input (2K for swiglu) and start 16-byte aligned");
  require(n <= 0x7fffffff - kRowsPerCta, "N", "expected fewer than 2^31 - 16 weight rows");
  require(x != 0 && w != 0, "x", "x and w must not be null");
  require(aligned16(x) && aligned16(w) && aligned16(y) && aligned16(residual) && aligned16(h_out), "x",
          "x, w, y, residual and h_out must be 16-byte aligned");
  require(prologue != kRmsNorm || (norm_w != 0 && aligned16(norm_w)), "norm_w",
          "the rms_norm prologue needs a 16-byte aligned norm weight");
  require(residual == 0 || prologue == kRmsNorm, "residual", "only the rms_norm prologue takes a residual");
  require(num_sms >= 1, "num_sms", "expected the device's SM count, got " + std::to_string(num_sms));
  Params p{};
  p.x = as_ptr<const void>(x);
  p.x_stride = x_stride;
  p.residual = as_ptr<const void>(residual);
  p.norm_w = as_ptr<const void>(norm_w);
  p.h_out = as_ptr<void>(h_out);
  p.eps = eps;
  p.w = as_ptr<const void>(w);
  p.y = as_ptr<void>(y);
  p.n = n;
  p.k = k;
  return p;
}

}  // namespace

void decode_gemv(std::uintptr_t x, std::int64_t x_stride, std::uintptr_t residual, std::uintptr_t norm_w,
                 std::uintptr_t h_out, float eps, int prologue, std::uintptr_t w, std::uintptr_t y, int m, int n,
                 int k, int dtype, int num_sms, std::uintptr_t stream) {
  const Params p = checked_params(x, x_stride, residual, norm_w, h_out, eps, prologue, w, y, m, n, k, dtype, num_sms);
  require(y != 0, "y", "null pointer");
  const DType dt = to_dtype(dtype, "dtype");
  if (dt == DType::BF16) return dispatch_prologue<__nv_bfloat16>(p, prologue, m, num_sms, as_stream(stream));
  dispatch_prologue<__half>(p, prologue, m, num_sms, as_stream(stream));
}

void decode_gemv_rope_cache(std::uintptr_t x, std::int64_t x_stride, std::uintptr_t residual, std::uintptr_t norm_w,
                            std::uintptr_t h_out, float eps, std::uintptr_t w, int m, int k, std::uintptr_t rot,
                            std::uintptr_t positions, std::uintptr_t q_out, std::uintptr_t k_cache,
                            std::uintptr_t v_cache, int S, int hq, int hkv, int d, int L, std::int64_t k_stride_b,
                            std::int64_t k_stride_l, std::int64_t v_stride_b, std::int64_t v_stride_l, int dtype,
                            int num_sms, std::uintptr_t stream) {
  const RopeCacheTarget rope = rope_cache_target(rot, positions, q_out, k_cache, v_cache, m, S, hq, hkv, d, L,
                                                 k_stride_b, k_stride_l, v_stride_b, v_stride_l);
  const std::int64_t n = (std::int64_t(hq) + 2 * std::int64_t(hkv)) * d;
  require(n <= 0x7fffffff - kRowsPerCta, "hq", "(hq + 2 hkv) d exceeds 2^31 - 16 weight rows");
  require(q_out % 2 == 0 && k_cache % 2 == 0 && v_cache % 2 == 0, "q_out", "expected 16-bit aligned outputs");
  Params p = checked_params(x, x_stride, residual, norm_w, h_out, eps, kRmsNorm, w, 0, m, int(n), k, dtype, num_sms);
  p.rope = rope;
  const DType dt = to_dtype(dtype, "dtype");
  if (dt == DType::BF16) return dispatch_m<__nv_bfloat16, kRmsNorm, true>(p, m, num_sms, as_stream(stream));
  dispatch_m<__half, kRmsNorm, true>(p, m, num_sms, as_stream(stream));
}

}  // namespace l3k
