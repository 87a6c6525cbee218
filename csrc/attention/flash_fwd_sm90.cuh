// flash_fwd_sm90.cuh: the Hopper (sm_90a) flash-attention forward: TMA loads by a producer warp, wgmma in two
// consumer warpgroups, softmax overlapped with the tensor cores within each warpgroup and between the two (ping-pong
// on named barriers), FlashAttention-3's design written with CuTe. Causal, equal query and key lengths, GQA, head
// dim 64 or 128, bf16. Used by flash_fwd_sm90.cu (the extension) and by dev/attention (its standalone check and timing,
// and the ladder's earlier rungs built from the same pieces).
//
// Layouts: q [B, S, Hq, D], k/v [B, S, Hkv, D], o [B, S, Hq, D] (bf16, contiguous); lse [B, Hq, S] (fp32, natural
// log). Or packed documents (varlen): q/k/v/o [T, H, D] with int32 offsets cu_seqlens [B + 1] shared by queries and
// keys, lse [Hq, T]. Query head h reads KV head h / (Hq / Hkv). Row i of a sequence sees its keys 0..i.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

namespace l3k::sm90 {

using namespace cute;


// ------------------------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------------------------

template <int kHeadDim_>  // 64 or 128
struct FwdConfig {
  static_assert(kHeadDim_ == 64 || kHeadDim_ == 128, "head dim 64 or 128: whole 128-byte swizzle rows of bf16");
  using Element = cutlass::bfloat16_t;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;               // query rows per CTA: 64 per consumer warpgroup
  static constexpr int kBlockN = 128;               // keys per K/V tile
  static constexpr int kStages = 2;                 // depth of the K ring and of the V ring
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);  // warpgroup 0 produces, 1..2 consume
  static constexpr int kConsumerWarps = 4 * kConsumerWarpgroups;    // arrivals that free one ring slot
  static constexpr int kProducerRegs = 24;          // setmaxnreg budgets: 24*128 + 240*256 <= 64K registers
  static constexpr int kConsumerRegs = 240;

  using BlkM = Int<kBlockM>;
  using BlkN = Int<kBlockN>;
  using HDim = Int<kHeadDim>;

  // S = Q Kᵀ: A = Q tile (M x D, K-major), B = K tile (N x D, K-major), both from smem.
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, BlkN, HDim>>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));                      // warpgroup w owns rows 64w..64w+63
  // O += P V: A = P from registers (bf16), B = V tile viewed as (D x N) with D contiguous (MN-major).
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, HDim, BlkN>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));

  // 128-byte swizzled smem tiles, the layouts wgmma reads and TMA writes.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BlkM, HDim>{}));   // (M, D)
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<BlkN, HDim, Int<kStages>>{}));                          // (N, D, stage)
  // V atoms are 64 (D) x 8 (N); ordering them N-first keeps each 64-wide D slice of a stage contiguous, so TMA moves
  // a stage in D / 64 boxes of 64 x 128 instead of D / 4 boxes of 64 x 8.
  using SmemLayoutV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                             Shape<HDim, BlkN, Int<kStages>>{}, Step<_2, _1, _3>{}));      // (D, N, stage)

  // Global views as (rows, D, head, batch) for Q/K and (D, rows, head, batch) for V, so V lands D-contiguous.
  using GmemLayoutQK = Layout<Shape<int, int, int, int>, Stride<int64_t, _1, int64_t, int64_t>>;
  using GmemLayoutV = Layout<Shape<int, int, int, int>, Stride<_1, int64_t, int64_t, int64_t>>;

  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayoutQK{}),
                                      SmemLayoutQ{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayoutQK{}),
                                      take<0, 2>(SmemLayoutK{})));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayoutV{}),
                                      take<0, 2>(SmemLayoutV{})));

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    alignas(8) uint64_t q_full;
    uint64_t k_full[kStages];
    uint64_t k_empty[kStages];
    uint64_t v_full[kStages];
    uint64_t v_empty[kStages];
  };
};

template <class Cfg>
struct FwdParams {
  typename Cfg::TmaQ tma_q;
  typename Cfg::TmaK tma_k;
  typename Cfg::TmaV tma_v;
  cutlass::bfloat16_t* o;       // [B, S, Hq, D] or [T, Hq, D]
  float* lse;                   // [B, Hq, S] or [Hq, T]
  const int* cu_seqlens;        // [B + 1] offsets into packed q/k/v/o (varlen), or null (fixed length S)
  int batch, seqlen, heads_q, heads_kv;  // seqlen: S, or the longest sequence (varlen: sizes the grid)
  int rows;                     // rows of the q/k/v views: S, or T (varlen)
  float scale_log2;             // softmax_scale * log2(e): scores go through exp2
  float scale;                  // softmax_scale, for the natural-log lse
};

// ------------------------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The 4 threads of a quad hold the same two accumulator rows (wgmma C layout), so row reductions are 2 shuffles.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// wgmma accumulator ((2, 2, N/8), MMA_M, MMA_N) viewed as (rows, cols) = ((2, MMA_M), (2, N/8, MMA_N)):
// value mode 0 steps one column, mode 1 steps 8 rows, mode 2 steps 8 columns.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout const& l) {
  static_assert(rank_v<Layout> == 3 && rank(get<0>(Layout{})) == 3, "expected an SM90 wgmma accumulator layout");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// One warpgroup-wide wgmma over all k-blocks, committed as one batch; the caller waits with wgmma_wait.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(TiledMma& tiled_mma, TA const& tCrA, TB const& tCrB, TC& tCrC) {
  constexpr bool kRegA = !is_smem<typename TA::iterator>::value && !is_base_of<GMMA::DescriptorIterator,
                                                                                 typename TA::iterator>::value;
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(tCrA));
  warpgroup_fence_operand(tCrC);
  warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    cute::gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), tCrC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(tCrC);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(tCrA));
}


// Wait until at most N wgmma batches are pending, then fence the registers they wrote or read: the wait names no
// registers, so without the fence the compiler could move reads of a finished accumulator above it.
template <int N, class... Frags>
__device__ __forceinline__ void wgmma_wait(Frags&... frags) {
  warpgroup_wait<N>();
  (warpgroup_fence_operand(frags), ...);
}

// ------------------------------------------------------------------------------------------------------------------
// Kernel pieces shared by the versions. Grid (ceil(S / 128), Hq, B); one CTA computes one 128-row query tile of one
// head; warpgroup 0 produces, warpgroups 1 and 2 consume (rows 0..63 and 64..127 of the tile).
// ------------------------------------------------------------------------------------------------------------------

struct TileCoord {
  int m_block, row0, head_q, head_kv, batch;  // row0: the tile's first query row within its sequence
  int seq_start, seqlen;  // this sequence's first row in the packed views (0 for fixed length) and its length
  int n_block_max;        // key tiles 0 .. n_block_max - 1 are visible to some row of the tile
  // A varlen grid's tile past the end of a short sequence: no rows to compute.
  __device__ bool empty() const { return row0 >= seqlen; }
};

template <class Cfg>
__device__ __forceinline__ TileCoord tile_coord(FwdParams<Cfg> const& params) {
  TileCoord t;
  // Grid (Hq, B, m blocks): blocks go out x fastest, so the longest causal tiles (highest m_block) of every head
  // and sequence go out first, and the short ones fill in at the end.
  t.m_block = gridDim.z - 1 - blockIdx.z;
  t.row0 = t.m_block * Cfg::kBlockM;
  t.head_q = blockIdx.x;
  t.batch = blockIdx.y;
  t.head_kv = t.head_q / (params.heads_q / params.heads_kv);
  t.seq_start = params.cu_seqlens ? params.cu_seqlens[t.batch] : 0;
  t.seqlen = params.cu_seqlens ? params.cu_seqlens[t.batch + 1] - t.seq_start : params.seqlen;
  // Keys this tile can see: 0 .. min(S, (m_block + 1) * kBlockM) - 1.
  t.n_block_max = cute::ceil_div(std::min(t.seqlen, (t.m_block + 1) * Cfg::kBlockM), int(Cfg::kBlockN));
  return t;
}

// Thread 0 initialises every mbarrier; the caller syncs the CTA before any use.
template <class Cfg>
__device__ __forceinline__ void init_barriers(typename Cfg::SharedStorage& smem) {
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&smem.q_full, 1);
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < Cfg::kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.k_full[s], 1);
      cutlass::arch::ClusterTransactionBarrier::init(&smem.v_full[s], 1);
      cutlass::arch::ClusterBarrier::init(&smem.k_empty[s], Cfg::kConsumerWarps);
      cutlass::arch::ClusterBarrier::init(&smem.v_empty[s], Cfg::kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
}

// The producer (one thread): the Q tile once, then K and V tiles from the diagonal down to key tile 0 into the
// kStages-deep rings, K(n) before V(n). Each slot waits for its empty barrier (one arrival per consumer warp).
template <class Cfg>
__device__ __forceinline__ void produce(FwdParams<Cfg> const& params, typename Cfg::SharedStorage& smem,
                                        TileCoord const& t) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});  // (M, D)
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutK{});  // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Cfg::SmemLayoutV{});  // (D, N, stage)
  // Varlen views are one "batch" of T rows; a sequence's tiles start at its offset. Rows past it (the next
  // sequence's) are loaded but masked as keys and never stored as queries; rows past T arrive zero-filled. (So a
  // non-finite value in the next document's V would reach this one's output through 0 · Inf, where the mma.sync
  // kernel zero-fills those rows; finite inputs give identical results.)
  const int batches = params.cu_seqlens ? 1 : params.batch, b = params.cu_seqlens ? 0 : t.batch;
  Tensor mQ = params.tma_q.get_tma_tensor(make_shape(params.rows, kHeadDim, params.heads_q, batches));
  Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.rows, kHeadDim, params.heads_kv, batches));
  Tensor mV = params.tma_v.get_tma_tensor(make_shape(kHeadDim, params.rows, params.heads_kv, batches));
  Tensor gQ = local_tile(domain_offset(make_coord(t.seq_start, _0{}), mQ(_, _, t.head_q, b)),
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(t.m_block, _0{}));     // (M, D)
  Tensor gK = local_tile(domain_offset(make_coord(t.seq_start, _0{}), mK(_, _, t.head_kv, b)),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));             // (N, D, n_block)
  Tensor gV = local_tile(domain_offset(make_coord(_0{}, t.seq_start), mV(_, _, t.head_kv, b)),
                         Shape<Int<kHeadDim>, Int<kBlockN>>{}, make_coord(_0{}, _));             // (D, N, n_block)

  auto cta_tma_q = params.tma_q.get_slice(0);
  auto cta_tma_k = params.tma_k.get_slice(0);
  auto cta_tma_v = params.tma_v.get_slice(0);
  Tensor tQgQ = cta_tma_q.partition_S(gQ);  // (TMA, 1, 1)
  Tensor tQsQ = cta_tma_q.partition_D(sQ);
  Tensor tKgK = cta_tma_k.partition_S(gK);  // (TMA, 1, 1, n_block)
  Tensor tKsK = cta_tma_k.partition_D(sK);  // (TMA, 1, 1, stage)
  Tensor tVgV = cta_tma_v.partition_S(gV);
  Tensor tVsV = cta_tma_v.partition_D(sV);
  static_assert(rank_v<decltype(tKgK)> == 4 && rank_v<decltype(tKsK)> == 4, "K: (TMA, 1, 1, tile or stage)");
  static_assert(rank_v<decltype(tVgV)> == 4 && rank_v<decltype(tVsV)> == 4, "V: (TMA, 1, 1, tile or stage)");

  // Rows past S arrive zero-filled; the transaction count is always the whole box.
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.q_full, Cfg::kQBytes);
  copy(params.tma_q.with(smem.q_full), tQgQ, tQsQ);

  int stage = 0, phase = 0;
  for (int n_block = t.n_block_max - 1; n_block >= 0; --n_block) {
    // A fresh mbarrier counts as having completed the phase before phase 0, so the first lap does not block.
    cutlass::arch::ClusterBarrier::wait(&smem.k_empty[stage], phase ^ 1);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.k_full[stage], Cfg::kKVBytes);
    copy(params.tma_k.with(smem.k_full[stage]), tKgK(_, _, _, n_block), tKsK(_, _, _, stage));
    cutlass::arch::ClusterBarrier::wait(&smem.v_empty[stage], phase ^ 1);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.v_full[stage], Cfg::kKVBytes);
    copy(params.tma_v.with(smem.v_full[stage]), tVgV(_, _, _, n_block), tVsV(_, _, _, stage));
    if (++stage == Cfg::kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

// A ring position as the consumers see it: slot index and the parity of the barrier phase to wait for.
template <int kStages>
struct RingPos {
  int stage = 0, phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// One arrival per consumer warp frees a slot; call after the wgmma reading it has completed (warpgroup_wait).
__device__ __forceinline__ void release_slot(uint64_t* empty_barrier) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) cutlass::arch::ClusterBarrier::arrive(empty_barrier);
}

// Keys past the diagonal and past S get -inf. Needed only where a tile reaches past the tile's first row or past S
// (with kBlockM == kBlockN: the first, diagonal tile).
template <class Cfg, class Scores, class Coords>
__device__ __forceinline__ void mask_scores(Scores& scores, Coords const& score_coords, int row0, int n_block,
                                            int seqlen) {
  const int col0 = n_block * Cfg::kBlockN;
  if (col0 + Cfg::kBlockN - 1 > row0 || col0 + Cfg::kBlockN > seqlen) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      const int last_key = std::min(row0 + int(get<0>(score_coords(r, 0))), seqlen - 1);
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        if (col0 + int(get<1>(score_coords(r, c))) > last_key) scores(r, c) = -INFINITY;
      }
    }
  }
}

// Online softmax of one score tile in fp32: scores become p = 2^(s * scale_log2 - m * scale_log2) in place, the
// running max and (thread-partial) sum are updated, and the factor by which O must be rescaled is returned per row.
// A row with every key masked so far keeps m = -inf and subtracts 0 instead, so exp2 gives 0, not NaN.
template <class Scores, int kRows>
__device__ __forceinline__ void online_softmax(Scores& scores, float (&row_max)[kRows], float (&row_sum)[kRows],
                                               float (&correction)[kRows], float scale_log2) {
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    float m = row_max[r];
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) m = fmaxf(m, scores(r, c));
    m = quad_max(m);
    const float m_scaled = (m == -INFINITY) ? 0.f : m * scale_log2;
    correction[r] = fast_exp2(row_max[r] * scale_log2 - m_scaled);
    row_max[r] = m;
    float sum = 0.f;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) {
      scores(r, c) = fast_exp2(scores(r, c) * scale_log2 - m_scaled);
      sum += scores(r, c);
    }
    row_sum[r] = row_sum[r] * correction[r] + sum;
  }
}

template <class Out, int kRows>
__device__ __forceinline__ void rescale_rows(Out& out, float const (&correction)[kRows]) {
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(out); ++c) out(r, c) *= correction[r];
  }
}

// P to bf16 in registers, pairs at a time (adjacent columns); P's flat order is S's (checked by the layout test).
template <class TS, class TP>
__device__ __forceinline__ void convert_p(TS const& tSrS, TP& tOrP) {
  using Element = typename TP::value_type;
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(tSrS); i += 2) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(tSrS(i), tSrS(i + 1));
    tOrP(i) = reinterpret_cast<Element const&>(pair.x);
    tOrP(i + 1) = reinterpret_cast<Element const&>(pair.y);
  }
}

// Epilogue: normalise, write O (bf16 pairs) and lse straight from registers; rows past S are skipped.
template <class Cfg, class Out, class OutCoords, int kRows>
__device__ __forceinline__ void store_output(FwdParams<Cfg> const& params, TileCoord const& t, Out const& out,
                                             OutCoords const& out_coords, float const (&row_max)[kRows],
                                             float const (&row_sum)[kRows]) {
  const int row0 = t.row0, seqlen = t.seqlen;
  // Packed rows of this sequence in o, and the lse index of its row 0: [B, Hq, S] or [Hq, T].
  const int64_t o_row0 = params.cu_seqlens ? int64_t(t.seq_start) : int64_t(t.batch) * seqlen;
  const int64_t lse0 = params.cu_seqlens ? int64_t(t.head_q) * params.rows + t.seq_start
                                         : (int64_t(t.batch) * params.heads_q + t.head_q) * seqlen;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const float inv_sum = (sum == 0.f) ? 0.f : 1.f / sum;
    const int row = row0 + int(get<0>(out_coords(r, 0)));
    if (row < seqlen) {
      __nv_bfloat16* o_row = reinterpret_cast<__nv_bfloat16*>(params.o) +
                             ((o_row0 + row) * params.heads_q + t.head_q) * Cfg::kHeadDim;
      // Columns c, c+1 of the row view are adjacent output columns (value mode 0 has extent 2).
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(out); c += 2) {
        const int col = int(get<1>(out_coords(r, c)));
        *reinterpret_cast<__nv_bfloat162*>(o_row + col) =
            __floats2bfloat162_rn(out(r, c) * inv_sum, out(r, c + 1) * inv_sum);
      }
      if (threadIdx.x % 4 == 0) {
        const float lse = (sum == 0.f) ? -INFINITY : row_max[r] * params.scale + logf(sum);
        params.lse[lse0 + row] = lse;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Host side: TMA descriptors (through cudaGetDriverEntryPointByVersion, no -lcuda) built once per problem, then
// launches that only enqueue the kernel.
// ------------------------------------------------------------------------------------------------------------------

// cu_seqlens null: q [B, S, Hq, D], k/v [B, S, Hkv, D]. Else packed [T, H, D] (T = total_rows) with offsets
// cu_seqlens [batch + 1] for queries and keys alike, and seqlen = the longest sequence.
template <class Cfg>
FwdParams<Cfg> make_fwd_params(const cutlass::bfloat16_t* q, const cutlass::bfloat16_t* k, const cutlass::bfloat16_t* v,
                          cutlass::bfloat16_t* o, float* lse, const int* cu_seqlens, int batch, int seqlen,
                          int total_rows, int heads_q, int heads_kv, float softmax_scale) {
  const int64_t d = Cfg::kHeadDim;
  const int rows = cu_seqlens ? total_rows : seqlen, batches = cu_seqlens ? 1 : batch;
  auto layout_q = make_layout(make_shape(rows, int(d), heads_q, batches),
                              make_stride(int64_t(heads_q) * d, _1{}, d, int64_t(rows) * heads_q * d));
  auto layout_k = make_layout(make_shape(rows, int(d), heads_kv, batches),
                              make_stride(int64_t(heads_kv) * d, _1{}, d, int64_t(rows) * heads_kv * d));
  auto layout_v = make_layout(make_shape(int(d), rows, heads_kv, batches),
                              make_stride(_1{}, int64_t(heads_kv) * d, d, int64_t(rows) * heads_kv * d));
  // CuTe reports a failed cuTensorMapEncodeTiled with a message and an assert: the dev Makefile keeps asserts on;
  // the extension (NDEBUG) keeps every stride in range instead (flash_fwd_sm90_covers).
  return FwdParams<Cfg>{
      make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(q), layout_q), typename Cfg::SmemLayoutQ{}),
      make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(k), layout_k), take<0, 2>(typename Cfg::SmemLayoutK{})),
      make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(v), layout_v), take<0, 2>(typename Cfg::SmemLayoutV{})),
      o,
      lse,
      cu_seqlens,
      batch,
      seqlen,
      heads_q,
      heads_kv,
      rows,
      softmax_scale * 1.4426950408889634f,
      softmax_scale,
  };
}

// Opt the kernel in to the shared memory it needs (once, before the first launch).
template <class Cfg>
cudaError_t prepare_fwd(void (*kernel)(FwdParams<Cfg>)) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              int(sizeof(typename Cfg::SharedStorage)));
}

template <class Cfg>
void launch_fwd(void (*kernel)(FwdParams<Cfg>), FwdParams<Cfg> const& params, cudaStream_t stream) {
  dim3 grid(params.heads_q, params.batch, cute::ceil_div(params.seqlen, Cfg::kBlockM));
  kernel<<<grid, Cfg::kThreads, int(sizeof(typename Cfg::SharedStorage)), stream>>>(params);
}

// ------------------------------------------------------------------------------------------------------------------
// The kernel (dev/attention's v2 rung): after the diagonal tile, step n issues S(n) = Q K(n)ᵀ and O += P(n+1) V(n+1)
// back to back, waits for S(n) only, runs the softmax of S(n) while the PV wgmma is in flight, then waits for it and
// rescales O; the two consumer warpgroups take turns issuing their wgmma (ping-pong), so one's softmax runs under the
// other's GEMMs.
// ------------------------------------------------------------------------------------------------------------------

// Named barriers "consumer warpgroup w may issue its wgmma" (user ids 1 and 2; CUTLASS adds its 8 reserved ids, so
// the hardware barriers are 9 and 10, and 0 is __syncthreads). 256 threads each: the 128 of the warpgroup that waits
// (bar.sync) and the 128 of the other one, which lets it go (bar.arrive).
constexpr int kSchedBarrier0 = 1;
constexpr int kSchedThreads = 256;

__device__ __forceinline__ void sched_wait(int consumer) {
  cutlass::arch::NamedBarrier::sync(kSchedThreads, kSchedBarrier0 + consumer);
}
__device__ __forceinline__ void sched_pass(int consumer) {
  cutlass::arch::NamedBarrier::arrive(kSchedThreads, kSchedBarrier0 + (consumer ^ 1));
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) flash_fwd_sm90_kernel(__grid_constant__ FwdParams<Cfg> const params) {
  using Element = typename Cfg::Element;
  using SharedStorage = typename Cfg::SharedStorage;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
  static_assert(Cfg::kConsumerWarpgroups == 2, "the ping-pong pairs two consumer warpgroups");

  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  const TileCoord t = tile_coord<Cfg>(params);
  if (t.empty()) return;  // uniform over the CTA, before any barrier
  init_barriers<Cfg>(smem);
  __syncthreads();

  if (threadIdx.x / 128 == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (threadIdx.x == 0) produce<Cfg>(params, smem, t);
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
  const int mma_tid = threadIdx.x - 128;
  const int consumer = mma_tid / 128;  // 0 or 1
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});  // (M, D)
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutK{});  // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Cfg::SmemLayoutV{});  // (D, N, stage)

  typename Cfg::TiledMmaQK tiled_mma_qk;
  typename Cfg::TiledMmaPV tiled_mma_pv;
  auto thr_mma_qk = tiled_mma_qk.get_thread_slice(mma_tid);
  auto thr_mma_pv = tiled_mma_pv.get_thread_slice(mma_tid);

  Tensor tSrQ = thr_mma_qk.partition_fragment_A(sQ);  // wgmma descriptors (1, MMA_M, k_block)
  Tensor tSrK = thr_mma_qk.partition_fragment_B(sK);  // (1, MMA_N, k_block, stage)
  Tensor tOrV = thr_mma_pv.partition_fragment_B(sV);  // (1, MMA_N, k_block, stage)

  Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});   // fp32 scores
  Tensor tOrO = partition_fragment_C(tiled_mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // fp32 output
  // P (bf16) has its own registers: it is the A operand of a PV wgmma still in flight while S(n) is overwritten.
  Tensor tOrP = make_tensor<Element>(partition_shape_A(tiled_mma_pv, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  static_assert(size(decltype(tOrP){}) == size(decltype(tSrS){}), "P is S element for element");

  Tensor tScS = thr_mma_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOcO = thr_mma_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor scores = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));  // (2 rows, 32 cols) per thread
  Tensor score_coords = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor out = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));     // (2 rows, D / 4 cols) per thread
  Tensor out_coords = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = size<0>(decltype(scores){});
  static_assert(kRows == 2, "each thread owns two accumulator rows");

  float row_max[kRows], row_sum[kRows], correction[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  clear(tOrO);

  const int row0 = t.row0;
  const int n_last = t.n_block_max - 1;  // the diagonal tile, processed first
  // Both warpgroups run n_last turns through the scheduler barriers (one per step below). Consumer 1 opens
  // consumer 0's first turn and skips its own last pass, so every barrier's arrivals match its waits exactly.
  if (consumer == 1 && n_last > 0) sched_pass(consumer);

  RingPos<Cfg::kStages> k_pos, v_pos;  // V lags K by one tile
  cutlass::arch::ClusterBarrier::wait(&smem.q_full, 0);

  // First (diagonal) tile: S, mask, softmax; its PV is issued by the next step (or the tail).
  cutlass::arch::ClusterBarrier::wait(&smem.k_full[k_pos.stage], k_pos.phase);
  wgmma_gemm<true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, k_pos.stage), tSrS);
  wgmma_wait<0>(tSrS);
  release_slot(&smem.k_empty[k_pos.stage]);
  k_pos.advance();
  mask_scores<Cfg>(scores, score_coords, row0, n_last, t.seqlen);
  online_softmax(scores, row_max, row_sum, correction, params.scale_log2);  // O is zero: no rescale
  convert_p(tSrS, tOrP);

  for (int n_block = n_last - 1; n_block >= 0; --n_block) {
    cutlass::arch::ClusterBarrier::wait(&smem.k_full[k_pos.stage], k_pos.phase);
    cutlass::arch::ClusterBarrier::wait(&smem.v_full[v_pos.stage], v_pos.phase);
    sched_wait(consumer);
    wgmma_gemm<true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, k_pos.stage), tSrS);      // S(n) = Q K(n)ᵀ
    wgmma_gemm<false>(tiled_mma_pv, tOrP, tOrV(_, _, _, v_pos.stage), tOrO);     // O += P(n+1) V(n+1)
    if (consumer == 0 || n_block > 0) sched_pass(consumer);
    wgmma_wait<1>(tSrS);  // S(n) done; the PV batch may still run
    release_slot(&smem.k_empty[k_pos.stage]);
    k_pos.advance();

    mask_scores<Cfg>(scores, score_coords, row0, n_block, t.seqlen);
    online_softmax(scores, row_max, row_sum, correction, params.scale_log2);

    // PV done: O and P may be touched again. The wait sits in a branch the compiler cannot resolve (both arms are
    // the same): written plainly, ptxas hoists it above the softmax (seen in the SASS: every MUFU.EX2 and SHFL after
    // the PV finished), which undoes the overlap; in a branch it stays after them.
    if (params.seqlen > 0) {
      wgmma_wait<0>(tOrO, tOrP);
    } else {
      wgmma_wait<0>(tOrO, tOrP);
    }
    release_slot(&smem.v_empty[v_pos.stage]);
    v_pos.advance();
    rescale_rows(out, correction);  // O holds P(n+1) V(n+1) at the old max
    convert_p(tSrS, tOrP);
  }

  // Tail: the last tile's PV.
  cutlass::arch::ClusterBarrier::wait(&smem.v_full[v_pos.stage], v_pos.phase);
  wgmma_gemm<false>(tiled_mma_pv, tOrP, tOrV(_, _, _, v_pos.stage), tOrO);
  wgmma_wait<0>(tOrO, tOrP);
  release_slot(&smem.v_empty[v_pos.stage]);
  store_output<Cfg>(params, t, out, out_coords, row_max, row_sum);
}

}  // namespace l3k::sm90
