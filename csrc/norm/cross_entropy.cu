// Cross-entropy of 16-bit logits against integer targets, computed in fp32 without an fp32 copy of the logits.
// Forward: one CTA per row (a persistent grid over rows) keeps an online (max, sum of exp) per thread over its
// vectors, all kUnroll loads of a step issued before their math, then merges the pairs across the CTA: the row's
// lse and loss = lse - logit[target]. Backward: elementwise over (row, column tile) like SwiGLU's,
// dlogits = grad · (exp(logit - lse) - [col == target]). The logits are read once forward and once backward; the
// F.cross_entropy(logits.float()) it replaces writes and reads an fp32 copy and fp32 log-probabilities as well.
#include <cmath>

#include "norm/norm.h"
#include "norm/row.cuh"

namespace l3k::norm {
namespace {

constexpr int kCeThreads = 512;
constexpr int kCeUnroll = 4;

// Running (max, Σ exp(x - max)) of a set of logits; max = -inf while every logit seen is -inf (sum 0 then).
struct MaxSum {
  float m, s;
};

// Offsets against a max that may be -inf: exp(x - (-inf)) would be NaN for x = -inf, so -inf subtracts 0.
__device__ __forceinline__ float finite_or_zero(float m) { return m == -INFINITY ? 0.f : m; }

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m), base = finite_or_zero(m);
  return {m, a.s * __expf(a.m - base) + b.s * __expf(b.m - base)};
}

// A row's label: its column, or -1 (ignored: loss and gradient 0), or -2 (out of range: NaN, so a bad label shows
// up in the loss instead of reading past the row).
__device__ __forceinline__ int64_t row_label(const int64_t* targets, int64_t row, int64_t V, int64_t ignore_index) {
  const int64_t t = targets[row];
  if (t == ignore_index) return -1;
  return (t >= 0 && t < V) ? t : -2;
}

// A thread's vectors j0, j0 + kCeThreads, ... of a row (those below nvec), every load issued before any use.
template <typename T, int VEC>
__device__ __forceinline__ void load_step(const T* x, int j0, int nvec, Vec<T, VEC> (&v)[kCeUnroll]) {
#pragma unroll
  for (int u = 0; u < kCeUnroll; ++u) {
    const int j = j0 + u * kCeThreads;
    if (j < nvec) v[u] = load_vec<T, VEC>(x + int64_t(j) * VEC);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kCeThreads) cross_entropy_fwd_kernel(const T* logits, int64_t row_stride,
                                                                        const int64_t* targets, float* loss,
                                                                        float* lse, int64_t M, int V,
                                                                        int64_t ignore_index) {
  __shared__ MaxSum red[kCeThreads / 32];
  const int nvec = V / VEC;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* x = logits + row * row_stride;
    MaxSum acc{-INFINITY, 0.f};
    for (int j0 = threadIdx.x; j0 < nvec; j0 += kCeThreads * kCeUnroll) {
      Vec<T, VEC> v[kCeUnroll];
      load_step(x, j0, nvec, v);
#pragma unroll
      for (int u = 0; u < kCeUnroll; ++u) {
        if (j0 + u * kCeThreads >= nvec) continue;
        float vmax = -INFINITY;
#pragma unroll
        for (int i = 0; i < VEC; ++i) vmax = fmaxf(vmax, to_f(v[u].v[i]));
        // fmaxf drops NaN, but exp(NaN - m) below keeps it in the sum, so a NaN logit gives a NaN loss
        const float m = fmaxf(acc.m, vmax), base = finite_or_zero(m);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) s += __expf(to_f(v[u].v[i]) - base);
        acc = {m, acc.s * __expf(acc.m - base) + s};
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      acc = merge(acc, {__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o)});
    }
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kCeThreads / 32; ++w) acc = merge(acc, red[w]);
      const float row_lse = acc.m + logf(acc.s);  // every logit -inf: -inf
      const int64_t label = row_label(targets, row, V, ignore_index);
      lse[row] = row_lse;
      loss[row] = label == -1 ? 0.f : label == -2 ? NAN : row_lse - to_f(x[label]);
    }
    __syncthreads();  // red is reused by the next row
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kCeThreads) cross_entropy_bwd_kernel(const float* grad, const T* logits,
                                                                        int64_t row_stride, const int64_t* targets,
                                                                        const float* lse, T* dlogits, int64_t M,
                                                                        int V, int64_t ignore_index,
                                                                        int64_t tiles_per_row) {
  const int nvec = V / VEC;
  const int64_t tiles = M * tiles_per_row;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / tiles_per_row;
    const int j0 = int(tile - row * tiles_per_row) * (kCeThreads * kCeUnroll) + threadIdx.x;
    const T* x = logits + row * row_stride;
    T* dx = dlogits + row * int64_t(V);
    const int64_t label = row_label(targets, row, V, ignore_index);
    // ignored rows: 0; a bad label: NaN, as its loss
    const float g = label == -1 ? 0.f : label == -2 ? NAN : grad[row], row_lse = lse[row];
    Vec<T, VEC> v[kCeUnroll];
    load_step(x, j0, nvec, v);
#pragma unroll
    for (int u = 0; u < kCeUnroll; ++u) {
      const int j = j0 + u * kCeThreads;
      if (j >= nvec) continue;
      Vec<T, VEC> d;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t col = int64_t(j) * VEC + i;
        const float p = __expf(to_f(v[u].v[i]) - row_lse);
        d.v[i] = from_f<T>(g * (col == label ? p - 1.f : p));
      }
      store_vec<T, VEC>(dx + int64_t(j) * VEC, d);
    }
  }
}

void check_ce(uptr logits, int64_t row_stride, uptr targets, uptr lse, int64_t M, int64_t V, int num_sms) {
  require_sizes(M, V, num_sms, "V");
  require(M == 0 || V > 0, "V", "expected at least one class, got 0");
  require_stride(row_stride, V, M, "row_stride");
  if (M > 0) {
    require_ptr(logits, "logits");
    require_ptr(targets, "targets");
    require_ptr(lse, "lse");
  }
}

}  // namespace

void cross_entropy_fwd(uptr logits, int64_t row_stride, uptr targets, uptr loss, uptr lse, int64_t M, int64_t V,
                       int64_t ignore_index, int dtype_code, int num_sms, uptr stream) {
  const DType dtype = half_dtype(dtype_code, "dtype");
  check_ce(logits, row_stride, targets, lse, M, V, num_sms);
  if (M == 0) return;
  require_ptr(loss, "loss");
  const int vec = pick_vec({V, row_stride}, {{logits, 2}});
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      auto kernel = cross_entropy_fwd_kernel<T, VEC>;
      kernel<<<resident_grid(kernel, kCeThreads, 0, M, num_sms), kCeThreads, 0, as_stream(stream)>>>(
          as_ptr<const T>(logits), row_stride, as_ptr<const int64_t>(targets), as_ptr<float>(loss), as_ptr<float>(lse),
          M, static_cast<int>(V), ignore_index);
      L3K_CHECK_LAUNCH("cross_entropy_fwd");
    });
  });
}

void cross_entropy_bwd(uptr grad, uptr logits, int64_t row_stride, uptr targets, uptr lse, uptr dlogits, int64_t M,
                       int64_t V, int64_t ignore_index, int dtype_code, int num_sms, uptr stream) {
  const DType dtype = half_dtype(dtype_code, "dtype");
  check_ce(logits, row_stride, targets, lse, M, V, num_sms);
  if (M == 0) return;
  require_ptr(grad, "grad");
  require_ptr(dlogits, "dlogits");
  const int vec = pick_vec({V, row_stride}, {{logits, 2}, {dlogits, 2}});
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      auto kernel = cross_entropy_bwd_kernel<T, VEC>;
      const int64_t tiles_per_row = ceil_div(V / VEC, kCeThreads * kCeUnroll);
      const int grid = resident_grid(kernel, kCeThreads, 0, M * tiles_per_row, num_sms);
      kernel<<<grid, kCeThreads, 0, as_stream(stream)>>>(as_ptr<const float>(grad), as_ptr<const T>(logits), row_stride,
                                                        as_ptr<const int64_t>(targets), as_ptr<const float>(lse),
                                                        as_ptr<T>(dlogits), M, static_cast<int>(V), ignore_index,
                                                        tiles_per_row);
      L3K_CHECK_LAUNCH("cross_entropy_bwd");
    });
  });
}

}  // namespace l3k::norm
