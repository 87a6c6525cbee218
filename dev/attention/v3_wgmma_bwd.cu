// v3_wgmma_bwd.cu: the attention backward on Hopper (sm_90a), causal GQA, head dim 128, bf16, deterministic, as a
// standalone program: a dsum pre-pass and two TMA + wgmma kernels (one producer warpgroup, two consumer
// warpgroups), a naive fp32 reference on sampled rows, and timing. Scratch for the ladder in dev/attention/README.md.
//
//   make -C dev/attention v3_wgmma_bwd && ./dev/attention/v3_wgmma_bwd     # check + time every shape
//   ./dev/attention/v3_wgmma_bwd --check-only --max-seqlen 1000           # short shapes (sanitizers)
//   ./dev/attention/v3_wgmma_bwd --layout-check                           # host-only layout self-test
//
// Gradients of o = softmax(scale · q kᵀ) v with the forward's lse (natural log) and dsum_i = Σ_d do_i · o_i:
//   P = exp(scale · q kᵀ − lse), dP = do vᵀ, dS = P ⊙ (dP − dsum), dq = scale · dS k, dk = scale · dSᵀ q, dv = Pᵀ do.
// Deterministic, no atomics, as the extension's mma.sync backward: the dq kernel walks one 128-row query tile's key
// tiles (64 keys each); the dk/dv kernel walks one 128-row key tile's query tiles (64 queries each) over every
// query head of its KV group, so the group's sum happens in registers. That recomputes S and dP in both (7 GEMMs
// where an atomic dq would need 5) in exchange for determinism and no fp32 workspace.
// Layouts: q, o, do [B, S, Hq, D], k, v [B, S, Hkv, D] bf16; lse, dsum [B, Hq, S] fp32; dq like q, dk/dv like k.

#include "../../csrc/attention/flash_fwd_sm90.cuh"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

using namespace l3k::sm90;

#define CUDA_CHECK(expr)                                                                                   \
  do {                                                                                                     \
    cudaError_t err_ = (expr);                                                                             \
    if (err_ != cudaSuccess) {                                                                             \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                        \
    }                                                                                                      \
  } while (0)

static constexpr const char* kVersion = "v3_wgmma_bwd";

// ------------------------------------------------------------------------------------------------------------------
// Configuration: "big" tiles of 128 rows are loaded once per CTA (q and do in the dq kernel, k and v in the dk/dv
// kernel), "small" tiles of 64 rows stream through 2-stage rings. Every tile is K-major (rows, D) as TMA writes
// it; operands used transposed read the same bytes through an MN-major (D, rows) view (the layout self-test checks
// that both views address every element identically).
// ------------------------------------------------------------------------------------------------------------------

struct BwdConfig {
  using Element = cutlass::bfloat16_t;
  static constexpr int kHeadDim = 128, kBig = 128, kSmall = 64, kStages = 2;
  static constexpr int kThreads = 384, kConsumerWarps = 8, kProducerRegs = 24, kConsumerRegs = 240;
  using Big = Int<kBig>;
  using Small = Int<kSmall>;
  using HDim = Int<kHeadDim>;

  // S (or Sᵀ) and dP (or dPᵀ): per warpgroup 64 big-tile rows × 64 small-tile rows, reduced over D; both K-major.
  using TiledMmaS = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Small, HDim>>(),
                                            Layout<Shape<_2, _1, _1>>{}));
  // dq += dS k, dv += Pᵀ do, dk += dSᵀ q: A from registers (64 × 64), B a small tile read as (D, rows) MN-major.
  using TiledMmaAcc = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, HDim, Small>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));

  using SmemBig = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Big, HDim>{}));
  using SmemSmall = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Small, HDim, Int<kStages>>{}));
  using SmemSmallT = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                            Shape<HDim, Small, Int<kStages>>{}, Step<_2, _1, _3>{}));

  using GmemLayout = Layout<Shape<int, int, int, int>, Stride<int64_t, _1, int64_t, int64_t>>;  // (rows, D, H, B)
  using TmaBig = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                        make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
                                        SmemBig{}));
  using TmaSmall = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                          make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                                      GmemLayout{}),
                                          take<0, 2>(SmemSmall{})));
  static constexpr uint32_t kBigBytes = kBig * kHeadDim * sizeof(Element);
  static constexpr uint32_t kSmallBytes = kSmall * kHeadDim * sizeof(Element);

  // Both kernels: two big tiles and two rings of small ones (dq: q, do | k, v; dk/dv: k, v | q, do).
  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemBig>, 1024> big0;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemBig>, 1024> big1;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemSmall>, 1024> small0;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemSmall>, 1024> small1;
    alignas(8) uint64_t big_full;
    uint64_t full0[kStages], empty0[kStages], full1[kStages], empty1[kStages];
  };
};

struct BwdParams {
  BwdConfig::TmaBig tma_q_big, tma_do_big, tma_k_big, tma_v_big;
  BwdConfig::TmaSmall tma_q_small, tma_do_small, tma_k_small, tma_v_small;
  const float* lse;   // [B, Hq, S], natural log
  const float* dsum;  // [B, Hq, S]
  cutlass::bfloat16_t *dq, *dk, *dv;
  int batch, seqlen, heads_q, heads_kv;
  float scale, scale_log2;
};

// ------------------------------------------------------------------------------------------------------------------
// Shared pieces
// ------------------------------------------------------------------------------------------------------------------

template <class Cfg>
__device__ __forceinline__ void init_bwd_barriers(typename Cfg::SharedStorage& smem) {
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&smem.big_full, 1);
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < Cfg::kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.full0[s], 1);
      cutlass::arch::ClusterTransactionBarrier::init(&smem.full1[s], 1);
      cutlass::arch::ClusterBarrier::init(&smem.empty0[s], Cfg::kConsumerWarps);
      cutlass::arch::ClusterBarrier::init(&smem.empty1[s], Cfg::kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
}

// TMA of one 128-row tile (rows row0.., head h, batch b) into `dst` (SmemBig), completing on `bar`.
template <class Tma, class Dst>
__device__ __forceinline__ void load_big(Tma const& tma, int rows, int heads, int batches, int row0, int h, int b,
                                         Dst& dst, uint64_t& bar) {
  Tensor m = tma.get_tma_tensor(make_shape(rows, int(BwdConfig::kHeadDim), heads, batches));
  Tensor g = local_tile(m(_, _, h, b), Shape<BwdConfig::Big, BwdConfig::HDim>{}, make_coord(row0 / int(BwdConfig::kBig), _0{}));
  auto cta = tma.get_slice(0);
  copy(tma.with(bar), cta.partition_S(g), cta.partition_D(dst));
}

// TMA of one 64-row tile (tile index `tile` of 64 rows) into stage `stage` of `ring` (SmemSmall).
template <class Tma, class Ring>
__device__ __forceinline__ void load_small(Tma const& tma, int rows, int heads, int batches, int tile, int h, int b,
                                           Ring& ring, int stage, uint64_t& bar) {
  Tensor m = tma.get_tma_tensor(make_shape(rows, int(BwdConfig::kHeadDim), heads, batches));
  Tensor g = local_tile(m(_, _, h, b), Shape<BwdConfig::Small, BwdConfig::HDim>{}, make_coord(tile, _0{}));
  auto cta = tma.get_slice(0);
  Tensor dst = cta.partition_D(ring);  // (TMA, 1, 1, stage)
  copy(tma.with(bar), cta.partition_S(g), dst(_, _, _, stage));
}

// Rounded bf16 pairs of an fp32 accumulator into an RS-wgmma A fragment (same flat order: the layout self-test).
template <class TS, class TP>
__device__ __forceinline__ void to_bf16(TS const& acc, TP& frag) {
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(acc); i += 2) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(acc(i), acc(i + 1));
    frag(i) = reinterpret_cast<cutlass::bfloat16_t const&>(pair.x);
    frag(i + 1) = reinterpret_cast<cutlass::bfloat16_t const&>(pair.y);
  }
}

// Writes a (2 rows, cols) fp32 accumulator view, times `mul`, as bf16 pairs into rows of a [B, S, H, D] tensor.
template <class Acc, class Coords>
__device__ __forceinline__ void store_rows(Acc const& acc, Coords const& coords, float mul, int row0, int seqlen,
                                           cutlass::bfloat16_t* base, int64_t row_stride) {
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < size<0>(acc); ++r) {
    const int row = row0 + int(get<0>(coords(r, 0)));
    if (row >= seqlen) continue;
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(base) + int64_t(row) * row_stride;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(acc); c += 2) {
      *reinterpret_cast<__nv_bfloat162*>(out + int(get<1>(coords(r, c)))) =
          __floats2bfloat162_rn(acc(r, c) * mul, acc(r, c + 1) * mul);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// dq kernel: grid (Hq, B, ceil(S / 128)). Big tiles: q, do of 128 query rows; rings: k, v tiles of 64 keys.
// ------------------------------------------------------------------------------------------------------------------

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) dq_kernel(__grid_constant__ BwdParams const p) {
  using Element = typename Cfg::Element;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const int m_block = gridDim.z - 1 - blockIdx.z, h = blockIdx.x, b = blockIdx.y;  // longest tiles first
  const int hkv = h / (p.heads_q / p.heads_kv), S = p.seqlen;
  const int row0 = m_block * Cfg::kBig;
  const int n_tiles = cute::ceil_div(std::min(S, row0 + Cfg::kBig), int(Cfg::kSmall));  // key tiles 0 .. n_tiles - 1
  init_bwd_barriers<Cfg>(smem);
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.big0.data()), typename Cfg::SmemBig{});
  Tensor sdO = make_tensor(make_smem_ptr(smem.big1.data()), typename Cfg::SmemBig{});
  Tensor sK = make_tensor(make_smem_ptr(smem.small0.data()), typename Cfg::SmemSmall{});
  Tensor sV = make_tensor(make_smem_ptr(smem.small1.data()), typename Cfg::SmemSmall{});
  Tensor sKt = make_tensor(make_smem_ptr(smem.small0.data()), typename Cfg::SmemSmallT{});  // (D, keys, stage)

  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (threadIdx.x == 0) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.big_full, 2 * Cfg::kBigBytes);
      load_big(p.tma_q_big, S, p.heads_q, p.batch, row0, h, b, sQ, smem.big_full);
      load_big(p.tma_do_big, S, p.heads_q, p.batch, row0, h, b, sdO, smem.big_full);
      RingPos<Cfg::kStages> pos;
      for (int n = n_tiles - 1; n >= 0; --n) {
        cutlass::arch::ClusterBarrier::wait(&smem.empty0[pos.stage], pos.phase ^ 1);
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full0[pos.stage], Cfg::kSmallBytes);
        load_small(p.tma_k_small, S, p.heads_kv, p.batch, n, hkv, b, sK, pos.stage, smem.full0[pos.stage]);
        cutlass::arch::ClusterBarrier::wait(&smem.empty1[pos.stage], pos.phase ^ 1);
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full1[pos.stage], Cfg::kSmallBytes);
        load_small(p.tma_v_small, S, p.heads_kv, p.batch, n, hkv, b, sV, pos.stage, smem.full1[pos.stage]);
        pos.advance();
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
  const int tid = threadIdx.x - 128;
  typename Cfg::TiledMmaS mma_s;
  typename Cfg::TiledMmaAcc mma_acc;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_acc = mma_acc.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrK = thr_s.partition_fragment_B(sK);
  Tensor tPrdO = thr_s.partition_fragment_A(sdO);
  Tensor tPrV = thr_s.partition_fragment_B(sV);
  Tensor tQrKt = thr_acc.partition_fragment_B(sKt);
  Tensor tSrS = partition_fragment_C(mma_s, Shape<typename Cfg::Big, typename Cfg::Small>{});
  Tensor tPrP = partition_fragment_C(mma_s, Shape<typename Cfg::Big, typename Cfg::Small>{});  // dP
  Tensor tQrQ = partition_fragment_C(mma_acc, Shape<typename Cfg::Big, typename Cfg::HDim>{});  // dq accumulator
  Tensor tQrdS = make_tensor<Element>(partition_shape_A(mma_acc, Shape<typename Cfg::Big, typename Cfg::Small>{}));

  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<typename Cfg::Big, typename Cfg::Small>{}));
  Tensor cQ = thr_acc.partition_C(make_identity_tensor(Shape<typename Cfg::Big, typename Cfg::HDim>{}));
  Tensor s = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));  // (2 rows, 16 keys)
  Tensor dp = make_tensor(tPrP.data(), acc_rowcol(tPrP.layout()));
  Tensor s_coords = make_tensor(cS.data(), acc_rowcol(cS.layout()));
  Tensor dq = make_tensor(tQrQ.data(), acc_rowcol(tQrQ.layout()));
  Tensor dq_coords = make_tensor(cQ.data(), acc_rowcol(cQ.layout()));

  float lse2[2], dsum[2];  // this thread's two rows: lse in log2 units, and dsum
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + int(get<0>(s_coords(r, 0)));
    const int64_t at = (int64_t(b) * p.heads_q + h) * S + row;
    lse2[r] = row < S ? p.lse[at] * 1.4426950408889634f : 0.f;
    dsum[r] = row < S ? p.dsum[at] : 0.f;
  }
  clear(tQrQ);
  cutlass::arch::ClusterBarrier::wait(&smem.big_full, 0);

  RingPos<Cfg::kStages> pos;
  for (int n = n_tiles - 1; n >= 0; --n) {
    cutlass::arch::ClusterBarrier::wait(&smem.full0[pos.stage], pos.phase);
    wgmma_gemm<true>(mma_s, tSrQ, tSrK(_, _, _, pos.stage), tSrS);   // S = q kᵀ
    cutlass::arch::ClusterBarrier::wait(&smem.full1[pos.stage], pos.phase);
    wgmma_gemm<true>(mma_s, tPrdO, tPrV(_, _, _, pos.stage), tPrP);  // dP = do vᵀ
    wgmma_wait<0>(tSrS, tPrP);
    release_slot(&smem.empty1[pos.stage]);  // v is done with

    const int col0 = n * Cfg::kSmall;
    const bool edge = col0 + Cfg::kSmall - 1 > row0 || col0 + Cfg::kSmall > S;  // the diagonal or the tail
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + int(get<0>(s_coords(r, 0)));
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        const int key = col0 + int(get<1>(s_coords(r, c)));
        const bool keep = !edge || (key <= row && key < S);
        const float pr = keep ? fast_exp2(s(r, c) * p.scale_log2 - lse2[r]) : 0.f;
        s(r, c) = pr * (dp(r, c) - dsum[r]);  // dS
      }
    }
    to_bf16(tSrS, tQrdS);
    wgmma_gemm<false>(mma_acc, tQrdS, tQrKt(_, _, _, pos.stage), tQrQ);  // dq += dS k
    wgmma_wait<0>(tQrQ, tQrdS);
    release_slot(&smem.empty0[pos.stage]);
    pos.advance();
  }
  store_rows(dq, dq_coords, p.scale, row0, S, p.dq + (int64_t(b) * S * p.heads_q + h) * Cfg::kHeadDim,
             int64_t(p.heads_q) * Cfg::kHeadDim);
}

// ------------------------------------------------------------------------------------------------------------------
// dk/dv kernel: grid (Hkv, B, ceil(S / 128)). Big tiles: k, v of 128 keys; rings: q, do tiles of 64 queries, for
// every query head of the KV group and every query tile at or past the key tile (causal).
// ------------------------------------------------------------------------------------------------------------------

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) dkdv_kernel(__grid_constant__ BwdParams const p) {
  using Element = typename Cfg::Element;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const int n_block = blockIdx.z, hkv = blockIdx.x, b = blockIdx.y;  // low n first: the longest query ranges
  const int group = p.heads_q / p.heads_kv, S = p.seqlen;
  const int key0 = n_block * Cfg::kBig;
  const int m_first = key0 / Cfg::kSmall, m_end = cute::ceil_div(S, int(Cfg::kSmall));  // query tiles that see a key
  const int per_head = m_end - m_first;
  init_bwd_barriers<Cfg>(smem);
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(smem.big0.data()), typename Cfg::SmemBig{});
  Tensor sV = make_tensor(make_smem_ptr(smem.big1.data()), typename Cfg::SmemBig{});
  Tensor sQ = make_tensor(make_smem_ptr(smem.small0.data()), typename Cfg::SmemSmall{});
  Tensor sdO = make_tensor(make_smem_ptr(smem.small1.data()), typename Cfg::SmemSmall{});
  Tensor sQt = make_tensor(make_smem_ptr(smem.small0.data()), typename Cfg::SmemSmallT{});   // (D, queries, stage)
  Tensor sdOt = make_tensor(make_smem_ptr(smem.small1.data()), typename Cfg::SmemSmallT{});

  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (threadIdx.x == 0) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.big_full, 2 * Cfg::kBigBytes);
      load_big(p.tma_k_big, S, p.heads_kv, p.batch, key0, hkv, b, sK, smem.big_full);
      load_big(p.tma_v_big, S, p.heads_kv, p.batch, key0, hkv, b, sV, smem.big_full);
      RingPos<Cfg::kStages> pos;
      for (int it = 0; it < group * per_head; ++it) {
        const int h = hkv * group + it / per_head, m = m_first + it % per_head;
        cutlass::arch::ClusterBarrier::wait(&smem.empty0[pos.stage], pos.phase ^ 1);
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full0[pos.stage], Cfg::kSmallBytes);
        load_small(p.tma_q_small, S, p.heads_q, p.batch, m, h, b, sQ, pos.stage, smem.full0[pos.stage]);
        cutlass::arch::ClusterBarrier::wait(&smem.empty1[pos.stage], pos.phase ^ 1);
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full1[pos.stage], Cfg::kSmallBytes);
        load_small(p.tma_do_small, S, p.heads_q, p.batch, m, h, b, sdO, pos.stage, smem.full1[pos.stage]);
        pos.advance();
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
  const int tid = threadIdx.x - 128;
  typename Cfg::TiledMmaS mma_s;
  typename Cfg::TiledMmaAcc mma_acc;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_acc = mma_acc.get_thread_slice(tid);
  Tensor tSrK = thr_s.partition_fragment_A(sK);   // Sᵀ = k qᵀ
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);
  Tensor tPrV = thr_s.partition_fragment_A(sV);   // dPᵀ = v doᵀ
  Tensor tPrdO = thr_s.partition_fragment_B(sdO);
  Tensor tVrdOt = thr_acc.partition_fragment_B(sdOt);  // dv += Pᵀ do
  Tensor tKrQt = thr_acc.partition_fragment_B(sQt);    // dk += dSᵀ q
  Tensor tSrS = partition_fragment_C(mma_s, Shape<typename Cfg::Big, typename Cfg::Small>{});
  Tensor tPrP = partition_fragment_C(mma_s, Shape<typename Cfg::Big, typename Cfg::Small>{});
  Tensor tVrV = partition_fragment_C(mma_acc, Shape<typename Cfg::Big, typename Cfg::HDim>{});  // dv accumulator
  Tensor tKrK = partition_fragment_C(mma_acc, Shape<typename Cfg::Big, typename Cfg::HDim>{});  // dk accumulator
  Tensor tVrP = make_tensor<Element>(partition_shape_A(mma_acc, Shape<typename Cfg::Big, typename Cfg::Small>{}));
  Tensor tKrdS = make_tensor<Element>(partition_shape_A(mma_acc, Shape<typename Cfg::Big, typename Cfg::Small>{}));

  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<typename Cfg::Big, typename Cfg::Small>{}));
  Tensor cO = thr_acc.partition_C(make_identity_tensor(Shape<typename Cfg::Big, typename Cfg::HDim>{}));
  Tensor st = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));  // (2 keys, 16 queries)
  Tensor dpt = make_tensor(tPrP.data(), acc_rowcol(tPrP.layout()));
  Tensor st_coords = make_tensor(cS.data(), acc_rowcol(cS.layout()));
  Tensor dv = make_tensor(tVrV.data(), acc_rowcol(tVrV.layout()));
  Tensor dk = make_tensor(tKrK.data(), acc_rowcol(tKrK.layout()));
  Tensor o_coords = make_tensor(cO.data(), acc_rowcol(cO.layout()));
  constexpr int kCols = size<1>(decltype(st){});

  clear(tVrV);
  clear(tKrK);
  cutlass::arch::ClusterBarrier::wait(&smem.big_full, 0);

  RingPos<Cfg::kStages> pos;
  for (int it = 0; it < group * per_head; ++it) {
    const int h = hkv * group + it / per_head, m = m_first + it % per_head;
    const int q0 = m * Cfg::kSmall;
    const float* lse_h = p.lse + (int64_t(b) * p.heads_q + h) * S;
    const float* dsum_h = p.dsum + (int64_t(b) * p.heads_q + h) * S;
    cutlass::arch::ClusterBarrier::wait(&smem.full0[pos.stage], pos.phase);
    wgmma_gemm<true>(mma_s, tSrK, tSrQ(_, _, _, pos.stage), tSrS);    // Sᵀ = k qᵀ
    cutlass::arch::ClusterBarrier::wait(&smem.full1[pos.stage], pos.phase);
    wgmma_gemm<true>(mma_s, tPrV, tPrdO(_, _, _, pos.stage), tPrP);   // dPᵀ = v doᵀ
    wgmma_wait<0>(tSrS, tPrP);

    const bool edge = key0 + Cfg::kBig - 1 > q0 || q0 + Cfg::kSmall > S;  // the diagonal or the tail
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int key = key0 + int(get<0>(st_coords(r, 0)));
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        // lse and dsum of this column's query, read per element (L1 hits): arrays of them, or unpredicated loads
        // the compiler hoists, spill registers (36-40 B against 8 B this way)
        const int query = q0 + int(get<1>(st_coords(r, c)));
        const bool keep = (!edge || key <= query) && query < S;
        const float pr = keep ? fast_exp2(st(r, c) * p.scale_log2 - __ldg(lse_h + query) * 1.4426950408889634f) : 0.f;
        st(r, c) = pr;                                                    // Pᵀ
        dpt(r, c) = keep ? pr * (dpt(r, c) - __ldg(dsum_h + query)) : 0.f;  // dSᵀ
      }
    }
    to_bf16(tSrS, tVrP);
    to_bf16(tPrP, tKrdS);
    wgmma_gemm<false>(mma_acc, tVrP, tVrdOt(_, _, _, pos.stage), tVrV);  // dv += Pᵀ do
    wgmma_gemm<false>(mma_acc, tKrdS, tKrQt(_, _, _, pos.stage), tKrK);  // dk += dSᵀ q
    wgmma_wait<0>(tVrV, tKrK, tVrP, tKrdS);
    release_slot(&smem.empty0[pos.stage]);
    release_slot(&smem.empty1[pos.stage]);
    pos.advance();
  }
  const int64_t row_stride = int64_t(p.heads_kv) * Cfg::kHeadDim;
  const int64_t base = (int64_t(b) * S * p.heads_kv + hkv) * Cfg::kHeadDim;
  store_rows(dk, o_coords, p.scale, key0, S, p.dk + base, row_stride);
  store_rows(dv, o_coords, 1.f, key0, S, p.dv + base, row_stride);
}

// dsum[b, h, i] = Σ_d do · o in fp32: one warp per (b, i, h) row.
__global__ void dsum_kernel(const __nv_bfloat16* o, const __nv_bfloat16* dout, float* dsum, int batch, int seqlen,
                            int heads) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;  // (b, i, h) flattened
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(batch) * seqlen * heads) return;
  const uint2 ov = reinterpret_cast<const uint2*>(o + row * 128)[lane];
  const uint2 dv = reinterpret_cast<const uint2*>(dout + row * 128)[lane];
  const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
  const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
  float acc = 0.f;
  for (int j = 0; j < 2; ++j) {
    const float2 of = __bfloat1622float2(o2[j]), df = __bfloat1622float2(d2[j]);
    acc += of.x * df.x + of.y * df.y;
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const int h = int(row % heads), i = int((row / heads) % seqlen), bb = int(row / (int64_t(heads) * seqlen));
    dsum[(int64_t(bb) * heads + h) * seqlen + i] = acc;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------------

using Cfg = BwdConfig;

BwdParams make_bwd_params(const cutlass::bfloat16_t* q, const cutlass::bfloat16_t* k, const cutlass::bfloat16_t* v,
                          const cutlass::bfloat16_t* dout, const float* lse, const float* dsum,
                          cutlass::bfloat16_t* dq, cutlass::bfloat16_t* dk, cutlass::bfloat16_t* dv, int batch,
                          int seqlen, int heads_q, int heads_kv, float scale) {
  const int64_t d = Cfg::kHeadDim;
  auto layout = [&](int heads) {
    return make_layout(make_shape(seqlen, int(d), heads, batch),
                       make_stride(int64_t(heads) * d, _1{}, d, int64_t(seqlen) * heads * d));
  };
  auto big = [&](const cutlass::bfloat16_t* t, int heads) {
    return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(t), layout(heads)), Cfg::SmemBig{});
  };
  auto small = [&](const cutlass::bfloat16_t* t, int heads) {
    return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(t), layout(heads)), take<0, 2>(Cfg::SmemSmall{}));
  };
  return BwdParams{big(q, heads_q),    big(dout, heads_q),    big(k, heads_kv),    big(v, heads_kv),
                   small(q, heads_q),  small(dout, heads_q),  small(k, heads_kv),  small(v, heads_kv),
                   lse,                dsum,                  dq,                  dk,
                   dv,                 batch,                 seqlen,              heads_q,
                   heads_kv,           scale,                 scale * 1.4426950408889634f};
}

void prepare_bwd() {
  const int smem = int(sizeof(Cfg::SharedStorage));
  CUDA_CHECK(cudaFuncSetAttribute(dq_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CUDA_CHECK(cudaFuncSetAttribute(dkdv_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
}

// The whole backward: dsum, then dq and dk/dv (independent; one stream here).
void launch_bwd(BwdParams const& p, const __nv_bfloat16* o, const __nv_bfloat16* dout, float* dsum) {
  const int64_t rows = int64_t(p.batch) * p.seqlen * p.heads_q;
  dsum_kernel<<<unsigned((rows * 32 + 255) / 256), 256>>>(o, dout, dsum, p.batch, p.seqlen, p.heads_q);
  const int smem = int(sizeof(Cfg::SharedStorage));
  const int tiles = cute::ceil_div(p.seqlen, Cfg::kBig);
  // tiles on z: blocks go out x fastest, so every head's longest tiles first
  dq_kernel<Cfg><<<dim3(p.heads_q, p.batch, tiles), Cfg::kThreads, smem>>>(p);
  dkdv_kernel<Cfg><<<dim3(p.heads_kv, p.batch, tiles), Cfg::kThreads, smem>>>(p);
}

// ------------------------------------------------------------------------------------------------------------------
// Check
// ------------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t hash_u32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return uint32_t(x);
}

__global__ void fill_normal_kernel(__nv_bfloat16* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u1 = (hash_u32(seed * 0x9e3779b97f4a7c15ULL + 2 * i) + 1.0f) * 2.3283064e-10f;
    const float u2 = hash_u32(seed * 0x9e3779b97f4a7c15ULL + 2 * i + 1) * 2.3283064e-10f;
    x[i] = __float2bfloat16(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

// Naive forward for every row: o (bf16, as the real forward stores it) and lse (fp32). One block per (b, h, i).
__global__ void forward_rows_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                    __nv_bfloat16* o, float* lse, int seqlen, int heads_q, int heads_kv, float scale) {
  constexpr int D = 128;
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / (heads_q / heads_kv);
  __shared__ float q_s[D], red[32];
  extern __shared__ float p_s[];  // [seqlen]
  const __nv_bfloat16* q_row = q + ((int64_t(b) * seqlen + i) * heads_q + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) q_s[d] = __bfloat162float(q_row[d]);
  __syncthreads();
  float mx = -INFINITY;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) {
    const __nv_bfloat16* k_row = k + ((int64_t(b) * seqlen + j) * heads_kv + hk) * D;
    float dot = 0.f;
    for (int d = 0; d < D; ++d) dot += q_s[d] * __bfloat162float(k_row[d]);
    p_s[j] = dot * scale;
    mx = fmaxf(mx, p_s[j]);
  }
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int w = 0; w < int(blockDim.x / 32); ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();
  float sum = 0.f;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) {
    p_s[j] = expf(p_s[j] - mx);
    sum += p_s[j];
  }
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0.f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) sum += red[w];
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j <= i; ++j) acc += p_s[j] * __bfloat162float(v[((int64_t(b) * seqlen + j) * heads_kv + hk) * D + d]);
    o[((int64_t(b) * seqlen + i) * heads_q + h) * D + d] = __float2bfloat16(acc / sum);
  }
  if (threadIdx.x == 0) lse[(int64_t(b) * heads_q + h) * seqlen + i] = mx + logf(sum);
}

// Reference gradients in fp32 for sampled rows, from the same bf16 inputs, o and lse the kernels use (dsum recomputed
// here from o and do, independently of dsum_kernel):
// item.w = 0: dq of query row (b, h, i); item.w = 1: dk and dv of key row (b, hkv, j) (summed over the group).
__global__ void reference_grads_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                       const __nv_bfloat16* o, const __nv_bfloat16* dout, const float* lse,
                                       const int4* items, float* ref, int seqlen, int heads_q, int heads_kv,
                                       float scale) {
  constexpr int D = 128;
  const int4 it = items[blockIdx.x];
  const int b = it.x, head = it.y, row = it.z;
  const int group = heads_q / heads_kv;
  const int d = threadIdx.x;  // blockDim.x == 128: one output column per thread
  auto at_q = [&](int i, int h) { return ((int64_t(b) * seqlen + i) * heads_q + h) * D; };
  auto at_k = [&](int j, int hk) { return ((int64_t(b) * seqlen + j) * heads_kv + hk) * D; };
  __shared__ float red[4];
  auto block_dot = [&](float x) {  // sum over the 128 threads
    for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    __syncthreads();
    if (d % 32 == 0) red[d / 32] = x;
    __syncthreads();
    return red[0] + red[1] + red[2] + red[3];
  };
  if (it.w == 0) {  // dq_i = scale Σ_j dS_ij k_j
    const int h = head, hk = h / group, i = row;
    const float qd = __bfloat162float(q[at_q(i, h) + d]), dod = __bfloat162float(dout[at_q(i, h) + d]);
    const float l = lse[(int64_t(b) * heads_q + h) * seqlen + i];
    const float ds = block_dot(dod * __bfloat162float(o[at_q(i, h) + d]));
    float acc = 0.f;
    for (int j = 0; j <= i; ++j) {
      const float kd = __bfloat162float(k[at_k(j, hk) + d]), vd = __bfloat162float(v[at_k(j, hk) + d]);
      const float sdot = block_dot(qd * kd), dpdot = block_dot(dod * vd);
      const float pij = expf(sdot * scale - l);
      acc += pij * (dpdot - ds) * kd;
    }
    ref[int64_t(blockIdx.x) * 2 * D + d] = acc * scale;
  } else {  // dk_j = scale Σ_{h in group, i >= j} dS_ij q_i; dv_j = Σ P_ij do_i
    const int hk = head, j = row;
    const float kd = __bfloat162float(k[at_k(j, hk) + d]), vd = __bfloat162float(v[at_k(j, hk) + d]);
    float acc_k = 0.f, acc_v = 0.f;
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
      for (int i = j; i < seqlen; ++i) {
        const float qd = __bfloat162float(q[at_q(i, h) + d]), dod = __bfloat162float(dout[at_q(i, h) + d]);
        const float sdot = block_dot(qd * kd), dpdot = block_dot(dod * vd);
        const float ds = block_dot(dod * __bfloat162float(o[at_q(i, h) + d]));
        const float pij = expf(sdot * scale - lse[(int64_t(b) * heads_q + h) * seqlen + i]);
        acc_v += pij * dod;
        acc_k += pij * (dpdot - ds) * qd;
      }
    }
    ref[int64_t(blockIdx.x) * 2 * D + d] = acc_k * scale;
    ref[int64_t(blockIdx.x) * 2 * D + D + d] = acc_v;
  }
}

__global__ void count_nonfinite_kernel(const __nv_bfloat16* x, int64_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    local += !isfinite(__bfloat162float(x[i]));
  if (local) atomicAdd(count, local);
}

// Per sampled row: |got - ref| <= 0.02 max|ref row| + 0.02 |ref|. P and dS are rounded to bf16 before the wgmma
// (as every flash backward does), and the outputs are bf16; an error of a few percent of the row's largest value is
// what that costs (FlashAttention's own tests compare against twice a bf16 reference's error), while a dropped key
// or query tile, a missing head of the group, or a wrong mask moves a row by a good part of its magnitude.
static bool check_grads(int B, int S, int Hq, int Hkv, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const __nv_bfloat16* o, const __nv_bfloat16* dout, const float* lse,
                        const __nv_bfloat16* dq, const __nv_bfloat16* dk, const __nv_bfloat16* dv, float scale) {
  constexpr int D = 128;
  std::vector<int4> items;
  const int edge_rows[] = {0, 1, 63, 64, 127, 128, 129, S / 2, S - 129, S - 65, S - 64, S - 2, S - 1};
  for (int bb : {0, B - 1})
    for (int i : edge_rows) {
      if (i < 0 || i >= S) continue;
      for (int h : {0, 5, Hq - 1}) items.push_back(make_int4(bb, h, i, 0));
      for (int hk : {0, Hkv - 1}) items.push_back(make_int4(bb, hk, i, 1));
    }
  uint64_t state = 0x5eed + S;
  for (int n = 0; n < 64; ++n) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const uint32_t x = uint32_t(state >> 33);
    const int kind = n % 2;
    items.push_back(make_int4(int(x % B), int((x / B) % (kind ? Hkv : Hq)), int((state >> 7) % S), kind));
  }
  const int n_items = int(items.size());
  int4* d_items;
  float* d_ref;
  unsigned long long* d_bad;
  CUDA_CHECK(cudaMalloc(&d_items, n_items * sizeof(int4)));
  CUDA_CHECK(cudaMalloc(&d_ref, int64_t(n_items) * 2 * D * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d_bad, sizeof(unsigned long long)));
  CUDA_CHECK(cudaMemcpy(d_items, items.data(), n_items * sizeof(int4), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemset(d_bad, 0, sizeof(unsigned long long)));
  reference_grads_kernel<<<n_items, 128>>>(q, k, v, o, dout, lse, d_items, d_ref, S, Hq, Hkv, scale);
  count_nonfinite_kernel<<<1024, 256>>>(dq, int64_t(B) * S * Hq * D, d_bad);
  count_nonfinite_kernel<<<1024, 256>>>(dk, int64_t(B) * S * Hkv * D, d_bad);
  count_nonfinite_kernel<<<1024, 256>>>(dv, int64_t(B) * S * Hkv * D, d_bad);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ref(size_t(n_items) * 2 * D);
  unsigned long long nonfinite = 0;
  CUDA_CHECK(cudaMemcpy(ref.data(), d_ref, ref.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(&nonfinite, d_bad, sizeof(nonfinite), cudaMemcpyDeviceToHost));

  double worst = 0.0;
  int bad = 0;
  std::vector<__nv_bfloat16> row(D);
  for (int n = 0; n < n_items; ++n) {
    const int4 it = items[n];
    for (int which = 0; which < (it.w == 0 ? 1 : 2); ++which) {
      const __nv_bfloat16* src = it.w == 0 ? dq + ((int64_t(it.x) * S + it.z) * Hq + it.y) * D
                                           : (which == 0 ? dk : dv) + ((int64_t(it.x) * S + it.z) * Hkv + it.y) * D;
      CUDA_CHECK(cudaMemcpy(row.data(), src, D * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
      const float* r = ref.data() + size_t(n) * 2 * D + which * D;
      double row_max = 0.0;
      for (int d = 0; d < D; ++d) row_max = std::max(row_max, double(std::fabs(r[d])));
      bool row_bad = false;
      for (int d = 0; d < D; ++d) {
        const double err = std::fabs(double(__bfloat162float(row[d])) - r[d]);
        // the floor: a row whose reference is exactly 0 (dq of row 0: dP = dsum) still has fp32 rounding
        const double tol = 0.02 * row_max + 0.02 * std::fabs(r[d]) + 1e-4;
        worst = std::max(worst, std::isnan(err) ? INFINITY : err / tol);
        if (!(err <= tol)) row_bad = true;
      }
      if (row_bad && bad++ < 6) {
        const char* name = it.w == 0 ? "dq" : (which == 0 ? "dk" : "dv");
        std::printf("    %s mismatch at b=%d head=%d row=%d: [0]=%g ref %g (row max %g)\n", name, it.x, it.y, it.z,
                    __bfloat162float(row[0]), r[0], row_max);
      }
    }
  }
  const bool ok = bad == 0 && nonfinite == 0;
  std::printf("  check B=%d S=%d: %d sampled rows, worst error %.2f of tolerance, non-finite=%llu, %s\n", B, S, n_items,
              worst, nonfinite, ok ? "PASS" : "FAIL");
  CUDA_CHECK(cudaFree(d_items));
  CUDA_CHECK(cudaFree(d_ref));
  CUDA_CHECK(cudaFree(d_bad));
  return ok;
}

// The assumptions the kernels rest on, checked on the host: (1) the K-major (rows, D) and MN-major (D, rows) views
// of a small tile address every element identically (TMA writes one, the transposed operands read the other);
// (2) the fp32 S/dP accumulator and the RS wgmma's A fragment hold the same (row, col) at each flat index, so
// P and dS convert element by element.
static bool layout_selftest() {
  int errors = 0;
  auto fail = [&](const char* what, int a, int b) {
    if (errors++ < 10) std::printf("layout self-test: %s (%d, %d)\n", what, a, b);
  };
  Cfg::SmemSmall kmaj;
  Cfg::SmemSmallT mnmaj;
  for (int st = 0; st < Cfg::kStages; ++st)
    for (int r = 0; r < Cfg::kSmall; ++r)
      for (int d = 0; d < Cfg::kHeadDim; ++d)
        if (kmaj(r, d, st) != mnmaj(d, r, st)) fail("K-major and MN-major views differ", r, d);
  Cfg::TiledMmaS mma_s;
  Cfg::TiledMmaAcc mma_acc;
  using Tile = Shape<Cfg::Big, Cfg::Small>;
  for (int t = 0; t < 256; ++t) {
    auto c = mma_s.get_thread_slice(t).partition_C(make_identity_tensor(Tile{}));
    auto a = mma_acc.get_thread_slice(t).partition_A(make_identity_tensor(Tile{}));
    auto a_shape = partition_shape_A(mma_acc, Tile{});
    if (size(c) != size(a) || size(a_shape) != size(c)) fail("accumulator and A fragment sizes differ", t, 0);
    auto compact = make_layout(a_shape);
    for (int i = 0; i < size(c); ++i) {
      if (c(i) != a(idx2crd(i, a_shape)) || compact(idx2crd(i, a_shape)) != i) fail("A order != C order", t, i);
    }
    auto rc = make_tensor(c.data(), acc_rowcol(c.layout()));
    if (size<0>(rc) != 2) fail("expected 2 rows per thread", t, 0);
    for (int r = 0; r < 2; ++r)
      for (int col = 0; col < size<1>(rc); ++col)
        if (get<0>(rc(r, col)) != get<0>(rc(r, 0))) fail("row view mixes rows", t, col);
    for (int col = 0; col < size<1>(rc); ++col)
      if (get<1>(rc(0, col)) != get<1>(rc(1, col))) fail("columns differ between a thread's two rows", t, col);
  }
  std::printf("layout self-test: %s\n", errors == 0 ? "PASS" : "FAIL");
  return errors == 0;
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  bool check_only = false;
  int max_seqlen = 1 << 30;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--check-only") == 0) {
      check_only = true;
    } else if (std::strcmp(argv[i], "--layout-check") == 0) {
      return layout_selftest() ? 0 : 1;
    } else if (std::strcmp(argv[i], "--max-seqlen") == 0 && i + 1 < argc) {
      max_seqlen = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--check-only] [--max-seqlen N] | --layout-check\n", argv[0]);
      return 2;
    }
  }
  if (!layout_selftest()) return 1;
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s on %s (sm_%d%d)\n", kVersion, prop.name, prop.major, prop.minor);
  if (prop.major != 9) return 1;
  prepare_bwd();

  constexpr int Hq = 32, Hkv = 8, D = 128;
  const float scale = 1.f / std::sqrt(float(D));
  struct Shape2 {
    int batch, seqlen;
  };
  // Checked shapes (B·S² <= 2^25: the naive forward is O(B·S²) per head), then the larger timing shapes.
  const Shape2 shapes[] = {{1, 1}, {2, 17}, {1, 129}, {2, 1000}, {1, 4097}, {16, 1024}, {4, 4096}, {1, 16384}};
  bool all_ok = true;
  for (Shape2 sh : shapes) {
    const int B = sh.batch, S = sh.seqlen;
    if (S > max_seqlen) continue;
    const bool check = double(B) * S * S <= double(1 << 25);  // the naive forward and reference stay in seconds
    const int64_t nq = int64_t(B) * S * Hq * D, nk = int64_t(B) * S * Hkv * D, nst = int64_t(B) * Hq * S;
    __nv_bfloat16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float *lse, *dsum;
    for (auto* pp : {&q, &o, &dout, &dq}) CUDA_CHECK(cudaMalloc(pp, nq * sizeof(__nv_bfloat16)));
    for (auto* pp : {&k, &v, &dk, &dv}) CUDA_CHECK(cudaMalloc(pp, nk * sizeof(__nv_bfloat16)));
    CUDA_CHECK(cudaMalloc(&lse, nst * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dsum, nst * sizeof(float)));
    fill_normal_kernel<<<1024, 256>>>(q, nq, 11 + S);
    fill_normal_kernel<<<1024, 256>>>(k, nk, 12 + S);
    fill_normal_kernel<<<1024, 256>>>(v, nk, 13 + S);
    fill_normal_kernel<<<1024, 256>>>(dout, nq, 14 + S);
    if (check) {  // exact forward statistics for every row
      const size_t shm = size_t(S) * sizeof(float);
      if (shm > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(forward_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shm)));
      forward_rows_kernel<<<dim3(S, Hq, B), 256, shm>>>(q, k, v, o, lse, S, Hq, Hkv, scale);
    } else {  // timing only: the extension's forward supplies o and lse
      const FwdParams fp = make_fwd_params<FwdConfig>(
          reinterpret_cast<const cutlass::bfloat16_t*>(q), reinterpret_cast<const cutlass::bfloat16_t*>(k),
          reinterpret_cast<const cutlass::bfloat16_t*>(v), reinterpret_cast<cutlass::bfloat16_t*>(o), lse, nullptr,
          B, S, 0, Hq, Hkv, scale);
      CUDA_CHECK(prepare_fwd<FwdConfig>(flash_fwd_sm90_kernel<FwdConfig>));
      launch_fwd<FwdConfig>(flash_fwd_sm90_kernel<FwdConfig>, fp, nullptr);
    }
    CUDA_CHECK(cudaGetLastError());
    for (auto* t : {dq, dk, dv}) CUDA_CHECK(cudaMemset(t, 0xff, (t == dq ? nq : nk) * sizeof(__nv_bfloat16)));
    const BwdParams bp = make_bwd_params(
        reinterpret_cast<const cutlass::bfloat16_t*>(q), reinterpret_cast<const cutlass::bfloat16_t*>(k),
        reinterpret_cast<const cutlass::bfloat16_t*>(v), reinterpret_cast<const cutlass::bfloat16_t*>(dout), lse,
        dsum, reinterpret_cast<cutlass::bfloat16_t*>(dq), reinterpret_cast<cutlass::bfloat16_t*>(dk),
        reinterpret_cast<cutlass::bfloat16_t*>(dv), B, S, Hq, Hkv, scale);
    cudaEvent_t done;
    CUDA_CHECK(cudaEventCreate(&done));
    launch_bwd(bp, o, dout, dsum);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaEventRecord(done));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    cudaError_t state;
    while ((state = cudaEventQuery(done)) == cudaErrorNotReady) {
      if (std::chrono::steady_clock::now() > deadline) {
        std::printf("B=%d S=%d: backward still running after 20 s, a pipeline barrier never completed (hang)\n", B, S);
        return 1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    CUDA_CHECK(state);
    CUDA_CHECK(cudaEventDestroy(done));
    std::printf("B=%d S=%d Hq=%d Hkv=%d D=%d causal backward\n", B, S, Hq, Hkv, D);
    if (check) all_ok &= check_grads(B, S, Hq, Hkv, q, k, v, o, dout, lse, dq, dk, dv, scale);
    if (!check_only && S >= 1024) {
      constexpr int kWarmup = 3, kIters = 10;
      void* flush;
      CUDA_CHECK(cudaMalloc(&flush, size_t(256) << 20));
      cudaEvent_t start, stop;
      CUDA_CHECK(cudaEventCreate(&start));
      CUDA_CHECK(cudaEventCreate(&stop));
      for (int i = 0; i < kWarmup; ++i) launch_bwd(bp, o, dout, dsum);
      std::vector<float> times;
      for (int i = 0; i < kIters; ++i) {
        CUDA_CHECK(cudaMemsetAsync(flush, i, size_t(256) << 20));
        CUDA_CHECK(cudaEventRecord(start));
        launch_bwd(bp, o, dout, dsum);
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        float ms;
        CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms);
      }
      std::sort(times.begin(), times.end());
      const float ms = 0.5f * (times[kIters / 2 - 1] + times[kIters / 2]);
      const double flops = 2.5 * 4.0 * B * Hq * double(S) * S * D / 2;  // backward = 2.5x the causal forward
      std::printf("  time %.3f ms (dsum + dq + dk/dv), %.1f TFLOP/s\n", ms, flops / (ms * 1e-3) / 1e12);
      CUDA_CHECK(cudaEventDestroy(start));
      CUDA_CHECK(cudaEventDestroy(stop));
      CUDA_CHECK(cudaFree(flush));
    }
    for (auto* t : {q, k, v, o, dout, dq, dk, dv}) CUDA_CHECK(cudaFree(t));
    CUDA_CHECK(cudaFree(lse));
    CUDA_CHECK(cudaFree(dsum));
  }
  std::printf("%s\n", all_ok ? "ALL PASS" : "SOME CHECKS FAILED");
  return all_ok ? 0 : 1;
}
