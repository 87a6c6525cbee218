// FP8 row-wise GEMM on Hopper (sm_90a) with CUTLASS 3.x / CuTe, the kernel class of FBGEMM's f8f8bf16_rowwise:
//
//   y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · x_scale[m] · w_scale[n] (+ bias[n])     fp32 accumulation
//
// xq [M, K] e4m3 row-major (activations), wq [N, K] e4m3 row-major (a Linear weight), x_scale [M] and w_scale [N]
// fp32, optional bias [N] fp32, y [M, N] bf16 or fp16 row-major. TMA loads, wgmma, warp-specialized persistent
// kernels (cooperative or ping-pong), and an epilogue visitor tree that scales, adds the bias and stores through TMA.
//
// Every configuration computes the transposed problem yᵀ = wq · xqᵀ (GEMM M' = N, N' = M), as FBGEMM does: the token
// count lands on the tile's N' dim, which can be as narrow as 16, so decode (M = 1..64) streams the weight with
// 64×16 or 64×64 tiles instead of padding the tokens to 64 or 128 rows. Both operands stay K-major (what FP8 wgmma
// needs), and yᵀ column-major is y row-major, so TMA writes y directly.
//
// Sample command (this translation unit alone; the extension builds it through CMake):
//   CUTLASS=$(python -c "import cutlass_library,os;print(os.path.dirname(cutlass_library.__file__))")/source
//   nvcc -std=c++17 -gencode arch=compute_90a,code=sm_90a -O3 --expt-relaxed-constexpr -DNDEBUG -Icsrc \
//     -I$CUTLASS/include -I$CUTLASS/tools/util/include -c csrc/gemm/fp8_rowwise.cu -o /tmp/gemm.o
// M <= 4 (kGemvMaxM) does not come here: fp8_gemv.cu streams the weight with every SM instead of N / 64 CTAs.
// It instantiates 8 kernels (4 configs × bf16/fp16 out): 76 s of CPU (65 s user + 11 s sys) and 6.6 GB peak
// memory with nvcc 13.0 on the build machine; ptxas -v reports no spills.
//
// TMA descriptors are encoded with cuTensorMapEncodeTiled, which CUTLASS reaches through cudaGetDriverEntryPoint
// (cutlass/cuda_host_adapter.hpp) as long as CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL stays undefined: the extension
// links cudart statically and never links libcuda.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "common.h"
#include "gemm/gemm.h"
#include "gemm/gemm_internal.h"

#if defined(CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL)
#error "fp8_rowwise.cu must reach the driver through cudaGetDriverEntryPoint: libcuda is not linked"
#endif

// Fast accumulation (compile with -DL3K_FP8_FAST_ACCUM=1): every wgmma accumulates into the tensor core's own FP8
// accumulator for the whole K. That accumulator keeps only about 14 mantissa bits (DeepSeek-V3 report, §3.3.2: up
// to ~2% relative error at K = 4096). 0 (default, comparable to cuBLASLt's row-wise _scaled_mm without
// use_fast_accum) promotes the partial sums into fp32 registers after every 128-long k-tile, which confines the
// reduced precision to 128-long sums (our estimate: ~1e-4 of Σ|products|; the GPU tests allow 2^-11). It costs
// registers (two accumulator copies, hence the narrower prefill tile below) and some throughput, not yet measured.
#ifndef L3K_FP8_FAST_ACCUM
#define L3K_FP8_FAST_ACCUM 0
#endif

namespace l3k {
namespace {

using namespace cute;

// One tile configuration of the transposed problem (M' = weight rows N, N' = tokens M).
template <int TileM_, int TileN_, int ClusterM_, bool Cooperative_>
struct TileConfig {
  using TileShape    = Shape<Int<TileM_>, Int<TileN_>, _128>;  // (M', N', K) per CTA; K = 128 e4m3 = one 128 B swizzle
  using ClusterShape = Shape<Int<ClusterM_>, _1, _1>;          // CTAs along M' share (multicast) the token tile
  static constexpr bool kCooperative = Cooperative_;             // 2 consumer warpgroups split one 128-row tile;
                                                                 // else ping-pong: each warpgroup owns a 64-row tile
};

//                          M'   N'  cluster coop
using Decode16 = TileConfig<64,  16, 1, false>;  // M <= 16: one weight pass, 16 tokens per tile
using Decode64 = TileConfig<64,  64, 1, false>;  // M <= 64
using Mid      = TileConfig<64,  128, 1, false>; // M <= 256: more CTAs than 128-row tiles would give
using Prefill  = TileConfig<128, L3K_FP8_FAST_ACCUM ? 256 : 128, 2, true>;  // large M, 2×1 cluster (see below)
// Prefill tiles: without fast accumulation each thread holds the accumulator twice (wgmma's and the fp32 one it is
// promoted into), so a 64×256 warpgroup tile needs 256 fp32 registers and spills (ptxas: 904 B); 64×128 per
// warpgroup does not. With L3K_FP8_FAST_ACCUM=1 there is one copy and the 128×256 tile fits.

enum class Config { kGemv, kDecode16, kDecode64, kMid, kPrefill };

// Chosen by M only for now: N and K change the tile count (waves), which the bench should refine. For sweeps
// (bench/sweep_gemm.py), L3K_GEMM_PREFILL_TILE=pingpong runs M > 256 on the 64 x 128 ping-pong tiles instead of the
// 128 x 128 cooperative ones ("cooperative", or unset: the default), read at every call.
Config pick_config(std::int64_t m, std::int64_t /*n*/, std::int64_t /*k*/) {
  if (m <= kGemvMaxM) return Config::kGemv;  // fp8_gemv.cu: every SM streams weight rows, even for N = 2048
  if (m <= 16) return Config::kDecode16;
  if (m <= 64) return Config::kDecode64;
  if (m <= 256) return Config::kMid;
  if (const char* v = std::getenv("L3K_GEMM_PREFILL_TILE")) {
    const std::string tile(v);
    require(tile == "pingpong" || tile == "cooperative", "L3K_GEMM_PREFILL_TILE",
            "expected pingpong or cooperative, got '" + tile + "'");
    if (tile == "pingpong") return Config::kMid;
  }
  return Config::kPrefill;
}

const char* config_name(Config c) {
  switch (c) {
    case Config::kGemv: return "gemv_warp_per_2_rows";
    case Config::kDecode16: return "decode16_64x16x128_c1x1_pingpong";
    case Config::kDecode64: return "decode64_64x64x128_c1x1_pingpong";
    case Config::kMid: return "mid_64x128x128_c1x1_pingpong";
    case Config::kPrefill: return L3K_FP8_FAST_ACCUM ? "prefill_128x256x128_c2x1_cooperative"
                                                   : "prefill_128x128x128_c2x1_cooperative";
  }
  return "?";
}

template <class Cfg, class ElementD>
struct Fp8RowwiseGemm {
  using ElementA           = cutlass::float_e4m3_t;         // A' = wq [N, K]
  using LayoutA            = cutlass::layout::RowMajor;     // K-major
  using ElementB           = cutlass::float_e4m3_t;         // B' = xqᵀ, stored as xq [M, K]
  using LayoutB            = cutlass::layout::ColumnMajor;  // K-major
  using LayoutD            = cutlass::layout::ColumnMajor;  // yᵀ [N, M] column-major = y [M, N] row-major
  using ElementAccumulator = float;
  using ElementCompute     = float;
  static constexpr int kAlignAB = 16;                        // elements of 16 B: K must be a multiple of 16
  static constexpr int kAlignD  = 8;                         // 16 B of bf16/fp16 along N
  static constexpr auto kRound  = cutlass::FloatRoundStyle::round_to_nearest;

  using TileShape    = typename Cfg::TileShape;
  using ClusterShape = typename Cfg::ClusterShape;
  using MainloopSchedule = cute::conditional_t<
      Cfg::kCooperative,
      cute::conditional_t<L3K_FP8_FAST_ACCUM, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
                          cutlass::gemm::KernelTmaWarpSpecializedCooperative>,
      cute::conditional_t<L3K_FP8_FAST_ACCUM, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum,
                          cutlass::gemm::KernelTmaWarpSpecializedPingpong>>;
  using EpilogueSchedule = cute::conditional_t<Cfg::kCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                               cutlass::epilogue::TmaWarpSpecialized>;

  // Epilogue visitor tree: D = x_scale[n'] · (acc · w_scale[m']) + bias[m'], in fp32, rounded once to ElementD.
  // w_scale and bias vary along M' (column broadcast, read straight into registers); x_scale varies along N'
  // (row broadcast, staged through shared memory). A null bias reads as zeros, so one instantiation serves both.
  using WScale  = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>;
  using Bias    = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>;
  using XScale  = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using Accum   = cutlass::epilogue::fusion::Sm90AccFetch;
  using ScaleW  = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>;
  using ScaleXB = cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>;
  using EVT     = cutlass::epilogue::fusion::Sm90EVT<ScaleXB, XScale,
                                                     cutlass::epilogue::fusion::Sm90EVT<ScaleW, WScale, Accum>, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute,
      void, LayoutD, kAlignD,  // no C operand
      ElementD, LayoutD, kAlignD, EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignAB, ElementB, LayoutB, kAlignAB,
      ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;  // persistent tile scheduler (default)
  using Gemm   = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

struct Problem {
  const void* xq;
  const float* x_scale;
  const void* wq;
  const float* w_scale;
  const float* bias;  // nullptr: no bias
  void* y;
  int m, n, k;
  cudaStream_t stream;
};

// SM count per device, cached: CUTLASS would otherwise query it on every call.
int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// A failed CUTLASS step as an error naming the step, the problem and the configuration.
void check_status(cutlass::Status status, const char* what, const Problem& p, Config c) {
  if (status != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("fp8_rowwise_mm: ") + what + " failed (" +
                             cutlass::cutlassGetStatusString(status) + ") for M=" + std::to_string(p.m) +
                             " N=" + std::to_string(p.n) + " K=" + std::to_string(p.k) + " with " + config_name(c));
}

// Persistent tile scheduler order, for tuning sweeps (bench/sweep_gemm.py): L3K_GEMM_SWIZZLE (1, 2, 4 or 8 tiles
// grouped along the minor direction; default 1) and L3K_GEMM_RASTER ("m" or "n" along the transposed problem's M' =
// weight rows or N' = tokens; default: CUTLASS's heuristic). Read at every call; unset means CUTLASS's defaults.
template <class SchedulerArgs>
void scheduler_from_env(SchedulerArgs& sched) {
  using Raster = decltype(sched.raster_order);
  if (const char* v = std::getenv("L3K_GEMM_SWIZZLE")) {
    const int swizzle = std::atoi(v);
    require(swizzle == 1 || swizzle == 2 || swizzle == 4 || swizzle == 8, "L3K_GEMM_SWIZZLE",
            std::string("expected 1, 2, 4 or 8, got '") + v + "'");
    sched.max_swizzle_size = swizzle;
  }
  if (const char* v = std::getenv("L3K_GEMM_RASTER")) {
    const std::string r(v);
    require(r == "m" || r == "n" || r == "heuristic", "L3K_GEMM_RASTER", "expected m, n or heuristic, got '" + r + "'");
    sched.raster_order = r == "m" ? Raster::AlongM : r == "n" ? Raster::AlongN : Raster::Heuristic;
  }
}

template <class Cfg, class ElementD>
void run(const Problem& p, Config c) {
  using G = Fp8RowwiseGemm<Cfg, ElementD>;
  using Gemm = typename G::Gemm;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideD = typename Gemm::GemmKernel::StrideD;

  int device = 0;
  check_cuda(cudaGetDevice(&device), "fp8_rowwise_mm: cudaGetDevice");
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = sm_count(device);

  // Transposed problem: (M', N', K) = (N, M, K); A' = wq [N, K], B' = xq [M, K], D' = yᵀ [N, M] column-major.
  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(p.n, p.k, 1));
  StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(p.m, p.k, 1));
  StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(p.n, p.m, 1));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.n, p.m, p.k, 1},
      {static_cast<const typename G::ElementA*>(p.wq), stride_a, static_cast<const typename G::ElementB*>(p.xq),
       stride_b},
      {{}, nullptr, stride_d, static_cast<ElementD*>(p.y), stride_d},
      hw_info};
  // Arguments mirror the tree: {XScale, {WScale, Accum, ScaleW}, Bias, ScaleXB}.
  args.epilogue.thread = {{p.x_scale}, {{p.w_scale}, {}, {}}, {p.bias}, {}};
  scheduler_from_env(args.scheduler);

  Gemm gemm;
  check_status(gemm.can_implement(args), "can_implement", p, c);
  // The persistent scheduler's workspace is usually empty; allocate it stream-ordered when it is not.
  size_t workspace_bytes = Gemm::get_workspace_size(args);
  void* workspace = nullptr;
  if (workspace_bytes > 0)
    check_cuda(cudaMallocAsync(&workspace, workspace_bytes, p.stream), "fp8_rowwise_mm: workspace");
  const char* step = "initialize";  // TMA descriptors, shared memory size
  cutlass::Status status = gemm.initialize(args, workspace, p.stream);
  if (status == cutlass::Status::kSuccess) {
    step = "launch";
    status = gemm.run(p.stream);
  }
  if (workspace != nullptr) check_cuda(cudaFreeAsync(workspace, p.stream), "fp8_rowwise_mm: free workspace");
  check_status(status, step, p, c);
}

template <class ElementD>
void dispatch(Config c, const Problem& p) {
  switch (c) {
    case Config::kGemv: break;  // handled before dispatch
    case Config::kDecode16: return run<Decode16, ElementD>(p, c);
    case Config::kDecode64: return run<Decode64, ElementD>(p, c);
    case Config::kMid: return run<Mid, ElementD>(p, c);
    case Config::kPrefill: return run<Prefill, ElementD>(p, c);
  }
}

bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

}  // namespace

std::string fp8_rowwise_mm_config(std::int64_t m, std::int64_t n, std::int64_t k) {
  return config_name(pick_config(m, n, k));
}

void fp8_rowwise_mm(std::uintptr_t xq, std::uintptr_t x_scale, std::uintptr_t wq, std::uintptr_t w_scale,
                    std::uintptr_t bias, int bias_dtype, std::uintptr_t y, std::int64_t m, std::int64_t n,
                    std::int64_t k, int out_dtype, std::uintptr_t stream) {
  constexpr std::int64_t kMaxDim = (std::int64_t{1} << 31) - 1;
  require(m >= 0 && m <= kMaxDim, "M", "expected 0 <= M < 2^31, got " + std::to_string(m));
  require(n >= 0 && n <= kMaxDim && n % 16 == 0, "N", "expected a multiple of 16, got " + std::to_string(n));
  require(k > 0 && k <= kMaxDim && k % 16 == 0, "K", "expected a positive multiple of 16, got " + std::to_string(k));
  DType out = to_dtype(out_dtype, "out_dtype");
  require(out == DType::BF16 || out == DType::F16, "out_dtype", "expected bfloat16 or float16");
  require(bias == 0 ? bias_dtype == -1 : bias_dtype == static_cast<int>(DType::F32), "bias",
          "expected a float32 bias (bias_dtype 0), or bias 0 with bias_dtype -1; got dtype code " +
              std::to_string(bias_dtype));
  if (m == 0 || n == 0) return;
  const std::pair<const char*, std::uintptr_t> pointers[] = {
      {"xq", xq}, {"x_scale", x_scale}, {"wq", wq}, {"w_scale", w_scale}, {"y", y}};
  for (const auto& [name, address] : pointers) {
    require(address != 0, name, "null pointer");
    require(aligned16(address), name, "expected a 16-byte aligned pointer");
  }
  require(aligned16(bias), "bias", "expected a 16-byte aligned pointer");

  const Problem p{as_ptr<const void>(xq), as_ptr<const float>(x_scale), as_ptr<const void>(wq),
                  as_ptr<const float>(w_scale), as_ptr<const float>(bias), as_ptr<void>(y),
                  static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), as_stream(stream)};
  const Config c = pick_config(m, n, k);
  if (c == Config::kGemv)
    return fp8_rowwise_gemv(GemvProblem{p.xq, p.x_scale, p.wq, p.w_scale, p.bias, p.y, p.m, p.n, p.k, p.stream},
                            out == DType::BF16);
  if (out == DType::BF16) return dispatch<cutlass::bfloat16_t>(c, p);
  return dispatch<cutlass::half_t>(c, p);
}

}  // namespace l3k
