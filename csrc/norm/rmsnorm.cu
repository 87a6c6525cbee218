// RMSNorm forward (optionally fused with the residual add, optionally emitting row-wise FP8) and backward.
// One row per group of threads: the row is read from HBM once into registers (kFwdRegVecs 16-byte vectors a
// thread; wider rows re-read the rest, which L2 still holds), reduced across the group, then written.
// Backward accumulates dW per thread in registers over the rows of a persistent CTA, writes one fp32 partial
// row per row group, and a small kernel sums the partials: scratch is bounded by the grid, never by M.
#include <cmath>

#include "norm/norm.h"
#include "norm/row.cuh"

namespace l3k::norm {
namespace {

// Vectors of the row a forward thread keeps (raw 16-bit). Tried on an H200 (2026-11-27): eight (512-thread CTAs,
// 108 registers, no spills) ran the plain forward 16384 x 8192 in 0.225 ms against ~0.17 and the residual form
// 0.32 against 0.27; fp32 weights preloaded into registers need the same 108. (Pass 1 below says what the
// plain form's gap to Liger turned out to be.)
constexpr int kFwdRegVecs = 4;
constexpr int kBwdRegVecs = 4;   // the backward also keeps dy and an fp32 dW accumulator per vector,
constexpr int kBwdMaxThreads = 512;  // so it trades threads for registers (<= 128 a thread, no spills)
constexpr int kMaxThreads = 1024;

struct FwdParams {
  const void* x;
  int64_t x_stride;
  const void* res;  // null without residual
  int64_t res_stride;
  const void* w;
  DType w_dtype;
  void* y;          // rms_norm_fwd: [M, N] in T
  void* h_out;      // [M, N] in T, with a residual
  float* rstd;      // rms_norm_fwd: [M]
  uint8_t* q;       // rms_norm_fp8_fwd: [M, N] e4m3
  float* scale;     // rms_norm_fp8_fwd: [M]
  int64_t M;
  int N;
  float eps, amax_ub;
  int tpr, rpc;
};

// h = x (+ r rounded to T, stored to h_out) for vector j of a row.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_h(const T* x, const T* r, T* h_out, int j) {
  Vec<T, VEC> h = load_vec<T, VEC>(x + int64_t(j) * VEC);
  if (r != nullptr) {
    const Vec<T, VEC> rv = load_vec<T, VEC>(r + int64_t(j) * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) h.v[i] = from_f<T>(to_f(h.v[i]) + to_f(rv.v[i]));
    store_vec<T, VEC>(h_out + int64_t(j) * VEC, h);
  }
  return h;
}

template <typename T, int VEC>
__device__ __forceinline__ float sum_squares(const Vec<T, VEC>& h) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) s += to_f(h.v[i]) * to_f(h.v[i]);
  return s;
}

// y = h * rstd * w in fp32, the reference's order of operations.
template <typename T, int VEC>
__device__ __forceinline__ void normalize(const Vec<T, VEC>& h, float rstd, const FwdParams& p, int j, float (&y)[VEC]) {
  float w[VEC];
  load_weight<VEC>(p.w, p.w_dtype, int64_t(j) * VEC, w);
#pragma unroll
  for (int i = 0; i < VEC; ++i) y[i] = to_f(h.v[i]) * rstd * w[i];
}

template <typename T, int VEC, bool FP8, bool RES>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_fwd_kernel(const FwdParams p) {
  constexpr int K = kFwdRegVecs;
  __shared__ float red_sum[32];
  __shared__ uint32_t red_max[32];
  const int t = threadIdx.x % p.tpr, group = threadIdx.x / p.tpr, nvec = p.N / VEC;
  for (int64_t row0 = int64_t(blockIdx.x) * p.rpc; row0 < p.M; row0 += int64_t(gridDim.x) * p.rpc) {
    const int64_t row = row0 + group;
    const bool valid = row < p.M;
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
    const T* r = RES ? static_cast<const T*>(p.res) + row * p.res_stride : nullptr;
    T* h_out = RES ? static_cast<T*>(p.h_out) + row * p.N : nullptr;
    // After pass 1, the residual form re-reads h from h_out (this thread wrote it), the plain form from x.
    const T* h_again = RES ? h_out : x;

    // Pass 1: the row into registers, sum of squares in fp32. The plain form issues all K loads before any use.
    // It used to share the residual form's loop, where load_h's possible store to h_out (which may alias x as
    // far as the compiler knows) kept the next load from being hoisted: the K loads of a row went out one round
    // trip at a time (16384 x 4096 at 3.05 TB/s on an H200, where Liger reaches 3.9). The residual form keeps
    // that loop: its two loads a step already reached 3.84-3.92 TB/s, and hoisting both would spill.
    Vec<T, VEC> hv[K];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = t + k * p.tpr;
      if constexpr (RES) {
        if (valid && j < nvec) hv[k] = load_h<T, VEC>(x, r, h_out, j);
      } else {
        if (valid && j < nvec) hv[k] = load_vec<T, VEC>(x + int64_t(j) * VEC);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = t + k * p.tpr;
      if (valid && j < nvec) ss += sum_squares(hv[k]);
    }
    for (int j = t + K * p.tpr; valid && j < nvec; j += p.tpr) ss += sum_squares(load_h<T, VEC>(x, r, h_out, j));
    ss = group_reduce(ss, red_sum, p.tpr, SumOp{});
    const float rstd = 1.0f / sqrtf(ss / float(p.N) + p.eps);

    if constexpr (!FP8) {
      T* y = static_cast<T*>(p.y) + row * p.N;
      auto emit = [&](const Vec<T, VEC>& h, int j) {
        float yf[VEC];
        normalize(h, rstd, p, j, yf);
        Vec<T, VEC> out;
#pragma unroll
        for (int i = 0; i < VEC; ++i) out.v[i] = from_f<T>(yf[i]);
        store_vec<T, VEC>(y + int64_t(j) * VEC, out);
      };
      if (valid && t == 0) p.rstd[row] = rstd;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = t + k * p.tpr;
        if (valid && j < nvec) emit(hv[k], j);
      }
      for (int j = t + K * p.tpr; valid && j < nvec; j += p.tpr) emit(load_vec<T, VEC>(h_again + int64_t(j) * VEC), j);
    } else {
      // Pass 2: amax of y (recomputed rather than kept: registers are the budget), then scale and cast.
      uint32_t amax = 0;
      auto absmax = [&](const Vec<T, VEC>& h, int j) {
        float yf[VEC];
        normalize(h, rstd, p, j, yf);
#pragma unroll
        for (int i = 0; i < VEC; ++i) amax = max(amax, abs_bits(yf[i]));
      };
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = t + k * p.tpr;
        if (valid && j < nvec) absmax(hv[k], j);
      }
      for (int j = t + K * p.tpr; valid && j < nvec; j += p.tpr) absmax(load_vec<T, VEC>(h_again + int64_t(j) * VEC), j);
      amax = group_reduce(amax, red_max, p.tpr, MaxOp{});
      const float scale = fp8_scale(amax, p.amax_ub);
      const float inv = __fdiv_rn(1.0f, scale);
      if (valid && t == 0) p.scale[row] = scale;
      uint8_t* q = p.q + row * p.N;
      auto emit = [&](const Vec<T, VEC>& h, int j) {
        float yf[VEC];
        normalize(h, rstd, p, j, yf);
        store_fp8<VEC>(q + int64_t(j) * VEC, yf, inv);
      };
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = t + k * p.tpr;
        if (valid && j < nvec) emit(hv[k], j);
      }
      for (int j = t + K * p.tpr; valid && j < nvec; j += p.tpr) emit(load_vec<T, VEC>(h_again + int64_t(j) * VEC), j);
    }
  }
}

struct BwdParams {
  const void* dy;
  const void* h;
  const void* w;
  DType w_dtype;
  const float* rstd;
  const void* dh;  // null when no gradient flows into the residual output
  void* dx;
  float* partial;  // [grid * rpc, N] fp32: one dW partial row per row group
  int64_t M;
  int N;
  int tpr, rpc;
};

// Element i of a 16-bit vector in fp32, read through its 32-bit word: a bf16 is the word shifted or masked (what
// cvt.f32.bf16 compiles to), a half goes through __half2float. Written as to_f(v.v[i]), the conditionally loaded
// register vectors of the backward became one 16-bit value a register (PRMT-extracted high halves), and those
// halves were what the bf16 x8 kernel spilled.
template <typename T, int VEC>
__device__ __forceinline__ float elem_f(const Vec<T, VEC>& v, int i) {
  if constexpr (VEC == 1) {
    return to_f(v.v[0]);
  } else {
    const uint32_t word = reinterpret_cast<const uint32_t*>(&v)[i / 2];
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __uint_as_float(i % 2 ? word & 0xffff0000u : word << 16);
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(i % 2 ? word >> 16 : word & 0xffffu)));
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdMaxThreads) rms_norm_bwd_kernel(const BwdParams p) {
  constexpr int K = kBwdRegVecs;
  __shared__ float red[32];
  const int t = threadIdx.x % p.tpr, group = threadIdx.x / p.tpr, nvec = p.N / VEC;
  const int64_t first_row = int64_t(blockIdx.x) * p.rpc + group;  // this group's rows: first_row + i * stride
  float* part = p.partial + first_row * p.N;
  float dw[K][VEC];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[k][i] = 0.f;

  for (int64_t row0 = int64_t(blockIdx.x) * p.rpc; row0 < p.M; row0 += int64_t(gridDim.x) * p.rpc) {
    const int64_t row = row0 + group;
    const bool valid = row < p.M;
    const T* dy = static_cast<const T*>(p.dy) + row * p.N;
    const T* h = static_cast<const T*>(p.h) + row * p.N;
    const float rstd = valid ? p.rstd[row] : 0.f;

    // Pass 1: s = sum(g * xhat) with g = dy * w; dW += dy * xhat (registers, or this group's partial row).
    // Every dy and h load of the register part goes out first: with the loads inside the loop below, the weight
    // load's dtype branches kept the compiler from hoisting the next vector's loads above this vector's math, so a
    // row took K dependent HBM round trips (seen in the SASS: one LDG group per vector, ~200 instructions apart).
    Vec<T, VEC> dyv[K], hv[K];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = t + k * p.tpr;
      if (valid && j < nvec) {
        dyv[k] = load_vec<T, VEC>(dy + int64_t(j) * VEC);
        hv[k] = load_vec<T, VEC>(h + int64_t(j) * VEC);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = t + k * p.tpr;
      if (valid && j < nvec) {
        float w[VEC];
        load_weight<VEC>(p.w, p.w_dtype, int64_t(j) * VEC, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = elem_f(dyv[k], i), xhat = elem_f(hv[k], i) * rstd;
          s += d * w[i] * xhat;
          dw[k][i] += d * xhat;
        }
      }
    }
    for (int j = t + K * p.tpr; valid && j < nvec; j += p.tpr) {
      float d[VEC], hf[VEC], w[VEC];
      load_float<T, VEC>(dy + int64_t(j) * VEC, d);
      load_float<T, VEC>(h + int64_t(j) * VEC, hf);
      load_weight<VEC>(p.w, p.w_dtype, int64_t(j) * VEC, w);
      Vec<float, VEC> acc;
      if (row == first_row) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc.v[i] = 0.f;
      } else {
        acc = load_vec<float, VEC>(part + int64_t(j) * VEC);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xhat = hf[i] * rstd;
        s += d[i] * w[i] * xhat;
        acc.v[i] += d[i] * xhat;
      }
      store_vec<float, VEC>(part + int64_t(j) * VEC, acc);
    }
    s = group_reduce(s, red, p.tpr, SumOp{});
    const float c = s / float(p.N);

    // Pass 2: dx = rstd * (g - xhat * c) (+ dh). Every dh load of the register part goes out before the first dx
    // store: loaded next to each store, no dh load could be hoisted above the previous store (dx may alias dh as
    // far as the compiler knows), so a row took K dependent round trips. Each thread reads only the dh elements it
    // later writes to dx, so loading first is correct even when they alias.
    T* dx = static_cast<T*>(p.dx) + row * p.N;
    const T* dh = p.dh != nullptr ? static_cast<const T*>(p.dh) + row * p.N : nullptr;
    Vec<T, VEC> dhv[K];
    if (dh != nullptr) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = t + k * p.tpr;
        if (valid && j < nvec) dhv[k] = load_vec<T, VEC>(dh + int64_t(j) * VEC);
      }
    }
    auto emit = [&](const Vec<T, VEC>& dyj, const Vec<T, VEC>& hj, const Vec<T, VEC>& dhj, int j) {
      float w[VEC];
      load_weight<VEC>(p.w, p.w_dtype, int64_t(j) * VEC, w);
      Vec<T, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = elem_f(dyj, i) * w[i], xhat = elem_f(hj, i) * rstd;
        const float extra = dh != nullptr ? elem_f(dhj, i) : 0.f;
        out.v[i] = from_f<T>(rstd * (g - xhat * c) + extra);
      }
      store_vec<T, VEC>(dx + int64_t(j) * VEC, out);
    };
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = t + k * p.tpr;
      if (valid && j < nvec) emit(dyv[k], hv[k], dhv[k], j);
    }
    for (int j = t + K * p.tpr; valid && j < nvec; j += p.tpr) {
      const Vec<T, VEC> dhj = dh != nullptr ? load_vec<T, VEC>(dh + int64_t(j) * VEC) : Vec<T, VEC>{};
      emit(load_vec<T, VEC>(dy + int64_t(j) * VEC), load_vec<T, VEC>(h + int64_t(j) * VEC), dhj, j);
    }
  }

  // This group's partial row: register columns always; the rest was written row by row, or is zero when the
  // group had no row at all.
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = t + k * p.tpr;
    if (j < nvec) {
      Vec<float, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) out.v[i] = dw[k][i];
      store_vec<float, VEC>(part + int64_t(j) * VEC, out);
    }
  }
  if (first_row >= p.M) {
    Vec<float, VEC> zero;
#pragma unroll
    for (int i = 0; i < VEC; ++i) zero.v[i] = 0.f;
    for (int j = t + K * p.tpr; j < nvec; j += p.tpr) store_vec<float, VEC>(part + int64_t(j) * VEC, zero);
  }
}

// dw[n] = sum over the P partial rows, cast to the weight's dtype. Block (32, 16): 32 columns, 16 row slices.
template <typename W>
__global__ void __launch_bounds__(512) dw_reduce_kernel(const float* partial, int64_t P, int N, W* dw) {
  __shared__ float acc[16][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < N)
    for (int64_t r = threadIdx.y; r < P; r += 16) s += partial[r * N + col];
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    for (int i = 1; i < 16; ++i) s += acc[i][threadIdx.x];
    dw[col] = from_f<W>(s);
  }
}

void check_fwd_args(uptr x, int64_t x_row_stride, uptr residual, int64_t residual_row_stride, uptr weight, uptr h_out,
                    int64_t M, int64_t N, double eps, int num_sms) {
  require_sizes(M, N, num_sms, "N");
  require(N > 0, "N", "expected > 0, got 0");
  require(eps >= 0 && std::isfinite(eps), "eps", "expected a finite value >= 0, got " + std::to_string(eps));
  if (M == 0) return;  // empty tensors may have null data pointers
  require_ptr(x, "x");
  require_ptr(weight, "weight");
  require_stride(x_row_stride, N, M, "x_row_stride");
  if (residual != 0) {
    require_stride(residual_row_stride, N, M, "residual_row_stride");
    require_ptr(h_out, "h_out");
  }
}

template <bool FP8>
void launch_fwd(FwdParams p, DType dtype, int64_t M, int64_t N, int vec, int num_sms, cudaStream_t stream) {
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      auto kernel = p.res != nullptr ? rms_norm_fwd_kernel<T, V, FP8, true> : rms_norm_fwd_kernel<T, V, FP8, false>;
      const RowPlan plan = plan_rows(kernel, M, N / V, kFwdRegVecs, kMaxThreads, num_sms);
      p.tpr = plan.tpr;
      p.rpc = plan.rpc;
      kernel<<<plan.grid, plan.threads, 0, stream>>>(p);
      L3K_CHECK_LAUNCH(FP8 ? "rms_norm_fp8_fwd" : "rms_norm_fwd");
    });
  });
}

// The fields both forward launchers share; each adds its outputs.
FwdParams fwd_params(uptr x, int64_t x_row_stride, uptr residual, int64_t residual_row_stride, uptr weight, DType wdt,
                     uptr h_out, int64_t M, int64_t N, double eps) {
  FwdParams p{};
  p.x = as_ptr<const void>(x);
  p.x_stride = x_row_stride;
  p.res = as_ptr<const void>(residual);
  p.res_stride = residual_row_stride;
  p.w = as_ptr<const void>(weight);
  p.w_dtype = wdt;
  p.h_out = as_ptr<void>(h_out);
  p.M = M;
  p.N = static_cast<int>(N);
  p.eps = static_cast<float>(eps);
  return p;
}

}  // namespace

void rms_norm_fwd(uptr x, int64_t x_row_stride, uptr residual, int64_t residual_row_stride, uptr weight,
                  int weight_dtype_code, uptr y, uptr h_out, uptr rstd, int64_t M, int64_t N, double eps, int dtype_code,
                  int num_sms, uptr stream) {
  const DType dtype = half_dtype(dtype_code, "dtype");
  const DType wdt = weight_dtype(weight_dtype_code, "weight_dtype");
  check_fwd_args(x, x_row_stride, residual, residual_row_stride, weight, h_out, M, N, eps, num_sms);
  if (M == 0) return;
  require_ptr(y, "y");
  require_ptr(rstd, "rstd");
  const int vec = pick_vec({N, x_row_stride, residual_row_stride},
                           {{x, 2}, {residual, 2}, {weight, dtype_size(wdt)}, {y, 2}, {h_out, 2}});
  FwdParams p = fwd_params(x, x_row_stride, residual, residual_row_stride, weight, wdt, h_out, M, N, eps);
  p.y = as_ptr<void>(y);
  p.rstd = as_ptr<float>(rstd);
  launch_fwd<false>(p, dtype, M, N, vec, num_sms, as_stream(stream));
}

void rms_norm_fp8_fwd(uptr x, int64_t x_row_stride, uptr residual, int64_t residual_row_stride, uptr weight,
                      int weight_dtype_code, uptr q, uptr scale, uptr h_out, int64_t M, int64_t N, double eps,
                      double amax_ub, int dtype_code, int num_sms, uptr stream) {
  const DType dtype = half_dtype(dtype_code, "dtype");
  const DType wdt = weight_dtype(weight_dtype_code, "weight_dtype");
  check_fwd_args(x, x_row_stride, residual, residual_row_stride, weight, h_out, M, N, eps, num_sms);
  require(amax_ub > 0, "amax_ub", "expected > 0, got " + std::to_string(amax_ub));
  if (M == 0) return;
  require_ptr(q, "q");
  require_ptr(scale, "scale");
  const int vec = pick_vec({N, x_row_stride, residual_row_stride},
                           {{x, 2}, {residual, 2}, {weight, dtype_size(wdt)}, {q, 1}, {h_out, 2}});
  FwdParams p = fwd_params(x, x_row_stride, residual, residual_row_stride, weight, wdt, h_out, M, N, eps);
  p.q = as_ptr<uint8_t>(q);
  p.scale = as_ptr<float>(scale);
  p.amax_ub = static_cast<float>(amax_ub);
  launch_fwd<true>(p, dtype, M, N, vec, num_sms, as_stream(stream));
}

void rms_norm_bwd(uptr dy, uptr h, uptr weight, int weight_dtype_code, uptr rstd, uptr dh, uptr dx, uptr dw,
                  uptr dw_partial, int64_t partial_rows, int64_t M, int64_t N, int dtype_code, int num_sms,
                  uptr stream) {
  const DType dtype = half_dtype(dtype_code, "dtype");
  const DType wdt = weight_dtype(weight_dtype_code, "weight_dtype");
  require_sizes(M, N, num_sms, "N");
  require(N > 0, "N", "expected > 0, got 0");
  require_ptr(weight, "weight");
  require_ptr(dw, "dw");
  require_ptr(dw_partial, "dw_partial");
  require(partial_rows >= 1, "partial_rows", "expected >= 1, got " + std::to_string(partial_rows));
  if (M > 0) {
    for (auto [p, name] : {std::pair{dy, "dy"}, {h, "h"}, {rstd, "rstd"}, {dx, "dx"}}) require_ptr(p, name);
  }
  const cudaStream_t s = as_stream(stream);
  int64_t used_rows = 0;  // partial rows written by the main kernel
  if (M > 0) {
    const int vec = pick_vec({N}, {{dy, 2}, {h, 2}, {dh, 2}, {dx, 2}, {weight, dtype_size(wdt)}, {dw_partial, 4}});
    BwdParams p{};
    p.dy = as_ptr<const void>(dy);
    p.h = as_ptr<const void>(h);
    p.w = as_ptr<const void>(weight);
    p.w_dtype = wdt;
    p.rstd = as_ptr<const float>(rstd);
    p.dh = as_ptr<const void>(dh);
    p.dx = as_ptr<void>(dx);
    p.partial = as_ptr<float>(dw_partial);
    p.M = M;
    p.N = static_cast<int>(N);
    dispatch_half(dtype, [&](auto tag) {
      using T = decltype(tag);
      dispatch_vec(vec, [&](auto v) {
        constexpr int V = decltype(v)::value;
        auto kernel = rms_norm_bwd_kernel<T, V>;
        RowPlan plan = plan_rows(kernel, M, N / V, kBwdRegVecs, kBwdMaxThreads, num_sms);
        require(partial_rows >= plan.rpc, "partial_rows",
                "expected >= " + std::to_string(plan.rpc) + ", got " + std::to_string(partial_rows));
        plan.grid = static_cast<int>(std::min<int64_t>(plan.grid, partial_rows / plan.rpc));  // fewer CTAs, same rows
        p.tpr = plan.tpr;
        p.rpc = plan.rpc;
        kernel<<<plan.grid, plan.threads, 0, s>>>(p);
        L3K_CHECK_LAUNCH("rms_norm_bwd");
        used_rows = int64_t(plan.grid) * plan.rpc;
      });
    });
  }
  const dim3 block(32, 16), grid(static_cast<unsigned>(ceil_div(N, 32)));
  const float* partial = as_ptr<const float>(dw_partial);
  if (wdt == DType::F32) dw_reduce_kernel<float><<<grid, block, 0, s>>>(partial, used_rows, int(N), as_ptr<float>(dw));
  else if (wdt == DType::BF16)
    dw_reduce_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(partial, used_rows, int(N), as_ptr<__nv_bfloat16>(dw));
  else dw_reduce_kernel<__half><<<grid, block, 0, s>>>(partial, used_rows, int(N), as_ptr<__half>(dw));
  L3K_CHECK_LAUNCH("rms_norm_bwd (dw reduction)");
}

}  // namespace l3k::norm
