// Row-wise FP8 (e4m3) quantization with the Llama 3 scale rule: one pass over HBM, the row in registers.
#include "norm/norm.h"
#include "norm/row.cuh"

namespace l3k::norm {
namespace {

// The rows of x ([M, N], row stride `stride`) as fp32 (the Src concept of row_fp8_kernel, norm/row.cuh).
template <typename T>
struct RowsOf {
  const T* x;
  int64_t stride;
  template <int VEC>
  using Raw = Vec<T, VEC>;
  template <int VEC>
  __device__ __forceinline__ Raw<VEC> fetch(int64_t row, int j) const {
    return load_vec<T, VEC>(x + row * stride + int64_t(j) * VEC);
  }
  template <int VEC>
  __device__ __forceinline__ void convert(const Raw<VEC>& raw, float (&y)[VEC]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = to_f(raw.v[i]);
  }
};

}  // namespace

void quantize_fp8_rowwise(uptr x, int64_t x_row_stride, uptr q, uptr scale, int64_t M, int64_t N, double amax_ub,
                          int dtype_code, int num_sms, uptr stream) {
  const DType dtype = to_dtype(dtype_code, "dtype");
  require(dtype != DType::E4M3, "dtype", "expected f32, f16 or bf16, got e4m3");
  require_sizes(M, N, num_sms, "N");
  require(amax_ub > 0, "amax_ub", "expected > 0, got " + std::to_string(amax_ub));
  require_stride(x_row_stride, N, M, "x_row_stride");
  if (M == 0) return;
  require_ptr(scale, "scale");
  if (N > 0) {
    require_ptr(x, "x");
    require_ptr(q, "q");
  }
  const int vec = pick_vec({N, x_row_stride}, {{x, dtype_size(dtype)}, {q, 1}});
  const cudaStream_t s = as_stream(stream);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    const RowsOf<T> src{as_ptr<const T>(x), x_row_stride};
    dispatch_vec(vec, [&](auto v) {
      launch_row_fp8<RowsOf<T>, decltype(v)::value>(src, q, scale, M, N, amax_ub, num_sms, s, "quantize_fp8_rowwise");
    });
  };
  if (dtype == DType::F32) launch(float{});
  else dispatch_half(dtype, launch);
}

}  // namespace l3k::norm
