// The launchers the emulator does not run (CUTLASS and Hopper TMA/wgmma kernels): the FP8 GEMM keeps only its
// GEMV path (M <= 4, fp8_gemv.cu, emulated), and the sm90 attention kernels report themselves off.
#include <stdexcept>

#include "attention/attention.h"
#include "common.h"
#include "gemm/gemm.h"
#include "gemm/gemm_internal.h"

namespace l3k {

void fp8_rowwise_mm(std::uintptr_t xq, std::uintptr_t x_scale, std::uintptr_t wq, std::uintptr_t w_scale,
                    std::uintptr_t bias, int bias_dtype, std::uintptr_t y, std::int64_t m, std::int64_t n,
                    std::int64_t k, int out_dtype, std::uintptr_t stream) {
  require(m >= 1 && m <= kGemvMaxM, "M", "the emulator runs the GEMV path only (1 <= M <= 4)");
  require(bias == 0 ? bias_dtype == -1 : bias_dtype == 0, "bias", "expected a float32 bias or none");
  const DType out = to_dtype(out_dtype, "out_dtype");
  fp8_rowwise_gemv(GemvProblem{as_ptr<const void>(xq), as_ptr<const float>(x_scale), as_ptr<const void>(wq),
                               as_ptr<const float>(w_scale), as_ptr<const float>(bias), as_ptr<void>(y), int(m),
                               int(n), int(k), as_stream(stream)},
                   out == DType::BF16);
}

std::string fp8_rowwise_mm_config(std::int64_t m, std::int64_t, std::int64_t) {
  return m <= kGemvMaxM ? "gemv" : "not emulated";
}

bool flash_fwd_sm90_enabled() { return false; }
bool flash_fwd_sm90_covers(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                           std::uintptr_t, int, int, std::int64_t, int, int, bool, int) {
  return false;
}
void flash_attn_fwd_sm90(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                         std::uintptr_t, int, int, int, int, int, int, float, std::uintptr_t) {
  throw std::runtime_error("flash_attn_fwd_sm90: not emulated");
}
bool flash_bwd_sm90_enabled() { return false; }
bool flash_bwd_sm90_covers(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                           std::uintptr_t, int, int, std::int64_t, std::int64_t, int, int, int, bool, int) {
  return false;
}
void flash_attn_bwd_sm90(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                         std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                         std::uintptr_t, int, int, int, int, int, int, float, std::uintptr_t) {
  throw std::runtime_error("flash_attn_bwd_sm90: not emulated");
}

}  // namespace l3k
