// Launchers of the norm family (RMSNorm, SwiGLU, FP8 row-wise quantization, cross-entropy). Pointers are device
// addresses (0 = absent), strides count elements, dtypes are l3k::DType codes, `stream` is a cudaStream_t. Activations
// are f16/bf16; outputs are dense [M, N] (or [M, F]) with row stride N; scale and rstd are fp32 [M].
// Bad arguments throw std::invalid_argument naming the argument; launch failures throw std::runtime_error.
#pragma once
#include <cstdint>

namespace l3k::norm {

using uptr = std::uintptr_t;

// y = h * rstd * weight with h = x (+ residual, rounded to dtype; then written to h_out), rstd = 1/sqrt(mean(h^2) + eps).
void rms_norm_fwd(uptr x, int64_t x_row_stride, uptr residual, int64_t residual_row_stride, uptr weight,
                  int weight_dtype, uptr y, uptr h_out, uptr rstd, int64_t M, int64_t N, double eps, int dtype,
                  int num_sms, uptr stream);

// dx = rstd * (g - xhat * mean(g * xhat)) (+ dh), g = dy * weight, xhat = h * rstd; dw = sum over rows of dy * xhat,
// reduced in fp32 through dw_partial ([partial_rows, N] fp32 scratch; at most partial_rows rows are used).
// dy, h, dh, dx are dense [M, N].
void rms_norm_bwd(uptr dy, uptr h, uptr weight, int weight_dtype, uptr rstd, uptr dh, uptr dx, uptr dw,
                  uptr dw_partial, int64_t partial_rows, int64_t M, int64_t N, int dtype, int num_sms, uptr stream);

// RMSNorm then row-wise e4m3 quantization of the fp32 result: q [M, N] e4m3, scale [M] fp32.
void rms_norm_fp8_fwd(uptr x, int64_t x_row_stride, uptr residual, int64_t residual_row_stride, uptr weight,
                      int weight_dtype, uptr q, uptr scale, uptr h_out, int64_t M, int64_t N, double eps,
                      double amax_ub, int dtype, int num_sms, uptr stream);

// y = silu(gate) * up in fp32, rounded to dtype.
void swiglu_fwd(uptr gate, int64_t gate_row_stride, uptr up, int64_t up_row_stride, uptr y, int64_t M, int64_t F,
                int dtype, int num_sms, uptr stream);

// dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s with s = sigmoid(gate); dy dense [M, F].
void swiglu_bwd(uptr dy, uptr gate, int64_t gate_row_stride, uptr up, int64_t up_row_stride, uptr dgate, uptr dup,
                int64_t M, int64_t F, int dtype, int num_sms, uptr stream);

// Row-wise e4m3 quantization of silu(gate) * up computed in fp32.
void swiglu_fp8_fwd(uptr gate, int64_t gate_row_stride, uptr up, int64_t up_row_stride, uptr q, uptr scale, int64_t M,
                    int64_t F, double amax_ub, int dtype, int num_sms, uptr stream);

// scale = max(min(amax, amax_ub) / 448, 1 / (448 * 512)), q = e4m3(clamp(x * (1 / scale), +-448)), per row.
void quantize_fp8_rowwise(uptr x, int64_t x_row_stride, uptr q, uptr scale, int64_t M, int64_t N, double amax_ub,
                          int dtype, int num_sms, uptr stream);

// Cross-entropy in fp32 of logits [M, V] (16-bit, row stride >= V) against int64 targets [M]: lse [M] fp32 and
// loss [M] fp32 = lse - logits[target], 0 where target == ignore_index, NaN where a target is outside [0, V).
void cross_entropy_fwd(uptr logits, int64_t row_stride, uptr targets, uptr loss, uptr lse, int64_t M, int64_t V,
                       int64_t ignore_index, int dtype, int num_sms, uptr stream);

// dlogits [M, V] dense = grad[row] * (exp(logits - lse) - [col == target]): 0 on ignored rows, NaN on rows whose
// target is outside [0, V); grad [M] fp32.
void cross_entropy_bwd(uptr grad, uptr logits, int64_t row_stride, uptr targets, uptr lse, uptr dlogits, int64_t M,
                       int64_t V, int64_t ignore_index, int dtype, int num_sms, uptr stream);

}  // namespace l3k::norm
