// The extension's entry to the Hopper forward in flash_fwd_sm90.cuh (TMA + wgmma, warp-specialized). flash_attn_fwd
// (flash_fwd.cu) calls it for the shapes it covers when enabled; everything else runs the mma.sync kernels.
#include "attention/flash_fwd_sm90.cuh"

#include "attention/attention.h"
#include "common.h"

namespace l3k {

bool flash_fwd_sm90_enabled() {
  // Opt-in until the kernel has passed its tests and beaten the mma.sync forward on an H100 (dev/attention).
  return env_switch_on("L3K_FLASH_FWD_SM90");
}

bool flash_fwd_sm90_covers(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                           std::uintptr_t cu_seqlens, std::uintptr_t cu_seqlens_k, int seqlen_q, int seqlen_k,
                           std::int64_t rows, int hq, int d, bool causal, int dtype) {
  // TMA needs 16-byte aligned bases (row strides are H * D * 2 bytes, always multiples of 16) and strides below
  // 2^40 bytes; the largest is a batch's (rows = S, or T for packed documents). A failed descriptor encode would
  // not stop the launch in this NDEBUG build, so anything larger stays on the mma.sync kernel.
  const bool aligned = ((q | k | v | out) % 16) == 0;
  if (rows * hq * d * 2 >= (std::int64_t(1) << 40)) return false;
  constexpr int kBlockM = sm90::FwdConfig<128>::kBlockM;  // the same for both head dims
  static_assert(kBlockM == sm90::FwdConfig<64>::kBlockM);
  if ((seqlen_q + kBlockM - 1) / kBlockM > 65535) return false;  // tiles on grid z
  // Packed documents: one set of offsets for queries and keys (self-attention within each document).
  return causal && cu_seqlens == cu_seqlens_k && seqlen_q == seqlen_k && (d == 64 || d == 128) &&
         dtype == static_cast<int>(DType::BF16) && aligned;
}

namespace {

template <int D>
void run_fwd_sm90(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, std::uintptr_t lse,
                  std::uintptr_t cu_seqlens, int batch, int max_seqlen, int total_q, int hq, int hkv,
                  float softmax_scale, std::uintptr_t stream) {
  using Cfg = sm90::FwdConfig<D>;
  using Bf16 = cutlass::bfloat16_t;
  auto kernel = sm90::flash_fwd_sm90_kernel<Cfg>;
  check_cuda(sm90::prepare_fwd<Cfg>(kernel), "flash_fwd_sm90: shared memory opt-in");
  const sm90::FwdParams<Cfg> params = sm90::make_fwd_params<Cfg>(
      as_ptr<const Bf16>(q), as_ptr<const Bf16>(k), as_ptr<const Bf16>(v), as_ptr<Bf16>(out), as_ptr<float>(lse),
      as_ptr<const int>(cu_seqlens), batch, max_seqlen, total_q, hq, hkv, softmax_scale);
  sm90::launch_fwd<Cfg>(kernel, params, as_stream(stream));
  L3K_CHECK_LAUNCH("flash_fwd_sm90_kernel");
}

}  // namespace

void flash_attn_fwd_sm90(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                         std::uintptr_t lse, std::uintptr_t cu_seqlens, int batch, int max_seqlen, int total_q, int hq,
                         int hkv, int d, float softmax_scale, std::uintptr_t stream) {
  auto run = d == 64 ? run_fwd_sm90<64> : run_fwd_sm90<128>;  // flash_fwd_sm90_covers admits only these two
  run(q, k, v, out, lse, cu_seqlens, batch, max_seqlen, total_q, hq, hkv, softmax_scale, stream);
}

}  // namespace l3k
