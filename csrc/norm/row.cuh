// Device and host helpers shared by the norm family's kernels (RMSNorm, SwiGLU, FP8 row-wise quantization):
// vector loads/stores, dtype conversions, the FP8 scale rule, the row-group reduction, and the launch plan
// of the "one row per group of threads, row held in registers" kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "common.h"

namespace l3k::norm {

constexpr float kFp8Max = 448.0f;
constexpr float kFp8MinScale = static_cast<float>(1.0 / (448.0 * 512.0));  // the reference's double, rounded once
constexpr int kMaxVec = 8;            // 8 x 16-bit = one 16-byte load
constexpr int kMinCtaThreads = 128;   // narrow rows pack several row groups into one CTA

// ------------------------------------------------------------------------------------ conversions
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// --------------------------------------------------------------------------------- vector access
template <int BYTES> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = uint32_t; };
template <> struct RawOf<2> { using type = uint16_t; };
template <> struct RawOf<1> { using type = uint8_t; };

// VEC consecutive elements, aligned so that they move as one (up to 16-byte) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC < 16 ? sizeof(T) * VEC : 16) Vec {
  T v[VEC];
};

// Loads/stores VEC elements at p (aligned to sizeof(T) * VEC, or 16 bytes when larger) in 16-byte pieces.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  constexpr int kBytes = sizeof(T) * VEC, kPiece = kBytes < 16 ? kBytes : 16;
  using Raw = typename RawOf<kPiece>::type;
  Vec<T, VEC> out;
#pragma unroll
  for (int i = 0; i < kBytes / kPiece; ++i) reinterpret_cast<Raw*>(&out)[i] = reinterpret_cast<const Raw*>(p)[i];
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& in) {
  constexpr int kBytes = sizeof(T) * VEC, kPiece = kBytes < 16 ? kBytes : 16;
  using Raw = typename RawOf<kPiece>::type;
#pragma unroll
  for (int i = 0; i < kBytes / kPiece; ++i) reinterpret_cast<Raw*>(p)[i] = reinterpret_cast<const Raw*>(&in)[i];
}

template <typename T, int VEC>
__device__ __forceinline__ void load_float(const T* p, float (&out)[VEC]) {
  const Vec<T, VEC> v = load_vec<T, VEC>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f(v.v[i]);
}

// The weight's dtype is a runtime value (fp32 master weights or 16-bit): a uniform branch, cheap next to
// three times as many kernel instantiations. Weight reads hit L1/L2 after the first row.
template <int VEC>
__device__ __forceinline__ void load_weight(const void* w, DType dt, int64_t col, float (&out)[VEC]) {
  if (dt == DType::F32) {
    load_float<float, VEC>(static_cast<const float*>(w) + col, out);
  } else if (dt == DType::BF16) {
    load_float<__nv_bfloat16, VEC>(static_cast<const __nv_bfloat16*>(w) + col, out);
  } else {
    load_float<__half, VEC>(static_cast<const __half*>(w) + col, out);
  }
}

// ------------------------------------------------------------------------------------------- fp8
// |v| as bits: for non-negative floats the unsigned order is the float order, and a NaN (any payload)
// compares above +inf, so an integer max is an amax that propagates NaN like torch.amax.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(fabsf(v)); }

// scale = max(min(amax, ub) / 448, 1 / (448 * 512)) in IEEE fp32; the comparisons keep a NaN amax NaN
// (torch.clamp semantics) so a NaN row never yields a finite scale.
__device__ __forceinline__ float fp8_scale(uint32_t amax_bits, float amax_ub) {
  const float amax = __uint_as_float(amax_bits);
  const float bounded = amax > amax_ub ? amax_ub : amax;
  const float s = __fdiv_rn(bounded, kFp8Max);
  return s < kFp8MinScale ? kFp8MinScale : s;
}

// q = e4m3(clamp(y * inv, +-448)): the satfinite conversion rounds to nearest even and saturates finite and
// infinite values to +-448 (the reference's clamp), and keeps NaN NaN.
template <int VEC>
__device__ __forceinline__ void store_fp8(uint8_t* q, const float (&y)[VEC], float inv) {
  Vec<uint8_t, VEC> out;
  if constexpr (VEC == 1) {
    out.v[0] = __nv_cvt_float_to_fp8(y[0] * inv, __NV_SATFINITE, __NV_E4M3);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      const __nv_fp8x2_storage_t two =
          __nv_cvt_float2_to_fp8x2(make_float2(y[i] * inv, y[i + 1] * inv), __NV_SATFINITE, __NV_E4M3);
      out.v[i] = static_cast<uint8_t>(two & 0xff);  // .x is the low byte
      out.v[i + 1] = static_cast<uint8_t>(two >> 8);
    }
  }
  store_vec<uint8_t, VEC>(q, out);
}

// ------------------------------------------------------------------------------------ reductions
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a > b ? a : b; }
};

// Reduces v over the `tpr` threads of a row group (tpr a multiple of 32, groups contiguous in the CTA);
// every thread of the group gets the result. `red` has a slot per warp. Must be reached by the whole CTA.
template <typename V, typename Op>
__device__ __forceinline__ V group_reduce(V v, V* red, int tpr, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (tpr == 32) return v;
  const int warp = threadIdx.x / 32, wpg = tpr / 32, first = warp - warp % wpg;
  if (threadIdx.x % 32 == 0) red[warp] = v;
  __syncthreads();
  v = red[first];
  for (int i = 1; i < wpg; ++i) v = op(v, red[first + i]);
  __syncthreads();  // red is reused by the next reduction
  return v;
}

// ----------------------------------------------------------------------------------- host: plans
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest vector width (8, 4, 2, 1 elements) dividing every length/stride in `counts` and keeping every
// (address, element size) in `ptrs` aligned to a whole vector.
inline int pick_vec(std::initializer_list<int64_t> counts, std::initializer_list<std::pair<std::uintptr_t, int>> ptrs) {
  for (int vec = kMaxVec; vec > 1; vec /= 2) {
    bool ok = true;
    for (int64_t c : counts) ok = ok && c % vec == 0;
    for (auto [addr, size] : ptrs) ok = ok && addr % std::min<std::uintptr_t>(16, std::uintptr_t(vec) * size) == 0;
    if (ok) return vec;
  }
  return 1;
}

// A persistent grid: `work` CTAs' worth of items, but at most as many CTAs of `threads` threads (and `smem` bytes of
// dynamic shared memory) as fit on the device at once; at least 1.
template <typename Kernel>
int resident_grid(Kernel kernel, int threads, size_t smem, int64_t work, int num_sms) {
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem), "occupancy query");
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, int64_t(num_sms) * std::max(per_sm, 1))));
}

// One row per group of `tpr` threads, `rpc` groups per CTA, a persistent grid of at most the resident CTAs.
struct RowPlan {
  int tpr, rpc, threads, grid;
};

template <typename Kernel>
RowPlan plan_rows(Kernel kernel, int64_t M, int64_t nvec, int reg_vecs, int max_threads, int num_sms) {
  RowPlan p{};
  p.tpr = static_cast<int>(std::clamp<int64_t>(ceil_div(ceil_div(nvec, reg_vecs), 32) * 32, 32, max_threads));
  p.rpc = std::max(1, kMinCtaThreads / p.tpr);
  p.threads = p.tpr * p.rpc;
  p.grid = resident_grid(kernel, p.threads, 0, ceil_div(M, p.rpc), num_sms);
  return p;
}

// Calls f(T{}) with T the 16-bit activation type of `dtype` (checked by the caller).
template <typename F>
void dispatch_half(DType dtype, F&& f) {
  if (dtype == DType::BF16) f(__nv_bfloat16{});
  else f(__half{});
}

// Calls f(std::integral_constant<int, vec>{}).
template <typename F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// --------------------------------------------------------------------------------- host: checks
inline DType half_dtype(int code, const char* arg) {
  const DType dt = to_dtype(code, arg);
  require(dt == DType::F16 || dt == DType::BF16, arg, "expected f16 (1) or bf16 (2), got code " + std::to_string(code));
  return dt;
}

inline DType weight_dtype(int code, const char* arg) {
  const DType dt = to_dtype(code, arg);
  require(dt != DType::E4M3, arg, "expected f32, f16 or bf16, got e4m3");
  return dt;
}

inline int dtype_size(DType dt) { return dt == DType::F32 ? 4 : dt == DType::E4M3 ? 1 : 2; }

inline void require_ptr(std::uintptr_t p, const char* arg) { require(p != 0, arg, "expected a device pointer, got null"); }

inline void require_sizes(int64_t M, int64_t N, int num_sms, const char* n_arg) {
  require(M >= 0, "M", "expected >= 0, got " + std::to_string(M));
  require(N >= 0 && N < (int64_t(1) << 31), n_arg, "expected 0 <= N < 2^31, got " + std::to_string(N));
  require(num_sms > 0, "num_sms", "expected > 0, got " + std::to_string(num_sms));
}

inline void require_stride(int64_t stride, int64_t N, int64_t M, const char* arg) {
  require(M <= 1 || stride >= N, arg, "expected a row stride >= " + std::to_string(N) + ", got " + std::to_string(stride));
}

}  // namespace l3k::norm

namespace l3k::norm {

// ------------------------------------------------------------------ row-wise FP8 quantization kernel
// Quantizes the rows produced by `Src`: src.fetch<VEC>(row, j) loads vector j of `row` (a Src::Raw<VEC>),
// src.convert<VEC>(raw, y) turns it into fp32 values. The row is computed once into registers (kQuantRegVecs
// vectors a thread, wider rows recompute the rest), its amax reduced across the group, then scaled and cast. q is dense [M, N] e4m3, scale [M] fp32. Every fetch of the register part is
// issued before any convert: with fetch and math in one guarded loop the SASS issued one vector's loads per
// basic block, a dependent HBM round trip each.
constexpr int kQuantRegVecs = 4;
constexpr int kQuantMaxThreads = 512;  // a 128-register cap: the raw vectors and their fp32 values both stay live

template <typename Src, int VEC>
__global__ void __launch_bounds__(kQuantMaxThreads)
    row_fp8_kernel(const Src src, uint8_t* q, float* scale, int64_t M, int N, float amax_ub, int tpr, int rpc) {
  constexpr int K = kQuantRegVecs;
  __shared__ uint32_t red[32];
  const int t = threadIdx.x % tpr, group = threadIdx.x / tpr, nvec = N / VEC;
  for (int64_t row0 = int64_t(blockIdx.x) * rpc; row0 < M; row0 += int64_t(gridDim.x) * rpc) {
    const int64_t row = row0 + group;
    const bool valid = row < M;
    float y[K][VEC];
    uint32_t amax = 0;
    {
      typename Src::template Raw<VEC> raw[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = t + k * tpr;
        if (valid && j < nvec) raw[k] = src.template fetch<VEC>(row, j);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = t + k * tpr;
        if (valid && j < nvec) {
          src.template convert<VEC>(raw[k], y[k]);
#pragma unroll
          for (int i = 0; i < VEC; ++i) amax = max(amax, abs_bits(y[k][i]));
        }
      }
    }
    for (int j = t + K * tpr; valid && j < nvec; j += tpr) {
      float yj[VEC];
      src.template convert<VEC>(src.template fetch<VEC>(row, j), yj);
#pragma unroll
      for (int i = 0; i < VEC; ++i) amax = max(amax, abs_bits(yj[i]));
    }
    amax = group_reduce(amax, red, tpr, MaxOp{});
    const float s = fp8_scale(amax, amax_ub);
    const float inv = __fdiv_rn(1.0f, s);  // the reference multiplies by 1 / scale, an IEEE division
    if (valid && t == 0) scale[row] = s;
    uint8_t* qrow = q + row * N;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = t + k * tpr;
      if (valid && j < nvec) store_fp8<VEC>(qrow + int64_t(j) * VEC, y[k], inv);
    }
    for (int j = t + K * tpr; valid && j < nvec; j += tpr) {
      float yj[VEC];
      src.template convert<VEC>(src.template fetch<VEC>(row, j), yj);
      store_fp8<VEC>(qrow + int64_t(j) * VEC, yj, inv);
    }
  }
}

// Launches row_fp8_kernel<Src, VEC> over M rows of N columns.
template <typename Src, int VEC>
void launch_row_fp8(const Src& src, std::uintptr_t q, std::uintptr_t scale, int64_t M, int64_t N, double amax_ub,
                    int num_sms, cudaStream_t stream, const char* name) {
  auto kernel = row_fp8_kernel<Src, VEC>;
  const RowPlan plan = plan_rows(kernel, M, N / VEC, kQuantRegVecs, kQuantMaxThreads, num_sms);
  kernel<<<plan.grid, plan.threads, 0, stream>>>(src, as_ptr<uint8_t>(q), as_ptr<float>(scale), M, int(N),
                                                 float(amax_ub), plan.tpr, plan.rpc);
  L3K_CHECK_LAUNCH(name);
}

}  // namespace l3k::norm
