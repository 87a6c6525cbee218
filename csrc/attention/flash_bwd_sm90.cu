// The extension's entry to the Hopper backward in flash_bwd_sm90.cuh (TMA + wgmma, deterministic). flash_attn_bwd
// (flash_bwd.cu) calls it for the shapes it covers when enabled; everything else runs the mma.sync kernels.
#include "attention/flash_bwd_sm90.cuh"

#include "attention/attention.h"
#include "common.h"

namespace l3k {

bool flash_bwd_sm90_enabled() {
  // Opt-in until the kernels have passed their tests and beaten the mma.sync backward on an H100 (dev/attention).
  return env_switch_on("L3K_FLASH_BWD_SM90");
}

bool flash_bwd_sm90_covers(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t dout,
                           std::uintptr_t cu_seqlens, std::uintptr_t cu_seqlens_k, int seqlen_q, int seqlen_k,
                           std::int64_t rows_q, std::int64_t rows_k, int batch, int hq, int d, bool causal,
                           int dtype) {
  // Causal self-attention: equal lengths, or packed documents with one set of offsets for queries and keys. TMA
  // needs 16-byte aligned bases and strides below 2^40 bytes (the largest: rows · Hq · D · 2 with rows = S or T),
  // and the descriptors' failures would go unnoticed in this NDEBUG build, so anything larger stays on mma.sync.
  const bool aligned = ((q | k | v | dout) % 16) == 0;
  constexpr int kBig = sm90::BwdConfig<128>::kBig;  // the same for both head dims
  static_assert(kBig == sm90::BwdConfig<64>::kBig);
  return causal && cu_seqlens == cu_seqlens_k && seqlen_q == seqlen_k && rows_q == rows_k &&
         (d == 64 || d == 128) && dtype == static_cast<int>(DType::BF16) && aligned && batch <= 65535 &&
         (seqlen_q + kBig - 1) / kBig <= 65535 &&  // tiles on grid z
         rows_q * hq * d * 2 < (std::int64_t(1) << 40);
}

namespace {

template <int D>
void run_bwd_sm90(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                  std::uintptr_t lse, std::uintptr_t dsum, std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
                  std::uintptr_t cu_seqlens, int batch, int max_seqlen, int total_q, int hq, int hkv,
                  float softmax_scale, std::uintptr_t stream) {
  using Bf16 = cutlass::bfloat16_t;
  using Cfg = sm90::BwdConfig<D>;
  check_cuda(sm90::prepare_bwd<Cfg>(), "flash_bwd_sm90: shared memory opt-in");
  const sm90::BwdParams<Cfg> p = sm90::make_bwd_params<Cfg>(
      as_ptr<const Bf16>(q), as_ptr<const Bf16>(k), as_ptr<const Bf16>(v), as_ptr<const Bf16>(dout),
      as_ptr<const float>(lse), as_ptr<const float>(dsum), as_ptr<Bf16>(dq), as_ptr<Bf16>(dk), as_ptr<Bf16>(dv),
      as_ptr<const int>(cu_seqlens), batch, max_seqlen, total_q, hq, hkv, softmax_scale);
  sm90::launch_bwd(p, as_ptr<const __nv_bfloat16>(out), as_ptr<const __nv_bfloat16>(dout), as_ptr<float>(dsum),
                   as_stream(stream));
  L3K_CHECK_LAUNCH("flash_bwd_sm90 kernels");
}

}  // namespace

void flash_attn_bwd_sm90(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                         std::uintptr_t out, std::uintptr_t lse, std::uintptr_t dsum, std::uintptr_t dq,
                         std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t cu_seqlens, int batch, int max_seqlen,
                         int total_q, int hq, int hkv, int d, float softmax_scale, std::uintptr_t stream) {
  auto run = d == 64 ? run_bwd_sm90<64> : run_bwd_sm90<128>;  // flash_bwd_sm90_covers admits only these two
  run(dout, q, k, v, out, lse, dsum, dq, dk, dv, cu_seqlens, batch, max_seqlen, total_q, hq, hkv, softmax_scale,
      stream);
}

}  // namespace l3k
