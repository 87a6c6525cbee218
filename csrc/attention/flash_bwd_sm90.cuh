// flash_bwd_sm90.cuh: the Hopper (sm_90a) attention backward: causal GQA, head dim 64 or 128, bf16, deterministic. A dsum
// pre-pass and two TMA + wgmma kernels (one producer warpgroup, two consumer warpgroups): dq over a 128-row query
// tile's key tiles, dk/dv over a 128-row key tile's query tiles for every query head of its KV group. Used by
// flash_bwd_sm90.cu (the extension, opt-in) and dev/attention/v3_wgmma_bwd.cu (its standalone check and timing).
//
// Gradients of o = softmax(scale · q kᵀ) v with the forward's lse (natural log) and dsum_i = Σ_d do_i · o_i:
//   P = exp(scale · q kᵀ − lse), dP = do vᵀ, dS = P ⊙ (dP − dsum), dq = scale · dS k, dk = scale · dSᵀ q, dv = Pᵀ do.
// Deterministic, no atomics, as the mma.sync backward: each output tile has one owner, so S and dP are computed in
// both kernels (7 GEMMs where an atomic dq would need 5), and the group's dk/dv sum happens in registers.
// Layouts: q, o, do [B, S, Hq, D], k, v [B, S, Hkv, D] bf16; lse, dsum [B, Hq, S] fp32; dq like q, dk/dv like k.
// Or packed documents (varlen): [T, H, D] with int32 offsets cu_seqlens [B + 1] for queries and keys alike, lse and
// dsum [Hq, T]; a sequence's tiles start at its offset, rows past it are masked and never stored.
#pragma once

#include <type_traits>

#include "flash_fwd_sm90.cuh"  // same folder: found from the extension and from dev/attention

namespace l3k::sm90 {

// ------------------------------------------------------------------------------------------------------------------
// Configuration: "big" tiles of 128 rows are loaded once per CTA (q and do in the dq kernel, k and v in the dk/dv
// kernel), "small" tiles of 64 rows stream through 2-stage rings. Every tile is K-major (rows, D) as TMA writes
// it; operands used transposed read the same bytes through an MN-major (D, rows) view (the layout self-test checks
// that both views address every element identically).
// ------------------------------------------------------------------------------------------------------------------

template <int kHeadDim_>  // 64 or 128
struct BwdConfig {
  static_assert(kHeadDim_ == 64 || kHeadDim_ == 128, "head dim 64 or 128: whole 128-byte swizzle rows of bf16");
  using Element = cutlass::bfloat16_t;
  static constexpr int kHeadDim = kHeadDim_, kBig = 128, kSmall = 64, kStages = 2;
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

template <class Cfg>
struct BwdParams {
  typename Cfg::TmaBig tma_q_big, tma_do_big, tma_k_big, tma_v_big;
  typename Cfg::TmaSmall tma_q_small, tma_do_small, tma_k_small, tma_v_small;
  const float* lse;   // [B, Hq, S] or [Hq, T], natural log
  const float* dsum;  // like lse
  cutlass::bfloat16_t *dq, *dk, *dv;
  const int* cu_seqlens;  // [B + 1] (varlen) or null
  int batch, seqlen, heads_q, heads_kv;  // seqlen: S, or the longest sequence (varlen: sizes the grid)
  int rows;                              // rows of the views: S, or T (varlen)
  float scale, scale_log2;
};

// ------------------------------------------------------------------------------------------------------------------
// Shared pieces
// ------------------------------------------------------------------------------------------------------------------

// Sequence `seq` (blockIdx.y) as the kernels see it: where its rows start in the (rows, D, H, batches) views and in
// o/dq/dk/dv, its length, and which batch index the views take.
struct BwdSeq {
  int start, len, view_batch, batches;
  int64_t row_base;  // rows of the [*, H, D] tensors before this sequence's row 0
  template <class P>
  __device__ BwdSeq(P const& p, int seq) {
    const bool packed = p.cu_seqlens != nullptr;
    start = packed ? p.cu_seqlens[seq] : 0;
    len = packed ? p.cu_seqlens[seq + 1] - start : p.seqlen;
    view_batch = packed ? 0 : seq;
    batches = packed ? 1 : p.batch;
    row_base = packed ? int64_t(start) : int64_t(seq) * p.seqlen;
  }
  // lse/dsum of query head h start at stat0 + h · stat_stride: [B, Hq, S] or [Hq, T]
  template <class P>
  __device__ int64_t stat0(P const& p) const {
    return p.cu_seqlens ? int64_t(start) : int64_t(view_batch) * p.heads_q * len;
  }
  template <class P>
  __device__ int stat_stride(P const& p) const { return p.cu_seqlens ? p.rows : len; }
};

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
template <class Cfg, class Tma, class Dst>
__device__ __forceinline__ void load_big(Tma const& tma, int rows, int heads, int batches, int seq_start, int row0,
                                         int h, int b, Dst& dst, uint64_t& bar) {
  Tensor m = tma.get_tma_tensor(make_shape(rows, int(Cfg::kHeadDim), heads, batches));
  Tensor g = local_tile(domain_offset(make_coord(seq_start, _0{}), m(_, _, h, b)),
                        Shape<typename Cfg::Big, typename Cfg::HDim>{}, make_coord(row0 / int(Cfg::kBig), _0{}));
  auto cta = tma.get_slice(0);
  copy(tma.with(bar), cta.partition_S(g), cta.partition_D(dst));
}

// TMA of one 64-row tile (tile index `tile` of 64 rows) into stage `stage` of `ring` (SmemSmall).
template <class Cfg, class Tma, class Ring>
__device__ __forceinline__ void load_small(Tma const& tma, int rows, int heads, int batches, int seq_start, int tile,
                                           int h, int b, Ring& ring, int stage, uint64_t& bar) {
  Tensor m = tma.get_tma_tensor(make_shape(rows, int(Cfg::kHeadDim), heads, batches));
  Tensor g = local_tile(domain_offset(make_coord(seq_start, _0{}), m(_, _, h, b)),
                        Shape<typename Cfg::Small, typename Cfg::HDim>{}, make_coord(tile, _0{}));
  auto cta = tma.get_slice(0);
  Tensor dst = cta.partition_D(ring);  // (TMA, 1, 1, stage)
  copy(tma.with(bar), cta.partition_S(g), dst(_, _, _, stage));
}

// The producer's two fixed tiles (128 rows at row0 of head h from tma0 and tma1), one transaction on big_full.
template <class Cfg, class Tma, class Dst>
__device__ __forceinline__ void load_big_pair(typename Cfg::SharedStorage& smem, BwdParams<Cfg> const& p, BwdSeq const& sq,
                                              Tma const& tma0, Tma const& tma1, int heads, int row0, int h,
                                              Dst& dst0, Dst& dst1) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.big_full, 2 * Cfg::kBigBytes);
  load_big<Cfg>(tma0, p.rows, heads, sq.batches, sq.start, row0, h, sq.view_batch, dst0, smem.big_full);
  load_big<Cfg>(tma1, p.rows, heads, sq.batches, sq.start, row0, h, sq.view_batch, dst1, smem.big_full);
}

// One producer step: 64-row tile `tile` of head h from tma0 into ring 0 and from tma1 into ring 1, each slot
// waited for (empty) and announced (full, with its byte count) on its own barriers.
template <class Cfg, class Tma, class Ring>
__device__ __forceinline__ void load_small_pair(typename Cfg::SharedStorage& smem, RingPos<Cfg::kStages> const& pos,
                                                BwdParams<Cfg> const& p, BwdSeq const& sq, Tma const& tma0,
                                                Tma const& tma1, int heads, int tile, int h, Ring& ring0,
                                                Ring& ring1) {
  cutlass::arch::ClusterBarrier::wait(&smem.empty0[pos.stage], pos.phase ^ 1);
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full0[pos.stage], Cfg::kSmallBytes);
  load_small<Cfg>(tma0, p.rows, heads, sq.batches, sq.start, tile, h, sq.view_batch, ring0, pos.stage,
                  smem.full0[pos.stage]);
  cutlass::arch::ClusterBarrier::wait(&smem.empty1[pos.stage], pos.phase ^ 1);
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full1[pos.stage], Cfg::kSmallBytes);
  load_small<Cfg>(tma1, p.rows, heads, sq.batches, sq.start, tile, h, sq.view_batch, ring1, pos.stage,
                  smem.full1[pos.stage]);
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

// Writes a (2 rows, cols) fp32 accumulator view, times `mul`, as bf16 pairs into rows of a [B, S, H, D] (or
// packed [T, H, D]) tensor.
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
__global__ void __launch_bounds__(Cfg::kThreads, 1) dq_sm90_kernel(__grid_constant__ BwdParams<Cfg> const p) {
  using Element = typename Cfg::Element;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const int m_block = gridDim.z - 1 - blockIdx.z, h = blockIdx.x;  // longest tiles first
  const BwdSeq sq(p, blockIdx.y);
  const int hkv = h / (p.heads_q / p.heads_kv), S = sq.len;
  const int row0 = m_block * Cfg::kBig;
  if (row0 >= S) return;  // a varlen grid's tile past a short sequence; uniform, before any barrier
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
      load_big_pair<Cfg>(smem, p, sq, p.tma_q_big, p.tma_do_big, p.heads_q, row0, h, sQ, sdO);
      RingPos<Cfg::kStages> pos;
      for (int n = n_tiles - 1; n >= 0; --n) {
        load_small_pair<Cfg>(smem, pos, p, sq, p.tma_k_small, p.tma_v_small, p.heads_kv, n, hkv, sK, sV);
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
    const int64_t at = sq.stat0(p) + int64_t(h) * sq.stat_stride(p) + row;
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
    wgmma_wait<1>(tSrS);  // S is done; P is computed while dP still runs

    const int col0 = n * Cfg::kSmall;
    const bool edge = col0 + Cfg::kSmall - 1 > row0 || col0 + Cfg::kSmall > S;  // the diagonal or the tail
    auto keep = [&](int r, int c) {
      const int row = row0 + int(get<0>(s_coords(r, 0))), key = col0 + int(get<1>(s_coords(r, c)));
      return !edge || (key <= row && key < S);
    };
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(s); ++c) s(r, c) = keep(r, c) ? fast_exp2(s(r, c) * p.scale_log2 - lse2[r]) : 0.f;
    }
    wgmma_wait<0>(tPrP);
    release_slot(&smem.empty1[pos.stage]);  // v is done with
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        s(r, c) = keep(r, c) ? s(r, c) * (dp(r, c) - dsum[r]) : 0.f;  // dS (masked: 0 even if dP is not finite)
      }
    }
    to_bf16(tSrS, tQrdS);
    wgmma_gemm<false>(mma_acc, tQrdS, tQrKt(_, _, _, pos.stage), tQrQ);  // dq += dS k
    wgmma_wait<0>(tQrQ, tQrdS);
    release_slot(&smem.empty0[pos.stage]);
    pos.advance();
  }
  store_rows(dq, dq_coords, p.scale, row0, S, p.dq + (sq.row_base * p.heads_q + h) * Cfg::kHeadDim,
             int64_t(p.heads_q) * Cfg::kHeadDim);
}

// ------------------------------------------------------------------------------------------------------------------
// dk/dv kernel: grid (Hkv, B, ceil(S / 128)). Big tiles: k, v of 128 keys; rings: q, do tiles of 64 queries, for
// every query head of the KV group and every query tile at or past the key tile (causal).
// ------------------------------------------------------------------------------------------------------------------

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) dkdv_sm90_kernel(__grid_constant__ BwdParams<Cfg> const p) {
  using Element = typename Cfg::Element;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const int n_block = blockIdx.z, hkv = blockIdx.x;  // low n first: the longest query ranges
  const BwdSeq sq(p, blockIdx.y);
  const int group = p.heads_q / p.heads_kv, S = sq.len;
  const int key0 = n_block * Cfg::kBig;
  if (key0 >= S) return;  // a varlen grid's tile past a short sequence; uniform, before any barrier
  const int64_t stat0 = sq.stat0(p);  // hoisted: per iteration it cost registers (spills)
  const int stat_stride = sq.stat_stride(p);
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
      load_big_pair<Cfg>(smem, p, sq, p.tma_k_big, p.tma_v_big, p.heads_kv, key0, hkv, sK, sV);
      RingPos<Cfg::kStages> pos;
      for (int it = 0; it < group * per_head; ++it) {
        const int h = hkv * group + it / per_head, m = m_first + it % per_head;
        load_small_pair<Cfg>(smem, pos, p, sq, p.tma_q_small, p.tma_do_small, p.heads_q, m, h, sQ, sdO);
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
    const int64_t stat_h = stat0 + int64_t(h) * stat_stride;
    const float* lse_h = p.lse + stat_h;
    const float* dsum_h = p.dsum + stat_h;
    cutlass::arch::ClusterBarrier::wait(&smem.full0[pos.stage], pos.phase);
    wgmma_gemm<true>(mma_s, tSrK, tSrQ(_, _, _, pos.stage), tSrS);    // Sᵀ = k qᵀ
    cutlass::arch::ClusterBarrier::wait(&smem.full1[pos.stage], pos.phase);
    wgmma_gemm<true>(mma_s, tPrV, tPrdO(_, _, _, pos.stage), tPrP);   // dPᵀ = v doᵀ
    // One wait for both: with wait<1> first (Pᵀ while dPᵀ runs, as the dq kernel does), ptxas moved the second
    // wait up to the first anyway and the extra live registers spilled (28 B against 8 B).
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
  const int64_t base = (sq.row_base * p.heads_kv + hkv) * Cfg::kHeadDim;
  store_rows(dk, o_coords, p.scale, key0, S, p.dk + base, row_stride);
  store_rows(dv, o_coords, 1.f, key0, S, p.dv + base, row_stride);
}

// dsum[b, h, i] = Σ_d do · o in fp32: one warp per (b, i, h) row, D / 32 elements a lane (8 or 4 bytes).
template <int D>
__global__ void dsum_sm90_kernel(const __nv_bfloat16* o, const __nv_bfloat16* dout, float* dsum, int batch, int seqlen,
                                 int heads) {
  using Vec = std::conditional_t<D == 128, uint2, uint32_t>;
  static_assert(sizeof(Vec) * 32 == D * sizeof(__nv_bfloat16), "a warp covers one row");
  constexpr int kPairs = D / 64;  // bf16 pairs a lane
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;  // (b, i, h) flattened
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(batch) * seqlen * heads) return;
  const Vec ov = reinterpret_cast<const Vec*>(o + row * D)[lane];
  const Vec dv = reinterpret_cast<const Vec*>(dout + row * D)[lane];
  const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
  const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
  float acc = 0.f;
  for (int j = 0; j < kPairs; ++j) {
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

template <class Cfg>
BwdParams<Cfg> make_bwd_params(const cutlass::bfloat16_t* q, const cutlass::bfloat16_t* k,
                               const cutlass::bfloat16_t* v, const cutlass::bfloat16_t* dout, const float* lse,
                               const float* dsum, cutlass::bfloat16_t* dq, cutlass::bfloat16_t* dk,
                               cutlass::bfloat16_t* dv, const int* cu_seqlens, int batch, int seqlen, int total_rows,
                               int heads_q, int heads_kv, float scale) {
  const int64_t d = Cfg::kHeadDim;
  const int rows = cu_seqlens ? total_rows : seqlen, batches = cu_seqlens ? 1 : batch;
  auto layout = [&](int heads) {  // (rows, D, H, B) of a [B, S, H, D] tensor, or (T, D, H, 1) of [T, H, D]
    return make_layout(make_shape(rows, int(d), heads, batches),
                       make_stride(int64_t(heads) * d, _1{}, d, int64_t(rows) * heads * d));
  };
  auto big = [&](const cutlass::bfloat16_t* t, int heads) {
    return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(t), layout(heads)), typename Cfg::SmemBig{});
  };
  auto small = [&](const cutlass::bfloat16_t* t, int heads) {
    return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(t), layout(heads)),
                         take<0, 2>(typename Cfg::SmemSmall{}));
  };
  return BwdParams<Cfg>{big(q, heads_q),   big(dout, heads_q),   big(k, heads_kv),   big(v, heads_kv),
                        small(q, heads_q), small(dout, heads_q), small(k, heads_kv), small(v, heads_kv),
                        lse,               dsum,                 dq,                 dk,
                        dv,                cu_seqlens,           batch,              seqlen,
                        heads_q,           heads_kv,             rows,               scale,
                        scale * 1.4426950408889634f};
}

// Opt both kernels in to the shared memory they need (before the first launch on a device).
template <class Cfg>
cudaError_t prepare_bwd() {
  const int smem = int(sizeof(typename Cfg::SharedStorage));
  cudaError_t err = cudaFuncSetAttribute(dq_sm90_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(dkdv_sm90_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
}

// The whole backward on one stream: dsum (into the caller's fp32 workspace shaped like lse: [B, Hq, S] or [Hq, T]),
// then dq and dk/dv. (Packed documents: a non-finite value in the next document's rows would reach this one's
// gradients through 0 · Inf inside the wgmma, as in the forward; finite inputs give exact masking.)
template <class Cfg>
void launch_bwd(BwdParams<Cfg> const& p, const __nv_bfloat16* o, const __nv_bfloat16* dout, float* dsum,
                cudaStream_t stream) {
  // packed: [T, Hq, D] rows into [Hq, T], the fixed-length layout of one sequence of T rows
  const int batches = p.cu_seqlens ? 1 : p.batch;
  const int64_t rows = int64_t(batches) * p.rows * p.heads_q;
  dsum_sm90_kernel<Cfg::kHeadDim>
      <<<unsigned((rows * 32 + 255) / 256), 256, 0, stream>>>(o, dout, dsum, batches, p.rows, p.heads_q);
  const int smem = int(sizeof(typename Cfg::SharedStorage));
  const int tiles = cute::ceil_div(p.seqlen, int(Cfg::kBig));
  // tiles on z: blocks go out x fastest, so every head's longest tiles first
  dq_sm90_kernel<Cfg><<<dim3(p.heads_q, p.batch, tiles), Cfg::kThreads, smem, stream>>>(p);
  dkdv_sm90_kernel<Cfg><<<dim3(p.heads_kv, p.batch, tiles), Cfg::kThreads, smem, stream>>>(p);
}

}  // namespace l3k::sm90
