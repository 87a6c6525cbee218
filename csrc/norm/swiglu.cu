// SwiGLU, silu(gate) * up in fp32: forward, backward, and the forward fused with row-wise FP8 quantization.
// gate and up rows may be strided (the halves of a fused [M, 2F] gate-up tensor). Forward and backward are
// elementwise: a persistent grid walks (row, column tile) pairs, each thread moving kUnroll 16-byte vectors
// per tensor with all loads issued before the math.
#include "norm/norm.h"
#include "norm/row.cuh"

namespace l3k::norm {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// sigmoid(g) as 1 / (1 + exp(-g)), full-precision expf and an IEEE division: the fp8 form's scale is compared
// with the reference's to 1e-6.
__device__ __forceinline__ float sigmoid(float g) { return __fdiv_rn(1.0f, 1.0f + expf(-g)); }

// The 16-bit forward and backward use the hardware exp2 and reciprocal (~2e-7 relative for |g| < 8, |g|·6e-8
// beyond): far below one bf16 / fp16 ulp. The IEEE form made the forward issue-bound on an H200 (3.1 TB/s,
// copy 4.25): expf's range reduction and the division's Newton steps cost ~30 instructions an element.
__device__ __forceinline__ float fast_sigmoid(float g) { return __fdividef(1.0f, 1.0f + __expf(-g)); }

struct EltParams {
  const void* gate;
  int64_t gate_stride;
  const void* up;
  int64_t up_stride;
  const void* dy;  // backward: [M, F] dense
  void* out0;      // forward: y; backward: dgate (dense)
  void* out1;      // backward: dup (dense)
  int64_t M;
  int F;
  int64_t tiles_per_row;
};

template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(kThreads) swiglu_kernel(const EltParams p) {
  const int nvec = p.F / VEC;
  const int64_t tiles = p.M * p.tiles_per_row;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / p.tiles_per_row;
    const int j0 = int(tile - row * p.tiles_per_row) * (kThreads * kUnroll) + threadIdx.x;
    const T* gate = static_cast<const T*>(p.gate) + row * p.gate_stride;
    const T* up = static_cast<const T*>(p.up) + row * p.up_stride;
    const int64_t dense = row * p.F;
    Vec<T, VEC> gv[kUnroll], uv[kUnroll], dv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kThreads;
      if (j < nvec) {
        gv[u] = load_vec<T, VEC>(gate + int64_t(j) * VEC);
        uv[u] = load_vec<T, VEC>(up + int64_t(j) * VEC);
        if constexpr (BWD) dv[u] = load_vec<T, VEC>(static_cast<const T*>(p.dy) + dense + int64_t(j) * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kThreads;
      if (j >= nvec) continue;
      const int64_t at = dense + int64_t(j) * VEC;
      if constexpr (!BWD) {
        Vec<T, VEC> y;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g = to_f(gv[u].v[i]);
          y.v[i] = from_f<T>(g * fast_sigmoid(g) * to_f(uv[u].v[i]));
        }
        store_vec<T, VEC>(static_cast<T*>(p.out0) + at, y);
      } else {
        Vec<T, VEC> dg, du;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g = to_f(gv[u].v[i]), up_f = to_f(uv[u].v[i]), d = to_f(dv[u].v[i]), s = fast_sigmoid(g);
          dg.v[i] = from_f<T>(d * up_f * s * (1.0f + g * (1.0f - s)));
          du.v[i] = from_f<T>(d * g * s);
        }
        store_vec<T, VEC>(static_cast<T*>(p.out0) + at, dg);
        store_vec<T, VEC>(static_cast<T*>(p.out1) + at, du);
      }
    }
  }
}

template <bool BWD>
void launch_elementwise(EltParams p, DType dtype, int vec, int num_sms, cudaStream_t stream, const char* name) {
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      auto kernel = swiglu_kernel<T, V, BWD>;
      p.tiles_per_row = ceil_div(p.F / V, kThreads * kUnroll);
      const int grid = resident_grid(kernel, kThreads, 0, p.M * p.tiles_per_row, num_sms);
      kernel<<<grid, kThreads, 0, stream>>>(p);
      L3K_CHECK_LAUNCH(name);
    });
  });
}

void check_gate_up(uptr gate, int64_t gate_row_stride, uptr up, int64_t up_row_stride, int64_t M, int64_t F,
                   int num_sms) {
  require_sizes(M, F, num_sms, "F");
  require_stride(gate_row_stride, F, M, "gate_row_stride");
  require_stride(up_row_stride, F, M, "up_row_stride");
  if (M > 0 && F > 0) {
    require_ptr(gate, "gate");
    require_ptr(up, "up");
  }
}

// silu(gate) * up of a row as fp32, for the quantization kernel (the Src concept of row_fp8_kernel, norm/row.cuh).
template <typename T>
struct SwigluRows {
  const T* gate;
  int64_t gate_stride;
  const T* up;
  int64_t up_stride;
  template <int VEC>
  struct Raw {
    Vec<T, VEC> g, u;
  };
  template <int VEC>
  __device__ __forceinline__ Raw<VEC> fetch(int64_t row, int j) const {
    return {load_vec<T, VEC>(gate + row * gate_stride + int64_t(j) * VEC),
            load_vec<T, VEC>(up + row * up_stride + int64_t(j) * VEC)};
  }
  template <int VEC>
  __device__ __forceinline__ void convert(const Raw<VEC>& raw, float (&y)[VEC]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float g = to_f(raw.g.v[i]);
      y[i] = g * sigmoid(g) * to_f(raw.u.v[i]);
    }
  }
};

}  // namespace

void swiglu_fwd(uptr gate, int64_t gate_row_stride, uptr up, int64_t up_row_stride, uptr y, int64_t M, int64_t F,
                int dtype_code, int num_sms, uptr stream) {
  const DType dtype = half_dtype(dtype_code, "dtype");
  check_gate_up(gate, gate_row_stride, up, up_row_stride, M, F, num_sms);
  if (M == 0 || F == 0) return;
  require_ptr(y, "y");
  EltParams p{};
  p.gate = as_ptr<const void>(gate);
  p.gate_stride = gate_row_stride;
  p.up = as_ptr<const void>(up);
  p.up_stride = up_row_stride;
  p.out0 = as_ptr<void>(y);
  p.M = M;
  p.F = static_cast<int>(F);
  const int vec = pick_vec({F, gate_row_stride, up_row_stride}, {{gate, 2}, {up, 2}, {y, 2}});
  launch_elementwise<false>(p, dtype, vec, num_sms, as_stream(stream), "swiglu_fwd");
}

void swiglu_bwd(uptr dy, uptr gate, int64_t gate_row_stride, uptr up, int64_t up_row_stride, uptr dgate, uptr dup,
                int64_t M, int64_t F, int dtype_code, int num_sms, uptr stream) {
  const DType dtype = half_dtype(dtype_code, "dtype");
  check_gate_up(gate, gate_row_stride, up, up_row_stride, M, F, num_sms);
  if (M == 0 || F == 0) return;
  require_ptr(dy, "dy");
  require_ptr(dgate, "dgate");
  require_ptr(dup, "dup");
  EltParams p{};
  p.gate = as_ptr<const void>(gate);
  p.gate_stride = gate_row_stride;
  p.up = as_ptr<const void>(up);
  p.up_stride = up_row_stride;
  p.dy = as_ptr<const void>(dy);
  p.out0 = as_ptr<void>(dgate);
  p.out1 = as_ptr<void>(dup);
  p.M = M;
  p.F = static_cast<int>(F);
  const int vec = pick_vec({F, gate_row_stride, up_row_stride}, {{gate, 2}, {up, 2}, {dy, 2}, {dgate, 2}, {dup, 2}});
  launch_elementwise<true>(p, dtype, vec, num_sms, as_stream(stream), "swiglu_bwd");
}

void swiglu_fp8_fwd(uptr gate, int64_t gate_row_stride, uptr up, int64_t up_row_stride, uptr q, uptr scale, int64_t M,
                    int64_t F, double amax_ub, int dtype_code, int num_sms, uptr stream) {
  const DType dtype = half_dtype(dtype_code, "dtype");
  check_gate_up(gate, gate_row_stride, up, up_row_stride, M, F, num_sms);
  require(amax_ub > 0, "amax_ub", "expected > 0, got " + std::to_string(amax_ub));
  if (M == 0) return;
  require_ptr(scale, "scale");
  if (F > 0) require_ptr(q, "q");
  const int vec = pick_vec({F, gate_row_stride, up_row_stride}, {{gate, 2}, {up, 2}, {q, 1}});
  const cudaStream_t s = as_stream(stream);
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    const SwigluRows<T> src{as_ptr<const T>(gate), gate_row_stride, as_ptr<const T>(up), up_row_stride};
    dispatch_vec(vec, [&](auto v) {
      launch_row_fp8<SwigluRows<T>, decltype(v)::value>(src, q, scale, M, F, amax_ub, num_sms, s, "swiglu_fp8_fwd");
    });
  });
}

}  // namespace l3k::norm
