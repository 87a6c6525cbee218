// Flash attention backward (padded or varlen, GQA, bottom-right causal): dQ, dK, dV from dO, Q, K, V, O and
// the forward's log-sum-exp.
//
// Design (FlashAttention-2 math on mma.sync; runs on sm_90a), three kernels:
//   1. dot_do_o:  Dsum = rowsum(dO ∘ O) per (token, query head), fp32, shaped like lse.
//   2. dkdv:      a CTA owns 64 keys of one KV head (16 per warp; 128 and 32 with the fused dQ at D = 64,
//                 DkdvTile) and loops over every query head of the group and every query tile that can see
//                 its keys (causal tiles skipped), recomputing
//                 Pᵀ = exp2(K Qᵀ·scale·log2e - lse·log2e) and accumulating in fp32 registers
//                 dV += Pᵀ dO, dSᵀ = Pᵀ ∘ (V dOᵀ - Dsum), dK += dSᵀ Q. GQA sums stay in registers.
//   3. dq:        a CTA owns 64 query rows of one head and loops over the visible key tiles:
//                 dS = P ∘ (dO Vᵀ - Dsum), dQ += dS K.
// Splitting dQ into its own kernel costs two extra tile GEMMs (7 a tile pair instead of 5) and buys a deterministic
// result with no fp32 workspace: that is the path for `deterministic`. Otherwise (the default, as in FlashAttention-2)
// dkdv computes dQ too: each iteration stores dS to shared memory (stmatrix, transposing its dSᵀ fragments), the
// four warps then take a share of dQ_tile = dS K each and add it to an fp32 workspace with float2 atomics (the order
// of the adds, hence the last bits of dQ, varies from run to run), and a last kernel scales and rounds the workspace
// into dq. The Hopper wgmma/TMA version is the next step for speed.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "attention/attention.h"
#include "attention/flash_common.cuh"
#include "common.h"

namespace l3k::attn {

constexpr int kBwdWarps = 4;
constexpr int kBwdThreads = 32 * kBwdWarps;
constexpr int kBwdBlockM = 64;  // dq kernel: query rows per tile (16 a warp)
constexpr int kBwdBlockN = 64;  // dq kernel: keys per tile
static_assert(kBwdWarps * 16 == kBwdBlockM, "16 query rows a warp");

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;   // [B,Hq,S] or [Hq,T]
  float* dsum;        // same shape
  float* dq_accum;    // fused dQ: fp32 [tokens, Hq, D], zeroed, summed into by dkdv; null: the dq kernel
  void* dq;
  void* dk;
  void* dv;
  const int* cu_q;    // varlen offsets or null
  const int* cu_k;
  int64_t q_row_stride;  // Hq * D (q, out, dout, dq)
  int64_t k_row_stride;  // Hkv * D (k, v, dk, dv)
  int seqlen_q, seqlen_k;  // padded lengths (varlen: the longest)
  int total_q;             // varlen: tokens of q (lse row stride)
  int hq, group;
  bool causal;
  float scale, scale_log2;
};

struct SeqInfo {
  int q_tok0, seqlen_q, k_tok0, seqlen_k;
};

__device__ __forceinline__ SeqInfo seq_info(const BwdParams& p, int b) {
  SeqInfo s;
  s.q_tok0 = p.cu_q ? p.cu_q[b] : b * p.seqlen_q;
  s.seqlen_q = p.cu_q ? p.cu_q[b + 1] - s.q_tok0 : p.seqlen_q;
  s.k_tok0 = p.cu_k ? p.cu_k[b] : b * p.seqlen_k;
  s.seqlen_k = p.cu_k ? p.cu_k[b + 1] - s.k_tok0 : p.seqlen_k;
  return s;
}

// Index into lse / dsum of token `tok` (within sequence b) of query head h.
__device__ __forceinline__ int64_t stat_index(const BwdParams& p, const SeqInfo& s, int b, int h, int tok) {
  return p.cu_q ? int64_t(h) * p.total_q + s.q_tok0 + tok : (int64_t(b) * p.hq + h) * p.seqlen_q + tok;
}

// lse in log2 units, with rows that saw no key (lse = -inf) and padding rows mapped to +inf so that P = 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -kInf ? kInf : lse * kLog2e; }

// ---------------------------------------------------------------------------------- 1. Dsum = rowsum(dO ∘ O)
// One warp per (token, head) row; grid covers all tokens * Hq rows (padded: B * S tokens).
template <typename T, int D>
__global__ void __launch_bounds__(256) dot_do_o_kernel(const BwdParams p, int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* o = static_cast<const T*>(p.out) + row * D;  // rows are (token, head) in q layout
  const T* d_o = static_cast<const T*>(p.dout) + row * D;
  float acc = 0.f;
#pragma unroll
  for (int c = lane * 2; c < D; c += 64) {
    const float2 x = Half<T>::unpack(*reinterpret_cast<const uint32_t*>(o + c));
    const float2 y = Half<T>::unpack(*reinterpret_cast<const uint32_t*>(d_o + c));
    acc += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane != 0) return;
  const int64_t tok = row / p.hq;
  const int h = int(row % p.hq);
  const int64_t idx = p.cu_q ? int64_t(h) * p.total_q + tok
                             : ((tok / p.seqlen_q) * p.hq + h) * p.seqlen_q + tok % p.seqlen_q;
  p.dsum[idx] = acc;
}

// ---------------------------------------------------------------------------------- 2. dK, dV
// Tiles of the dK/dV kernel: KMT 16-key m-tiles a warp, a CTA of 64 keys (16 KMT a warp, WARPS warps) against
// BM-query tiles. KMT = 2 (the fused dQ at D = 64: the Llama 3.2 1B training step; L3K_BWD_TWO_MTILES=0 turns it
// off) lets each Q / dO fragment read from shared memory feed two tensor-core ops (0.45 ldmatrix a mma instead of
// 0.58); its dK, dV accumulators (2 x 64 floats a thread) leave room for BM = 32 only, and its CTAs have 2 warps, so
// that the grid, and the causal critical path (the first key tile sees every query tile), stay those of KMT = 1.
template <int D, int KMT_>
struct DkdvTile {
  static constexpr int KMT = KMT_;
  static constexpr int WARPS = KMT == 2 ? 2 : kBwdWarps;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int BN = 16 * KMT * WARPS;   // keys a CTA
  static constexpr int BM = KMT == 2 ? 32 : 64;  // queries a tile
  static constexpr int QT = BM / 8;              // 8-query column tiles of Sᵀ (even: two a stmatrix)
  static_assert(BN == 64 && WARPS * 16 == BM && QT % 2 == 0, "fused dQ: a 16-row dQ tile a warp");
};

template <typename T, int D, bool kFuseDq, int KMT>
constexpr int dkdv_smem() {
  using Tl = DkdvTile<D, KMT>;
  constexpr int fused = kFuseDq ? Tl::BM * Tl::BN * int(sizeof(T)) : 0;  // dS
  return (2 * Tl::BN + 4 * Tl::BM) * D * int(sizeof(T)) + 4 * Tl::BM * 4 + fused;
}

// A fragment (rows m0.., k columns k0..) of A = tileᵀ from a row-major [k][m] tile of row length M (dS from the
// stored dSᵀ): the transposing ldmatrix of the four 8x8 blocks (k0, m0) (k0, m0+8) (k0+8, m0) (k0+8, m0+8).
template <int M, typename T>
__device__ __forceinline__ void ldsm_a_kn(uint32_t (&a)[4], const T* tile, int m0, int k0, int lane) {
  const int mi = lane >> 3;
  ldsm_x4_trans(a, smem_u32(tile + swz<M>(k0 + (lane & 7) + ((mi >> 1) << 3), m0 + ((mi & 1) << 3))));
}

// Fused dQ, one iteration of dkdv: after every warp stored its share of dS (KMT = 1: sdS = dSᵀ [BN keys][BM queries],
// stored lane by lane; KMT = 2: dS [BM queries][BN keys], stored transposed by stmatrix), warp w adds dQ rows
// 16 w.. of the query tile, Σ over the tile's keys of dS K, into p.dq_accum (unscaled) with float2 atomics.
template <typename T, int D, int KMT>
__device__ __forceinline__ void accumulate_dq(const BwdParams& p, const SeqInfo& s, int head, int m0, const T* sdS,
                                              const T* sK, int warp, int lane) {
  using Tl = DkdvTile<D, KMT>;
  __syncthreads();  // every warp's dS is stored (the next iteration's barrier keeps it until all have read)
  float acc[D / 8][4] = {};
#pragma unroll
  for (int kk = 0; kk < Tl::BN / 16; ++kk) {
    uint32_t a[4];
    if constexpr (KMT == 1) ldsm_a_kn<Tl::BM>(a, sdS, warp * 16, kk * 16, lane);
    else ldsm_a<Tl::BN>(a, sdS, warp * 16, kk * 16, lane);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bf[4];
      ldsm_b_kn<D>(bf, sK, kk * 16, dp * 16, lane);
      Half<T>::mma(acc[2 * dp], a, bf[0], bf[1]);
      Half<T>::mma(acc[2 * dp + 1], a, bf[2], bf[3]);
    }
  }
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int tok = m0 + warp * 16 + g + 8 * h;
    if (tok >= s.seqlen_q) continue;
    float* dst = p.dq_accum + (s.q_tok0 + int64_t(tok)) * p.q_row_stride + int64_t(head) * D + 2 * t;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      atomicAdd(reinterpret_cast<float2*>(dst + j * 8), make_float2(acc[j][2 * h], acc[j][2 * h + 1]));
  }
}

template <typename T, int D, bool kFuseDq, int KMT>
__global__ void __launch_bounds__(DkdvTile<D, KMT>::THREADS) dkdv_kernel(const BwdParams p) {
  using Tl = DkdvTile<D, KMT>;
  constexpr int BM = Tl::BM, BN = Tl::BN, QT = Tl::QT, DT = D / 8, kThreads = Tl::THREADS;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);  // [BN][D]
  T* sV = sK + BN * D;                 // [BN][D]
  T* sQ = sV + BN * D;                 // [2][BM][D]
  T* sdO = sQ + 2 * BM * D;            // [2][BM][D]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * D);  // [2][BM], log2 units
  float* sDsum = sLse + 2 * BM;                               // [2][BM]
  T* sdS = reinterpret_cast<T*>(sDsum + 2 * BM);              // fused dQ: dSᵀ [BN][BM] (KMT 1), dS [BM][BN] (2)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_block = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;  // low key tiles have the most work
  const SeqInfo s = seq_info(p, b);
  const int n0 = n_block * BN;
  if (n0 >= s.seqlen_k) return;
  const int diag = s.seqlen_k - s.seqlen_q;  // causal: token i sees keys j <= i + diag
  const int m_begin = p.causal ? max(0, n0 - diag) / BM : 0;
  const int num_m = max(0, cdiv(s.seqlen_q, BM) - m_begin);
  const int iters = p.group * num_m;  // (query head of the group, query tile) pairs

  const T* q = static_cast<const T*>(p.q) + s.q_tok0 * p.q_row_stride;
  const T* d_o = static_cast<const T*>(p.dout) + s.q_tok0 * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + (s.k_tok0 + int64_t(n0)) * p.k_row_stride + int64_t(kv_head) * D;
  const T* v = static_cast<const T*>(p.v) + (s.k_tok0 + int64_t(n0)) * p.k_row_stride + int64_t(kv_head) * D;
  const int keys = min(BN, s.seqlen_k - n0);

  auto load_q_tile = [&](int it, int stage) {
    const int head = kv_head * p.group + it / num_m;
    const int m0 = (m_begin + it % num_m) * BM;
    auto rows = [&](const T* base) {
      return [=](int r) -> const T* {
        return m0 + r < s.seqlen_q ? base + (m0 + r) * p.q_row_stride + int64_t(head) * D : nullptr;
      };
    };
    load_tile<D, BM, kThreads>(sQ + stage * BM * D, rows(q), static_cast<const T*>(p.q), tid);
    load_tile<D, BM, kThreads>(sdO + stage * BM * D, rows(d_o), static_cast<const T*>(p.dout), tid);
    if (tid < BM) {  // plain loads: visible to all after the next barrier
      const bool ok = m0 + tid < s.seqlen_q;
      const int64_t si = stat_index(p, s, b, head, m0 + tid);
      sLse[stage * BM + tid] = ok ? lse_log2(p.lse[si]) : kInf;
      sDsum[stage * BM + tid] = ok ? p.dsum[si] : 0.f;
    }
  };

  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = warp * 16 * KMT;  // this warp's keys within the tile
  const bool warp_active = warp_row0 < keys;
  float dk[KMT][DT][4] = {};
  float dv[KMT][DT][4] = {};
  if constexpr (kFuseDq) {
    if (!warp_active) {  // keys past the end: their dS stays zero (the K rows they meet are zero-filled)
      if constexpr (KMT == 1) {  // 16 rows of dSᵀ
        for (int i = lane; i < 16 * BM / 2; i += 32) reinterpret_cast<uint32_t*>(sdS + warp_row0 * BM)[i] = 0u;
      } else {  // 16 KMT columns of dS, 8 at a time
        for (int i = lane; i < BM * 2 * KMT; i += 32)
          *reinterpret_cast<uint4*>(sdS + swz<BN>(i / (2 * KMT), warp_row0 + 8 * (i % (2 * KMT)))) = uint4{};
      }
    }
  }

  if (iters > 0) {
    auto key_rows = [&](const T* base) {
      return [=](int r) -> const T* { return r < keys ? base + r * p.k_row_stride : nullptr; };
    };
    load_tile<D, BN, kThreads>(sK, key_rows(k), static_cast<const T*>(p.k), tid);
    load_tile<D, BN, kThreads>(sV, key_rows(v), static_cast<const T*>(p.v), tid);
    load_q_tile(0, 0);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    const int stage = it & 1;
    cp_async_wait_all();
    __syncthreads();  // tile `it` landed; everyone finished reading the other stage
    if (it + 1 < iters) {
      load_q_tile(it + 1, stage ^ 1);
      cp_async_commit();
    }
    const T* sQs = sQ + stage * BM * D;
    const T* sdOs = sdO + stage * BM * D;
    const float* lse_s = sLse + stage * BM;
    const float* dsum_s = sDsum + stage * BM;
    const int m0 = (m_begin + it % num_m) * BM;
    if (warp_active) {
      float pt[KMT][QT][4] = {};  // Sᵀ then Pᵀ: [16 KMT keys x BM queries]
      gemm_abt_rows<T, D, QT, KMT>(pt, sK, warp_row0, sQs, lane);
#pragma unroll
      for (int kt = 0; kt < KMT; ++kt) {
        const int key0 = warp_row0 + 16 * kt;  // within the tile
        const bool need_mask = p.causal && n0 + key0 + 15 > m0 + diag;
#pragma unroll
        for (int j = 0; j < QT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qi = j * 8 + 2 * t + (e & 1);  // query within the tile
            const float y = fmaf(pt[kt][j][e], p.scale_log2, -lse_s[qi]);
            float x = kFuseDq ? exp2_approx(y) : exp2f(y);  // (the dq-kernel path as the H200 ran it)
            if (need_mask && n0 + key0 + g + 8 * (e >> 1) > m0 + qi + diag) x = 0.f;
            pt[kt][j][e] = x;
          }
      }
      float dpt[KMT][QT][4] = {};  // dPᵀ = V dOᵀ
      gemm_abt_rows<T, D, QT, KMT>(dpt, sV, warp_row0, sdOs, lane);
      gemm_pb_rows<T, D, QT, KMT>(dv, pt, sdOs, lane);  // dV += Pᵀ dO
#pragma unroll
      for (int kt = 0; kt < KMT; ++kt)
#pragma unroll
        for (int j = 0; j < QT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            dpt[kt][j][e] = pt[kt][j][e] * (dpt[kt][j][e] - dsum_s[j * 8 + 2 * t + (e & 1)]);
      gemm_pb_rows<T, D, QT, KMT>(dk, dpt, sQs, lane);  // dK += dSᵀ Q (scaled at the end)
      if constexpr (kFuseDq) {
        // dS rounded to T as the dK GEMM took it. Keys past the last are stored as 0: there P = exp2(-lse) from
        // zero-filled K rows is unmasked (their dK/dV rows are never stored) and can overflow fp16, and inf times
        // those rows' zero K would put NaN into dQ.
#pragma unroll
        for (int kt = 0; kt < KMT; ++kt) {
          const int key0 = warp_row0 + 16 * kt;
          const bool live_lo = key0 + g < keys, live_hi = key0 + g + 8 < keys;
          if constexpr (KMT == 1) {  // dSᵀ rows = this warp's keys, lane by lane
#pragma unroll
            for (int j = 0; j < QT; ++j) {
              store2(sdS + swz<BM>(key0 + g, j * 8) + 2 * t, live_lo ? dpt[kt][j][0] : 0.f,
                     live_lo ? dpt[kt][j][1] : 0.f);
              store2(sdS + swz<BM>(key0 + g + 8, j * 8) + 2 * t, live_hi ? dpt[kt][j][2] : 0.f,
                     live_hi ? dpt[kt][j][3] : 0.f);
            }
          } else {  // dS [query][key]: an x4 stmatrix transposes keys key0 / key0 + 8 x the queries of tiles j, j + 1
#pragma unroll
            for (int j = 0; j < QT; j += 2) {
              const uint32_t r[4] = {
                  Half<T>::pack(live_lo ? dpt[kt][j][0] : 0.f, live_lo ? dpt[kt][j][1] : 0.f),
                  Half<T>::pack(live_hi ? dpt[kt][j][2] : 0.f, live_hi ? dpt[kt][j][3] : 0.f),
                  Half<T>::pack(live_lo ? dpt[kt][j + 1][0] : 0.f, live_lo ? dpt[kt][j + 1][1] : 0.f),
                  Half<T>::pack(live_hi ? dpt[kt][j + 1][2] : 0.f, live_hi ? dpt[kt][j + 1][3] : 0.f)};
              const int mi = lane >> 3;  // matrix mi: query rows (j + mi / 2) 8 + (lane & 7), keys key0 + 8 (mi & 1)
              stsm_x4_trans(smem_u32(sdS + swz<BN>((j + (mi >> 1)) * 8 + (lane & 7), key0 + ((mi & 1) << 3))), r);
            }
          }
        }
      }
    }  // warp_active
    // every warp (its dQ rows are live even where its keys are not)
    if constexpr (kFuseDq) accumulate_dq<T, D, KMT>(p, s, kv_head * p.group + it / num_m, m0, sdS, sK, warp, lane);
  }

  if (!warp_active) return;
  T* dk_out = static_cast<T*>(p.dk) + (s.k_tok0 + int64_t(n0)) * p.k_row_stride + int64_t(kv_head) * D;
  T* dv_out = static_cast<T*>(p.dv) + (s.k_tok0 + int64_t(n0)) * p.k_row_stride + int64_t(kv_head) * D;
#pragma unroll
  for (int kt = 0; kt < KMT; ++kt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row0 + 16 * kt + g + 8 * h;
      if (r >= keys) continue;
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        store2(dk_out + r * p.k_row_stride + j * 8 + 2 * t, dk[kt][j][2 * h] * p.scale,
               dk[kt][j][2 * h + 1] * p.scale);
        store2(dv_out + r * p.k_row_stride + j * 8 + 2 * t, dv[kt][j][2 * h], dv[kt][j][2 * h + 1]);
      }
    }
}

// ---------------------------------------------------------------------------------- 3. dQ
template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) dq_kernel(const BwdParams p) {
  constexpr int BM = kBwdBlockM, BN = kBwdBlockN, NT = BN / 8, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][D]
  T* sdO = sQ + BM * D;                // [BM][D]
  T* sK = sdO + BM * D;                // [2][BN][D]
  T* sV = sK + 2 * BN * D;             // [2][BN][D]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m_block = gridDim.x - 1 - blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const SeqInfo s = seq_info(p, b);
  const int m0 = m_block * BM;
  if (m0 >= s.seqlen_q) return;
  const int kv_head = head / p.group;
  const int diag = s.seqlen_k - s.seqlen_q;
  int n_end = cdiv(s.seqlen_k, BN);
  if (p.causal) n_end = min(n_end, cdiv(max(0, min(s.seqlen_q - 1, m0 + BM - 1) + diag + 1), BN));

  const T* q = static_cast<const T*>(p.q) + (s.q_tok0 + int64_t(m0)) * p.q_row_stride + int64_t(head) * D;
  const T* d_o = static_cast<const T*>(p.dout) + (s.q_tok0 + int64_t(m0)) * p.q_row_stride + int64_t(head) * D;
  const T* k = static_cast<const T*>(p.k) + s.k_tok0 * p.k_row_stride + int64_t(kv_head) * D;
  const T* v = static_cast<const T*>(p.v) + s.k_tok0 * p.k_row_stride + int64_t(kv_head) * D;
  const int queries = min(BM, s.seqlen_q - m0);
  auto load_kv = [&](int nb, int stage) {
    const int n0 = nb * BN;
    auto rows = [&](const T* base) {
      return [=](int r) -> const T* { return n0 + r < s.seqlen_k ? base + (n0 + r) * p.k_row_stride : nullptr; };
    };
    load_tile<D, BN, kBwdThreads>(sK + stage * BN * D, rows(k), static_cast<const T*>(p.k), tid);
    load_tile<D, BN, kBwdThreads>(sV + stage * BN * D, rows(v), static_cast<const T*>(p.v), tid);
  };

  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = warp * 16;
  const bool warp_active = warp_row0 < queries;
  float row_lse[2], row_dsum[2];  // rows g and g + 8 of this warp
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp_row0 + g + 8 * h;
    const bool ok = r < queries;
    const int64_t si = stat_index(p, s, b, head, m0 + r);
    row_lse[h] = ok ? lse_log2(p.lse[si]) : kInf;
    row_dsum[h] = ok ? p.dsum[si] : 0.f;
  }
  float dq[DT][4] = {};

  if (n_end > 0) {
    auto q_rows = [&](const T* base) {
      return [=](int r) -> const T* { return r < queries ? base + r * p.q_row_stride : nullptr; };
    };
    load_tile<D, BM, kBwdThreads>(sQ, q_rows(q), static_cast<const T*>(p.q), tid);
    load_tile<D, BM, kBwdThreads>(sdO, q_rows(d_o), static_cast<const T*>(p.dout), tid);
    load_kv(0, 0);
    cp_async_commit();
  }
  for (int nb = 0; nb < n_end; ++nb) {
    const int stage = nb & 1;
    cp_async_wait_all();
    __syncthreads();
    if (nb + 1 < n_end) {
      load_kv(nb + 1, stage ^ 1);
      cp_async_commit();
    }
    if (!warp_active) continue;
    const T* sKs = sK + stage * BN * D;
    const T* sVs = sV + stage * BN * D;
    const int n0 = nb * BN;

    float ps[NT][4] = {};  // S then P: [16 queries x BN keys]
    gemm_abt<T, D, NT>(ps, sQ, warp_row0, sKs, lane);
    const bool need_mask = n0 + BN > s.seqlen_k || (p.causal && n0 + BN - 1 > m0 + warp_row0 + diag);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = exp2f(fmaf(ps[j][e], p.scale_log2, -row_lse[e >> 1]));
        const int key = n0 + j * 8 + 2 * t + (e & 1);
        const int tok = m0 + warp_row0 + g + 8 * (e >> 1);
        if (need_mask && (key >= s.seqlen_k || (p.causal && key > tok + diag))) x = 0.f;
        ps[j][e] = x;
      }
    float ds[NT][4] = {};  // dP = dO Vᵀ, then dS = P ∘ (dP - Dsum)
    gemm_abt<T, D, NT>(ds, sdO, warp_row0, sVs, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[j][e] = ps[j][e] * (ds[j][e] - row_dsum[e >> 1]);
    gemm_pb<T, D, NT>(dq, ds, sKs, lane);  // dQ += dS K
  }

  if (!warp_active) return;
  T* dq_out = static_cast<T*>(p.dq) + (s.q_tok0 + int64_t(m0)) * p.q_row_stride + int64_t(head) * D;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp_row0 + g + 8 * h;
    if (r >= queries) continue;
#pragma unroll
    for (int j = 0; j < DT; ++j)
      store2(dq_out + r * p.q_row_stride + j * 8 + 2 * t, dq[j][2 * h] * p.scale, dq[j][2 * h + 1] * p.scale);
  }
}

// Fused dQ's last step: dq = scale · dq_accum, rounded to T (4 elements a thread).
template <typename T>
__global__ void __launch_bounds__(256) dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq,
                                                         int64_t n4, float scale) {
  for (int64_t i = blockIdx.x * int64_t(256) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * 256) {
    const float4 x = reinterpret_cast<const float4*>(acc)[i];
    store2(dq + 4 * i, x.x * scale, x.y * scale);
    store2(dq + 4 * i + 2, x.z * scale, x.w * scale);
  }
}

template <typename T, int D, bool kFuseDq, int KMT>
void launch_dkdv(const BwdParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int smem = dkdv_smem<T, D, kFuseDq, KMT>();
  check_cuda(cudaFuncSetAttribute(dkdv_kernel<T, D, kFuseDq, KMT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "flash_bwd: cudaFuncSetAttribute");
  dkdv_kernel<T, D, kFuseDq, KMT><<<grid, DkdvTile<D, KMT>::THREADS, smem, stream>>>(p);
  L3K_CHECK_LAUNCH("dkdv_kernel");
}

template <typename T, int D>
struct RunBwd {
  static void run(const BwdParams& p, int batch, int max_seqlen, int max_seqlen_k, int64_t q_rows,
                  cudaStream_t stream) {
    dot_do_o_kernel<T, D><<<dim3(unsigned((q_rows + 7) / 8)), 256, 0, stream>>>(p, q_rows);
    L3K_CHECK_LAUNCH("dot_do_o_kernel");

    const dim3 grid_dkdv(cdiv(max_seqlen_k, DkdvTile<D, 1>::BN), p.hq / p.group, batch);  // (BN = 64 either tiling)
    if (p.dq_accum != nullptr) {  // fused dQ: dkdv sums dQ into the zeroed workspace, then scale and round
      const int64_t n = q_rows * D;
      check_cuda(cudaMemsetAsync(p.dq_accum, 0, n * sizeof(float), stream), "flash_bwd: memset dq_accum");
      // two m-tiles a warp at D = 64 only, where the dK, dV accumulators leave room (the `D == 64 ? 2 : 1` keeps
      // D = 128 from instantiating a two-m-tile kernel it never launches)
      constexpr int kTwo = D == 64 ? 2 : 1;
      if (D == 64 && !env_switch_off("L3K_BWD_TWO_MTILES")) launch_dkdv<T, D, true, kTwo>(p, grid_dkdv, stream);
      else launch_dkdv<T, D, true, 1>(p, grid_dkdv, stream);
      const int64_t n4 = n / 4, blocks = std::min<int64_t>((n4 + 255) / 256, 8192);
      dq_convert_kernel<T><<<dim3(unsigned(blocks)), 256, 0, stream>>>(p.dq_accum, static_cast<T*>(p.dq), n4,
                                                                      p.scale);
      L3K_CHECK_LAUNCH("dq_convert_kernel");
      return;
    }
    launch_dkdv<T, D, false, 1>(p, grid_dkdv, stream);

    constexpr int smem_dq = (2 * kBwdBlockM + 4 * kBwdBlockN) * D * int(sizeof(T));
    check_cuda(cudaFuncSetAttribute(dq_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dq),
               "flash_bwd: cudaFuncSetAttribute");
    dq_kernel<T, D><<<dim3(cdiv(max_seqlen, kBwdBlockM), p.hq, batch), kBwdThreads, smem_dq, stream>>>(p);
    L3K_CHECK_LAUNCH("dq_kernel");
  }
};

}  // namespace l3k::attn

namespace l3k {

void flash_attn_bwd(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                    std::uintptr_t lse, std::uintptr_t dsum, std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
                    std::uintptr_t cu_seqlens, std::uintptr_t cu_seqlens_k, int batch, int max_seqlen,
                    int max_seqlen_k, int total_q_or_S, int total_k_or_Sk, int hq, int hkv, int d, bool causal,
                    float softmax_scale, bool deterministic, int dtype, int num_sms, std::uintptr_t stream,
                    std::uintptr_t dq_accum) {
  using namespace attn;
  require(dq_accum == 0 || !deterministic, "dq_accum", "the fused dQ sums with atomics: not deterministic");
  require(dq_accum % 16 == 0, "dq_accum", "expected a 16-byte aligned fp32 workspace");
  (void)num_sms;
  const DType dt = to_dtype(dtype, "dtype");
  require(dt == DType::BF16 || dt == DType::F16, "dtype", "expected bf16 or fp16, got code " + std::to_string(dtype));
  require(d == 64 || d == 128, "d", "expected head dim 64 or 128, got " + std::to_string(d));
  require(hkv > 0 && hq > 0 && hq % hkv == 0, "hkv", "query heads must be a positive multiple of KV heads");
  require(batch >= 0 && batch <= 65535, "batch", "expected 0..65535 sequences, got " + std::to_string(batch));
  require((cu_seqlens == 0) == (cu_seqlens_k == 0), "cu_seqlens_k", "pass both offset arrays or neither");
  const bool varlen = cu_seqlens != 0;
  const int64_t q_tokens = varlen ? int64_t(total_q_or_S) : int64_t(batch) * total_q_or_S;
  const int64_t k_tokens = varlen ? int64_t(total_k_or_Sk) : int64_t(batch) * total_k_or_Sk;
  if (batch == 0 || q_tokens == 0) {  // no queries: dk/dv are zero (no kernel below would write them)
    if (k_tokens > 0) {
      check_cuda(cudaMemsetAsync(as_ptr<void>(dk), 0, k_tokens * hkv * d * 2, as_stream(stream)), "flash_bwd: memset");
      check_cuda(cudaMemsetAsync(as_ptr<void>(dv), 0, k_tokens * hkv * d * 2, as_stream(stream)), "flash_bwd: memset");
    }
    return;
  }
  require(dsum != 0, "dsum", "the fp32 workspace is required");  // empty (null) only when there are no queries
  if (k_tokens == 0) {  // no keys anywhere: every gradient is zero (dk/dv are empty)
    check_cuda(cudaMemsetAsync(as_ptr<void>(dq), 0, q_tokens * hq * d * 2, as_stream(stream)), "flash_bwd: memset");
    return;
  }
  if (flash_bwd_sm90_enabled() &&
      flash_bwd_sm90_covers(q, k, v, dout, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                            varlen ? q_tokens : total_q_or_S, varlen ? k_tokens : total_k_or_Sk, batch, hq, d, causal,
                            dtype)) {
    return flash_attn_bwd_sm90(dout, q, k, v, out, lse, dsum, dq, dk, dv, cu_seqlens, batch, max_seqlen,
                               varlen ? total_q_or_S : 0, hq, hkv, d, softmax_scale, stream);
  }
  BwdParams p{};
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.out = as_ptr<const void>(out);
  p.dout = as_ptr<const void>(dout);
  p.lse = as_ptr<const float>(lse);
  p.dsum = as_ptr<float>(dsum);
  p.dq = as_ptr<void>(dq);
  p.dq_accum = as_ptr<float>(dq_accum);
  p.dk = as_ptr<void>(dk);
  p.dv = as_ptr<void>(dv);
  p.cu_q = as_ptr<const int>(cu_seqlens);
  p.cu_k = as_ptr<const int>(cu_seqlens_k);
  p.q_row_stride = int64_t(hq) * d;
  p.k_row_stride = int64_t(hkv) * d;
  p.seqlen_q = varlen ? max_seqlen : total_q_or_S;
  p.seqlen_k = varlen ? max_seqlen_k : total_k_or_Sk;
  p.total_q = varlen ? total_q_or_S : 0;
  p.hq = hq;
  p.group = hq / hkv;
  p.causal = causal;
  p.scale = softmax_scale;
  p.scale_log2 = softmax_scale * kLog2e;
  const int mq = varlen ? max_seqlen : total_q_or_S, mk = varlen ? max_seqlen_k : total_k_or_Sk;
  const cudaStream_t s = as_stream(stream);
  const int64_t rows = q_tokens * hq;
  if (dt == DType::BF16) {
    if (d == 128) return RunBwd<__nv_bfloat16, 128>::run(p, batch, mq, mk, rows, s);
    return RunBwd<__nv_bfloat16, 64>::run(p, batch, mq, mk, rows, s);
  }
  if (d == 128) return RunBwd<__half, 128>::run(p, batch, mq, mk, rows, s);
  return RunBwd<__half, 64>::run(p, batch, mq, mk, rows, s);
}

}  // namespace l3k
