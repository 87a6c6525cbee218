// Flash attention forward (padded or varlen, GQA, bottom-right causal, log-sum-exp out) and split-KV decode
// (flash-decoding) over a KV cache; both run the same tile kernel.
//
// Design (FlashAttention-2 on mma.sync; runs on sm_90a): a CTA of 4 warps owns 128 query rows of one head
// (32 rows, two 16-row m-tiles, per warp: each K/V fragment loaded from shared memory feeds two tensor-core ops;
// with 16 rows a warp the H200 ran 135-180 TFLOP/s, ldmatrix-bound) and streams 64-key K/V tiles through a
// cp.async ring (double-buffered; three stages for the few-row decode tile). Per tile each
// warp computes S = Q Kᵀ (fp32), applies the causal / tail mask, updates the online softmax in fp32 with
// exp2, and accumulates O += P V with P taken straight from the S registers. Causal tiles past the
// diagonal are never loaded. GQA maps query head h to KV head h / (Hq / Hkv); K/V are never repeated.
// Decode folds the query heads of one KV group (and the Sq new tokens) into the rows of one CTA and splits
// the cache over CTAs. The partial results merge by their log-sum-exp: inside the kernel when the splits of a
// (sequence, KV head, row block) run as one thread-block cluster (sm_90, up to 16 CTAs): each CTA leaves its
// partials in its own shared memory, and after a cluster barrier each combines a share of the rows by reading
// its peers' shared memory (no fp32 workspace round trip, no second kernel in the decode step); otherwise
// through fp32 workspaces and a combine kernel. Both merge in the same order: the same bits.
// Next step for speed: the Hopper version (TMA loads, wgmma, warp-specialized producer/consumer
// warpgroups, persistent longest-first scheduling) behind the same launcher.
//
// Sample: python -c "import torch, llama3_kernels as l; q=torch.randn(2,1000,32,128,device='cuda',
//         dtype=torch.bfloat16); k=torch.randn(2,1000,8,128,device='cuda',dtype=torch.bfloat16);
//         print(l.ops.attention.flash_attention(q,k,k).shape)"
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <string>

#include "attention/attention.h"
#include "attention/flash_common.cuh"
#include "common.h"

namespace l3k::attn {

constexpr int kFwdWarps = 4;
constexpr int kFwdThreads = 32 * kFwdWarps;
// Tile shapes. Prefill: two 16-row m-tiles a warp (128-row CTAs), so each K/V fragment read from shared memory
// feeds two mma (16 rows a warp ran 135-180 TFLOP/s on an H200, ldmatrix-bound; two: +15-19%); D = 128 then
// takes 32-key tiles: with 64 ptxas reports 244 B of spill loads at the 255-register cap, with 32 still 76 B. Decode (a few
// rows, memory-bound) keeps one m-tile and 64-key tiles: twice the bytes in flight a CTA (the 128 x 32 tiles
// ran B=16 L=8192 in 0.32 ms against 0.22).
// WarpKeys (decode with at most 16 rows, e.g. one token of a 4- or 8-head KV group): the four warps share the
// same 16 rows and each takes its own quarter of every key tile, keeping its own online-softmax state; the
// states merge once at the end. With rows split across warps instead, one warp did all the math of a 64-key
// tile (128 mma for 4 live rows) while three idled: B=16 L=8192 reached 2.4 TB/s against SDPA's 3.9.
// Stages: the K/V ring's depth. With 2, one tile is in flight while a CTA computes the previous one; the WarpKeys
// decode tile (a few rows, nothing to compute) takes 3, two tiles in flight, since a batch-1 step whose splits merge
// in a 16-CTA cluster runs about one CTA an SM (34.8 -> 51 KB at D = 64, 70 -> 100 KB at D = 128).
template <int MT_, int BN_, bool WarpKeys_ = false, bool Decode_ = false, int Stages_ = 2>
struct FwdTile {
  static constexpr int MT = MT_, BN = BN_, kStages = Stages_;
  static constexpr bool kWarpKeys = WarpKeys_, kDecode = Decode_;
  static constexpr int BM = 16 * MT_ * (WarpKeys_ ? 1 : kFwdWarps);  // query rows per CTA
  static constexpr int KW = WarpKeys_ ? BN_ / kFwdWarps : BN_;       // keys of a tile each warp handles
};
template <int D>
using PrefillTile = FwdTile<2, D == 128 ? 32 : 64>;
using DecodeTile = FwdTile<1, 64, false, true>;
using DecodeWarpKeysTile = FwdTile<1, 64, true, true, 3>;
static_assert(DecodeWarpKeysTile::KW == 16, "each warp's key slice is one 16-key mma step");

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;               // [B,Hq,S] or [Hq,T]; null in decode
  const int* cu_q;          // varlen offsets [batch+1] or null
  const int* cu_k;          // varlen key offsets or null
  const int* seqused_k;     // decode: cache_seqlens [batch] or null
  float* o_accum;           // split-KV partials [splits][rows_total][D], or null: write `out`
  float* lse_accum;         // [splits][rows_total]
  int64_t q_row_stride;     // elements between consecutive tokens of q / out (Hq * D)
  int64_t k_row_stride, v_row_stride;
  int64_t k_batch_stride, v_batch_stride;  // padded / cache layouts
  int64_t rows_total;       // tokens * Hq: split stride of the partials
  int seqlen_q, seqlen_k;   // padded lengths (varlen: the longest)
  int total_q;              // varlen lse row stride
  int hq, group;            // group = Hq / Hkv
  int pack;                 // query heads folded into CTA rows: 1, or the group (decode)
  int num_m_blocks;         // decode: row blocks per KV head (grid.y = Hkv * num_m_blocks)
  int blocks_per_split;     // decode: key tiles per split (grid.x = splits)
  bool decode;
  bool warp_keys;           // decode with <= 16 rows a KV head: DecodeWarpKeysTile
  bool cluster_combine;     // decode: the splits (grid.x) are one cluster and merge in shared memory
  bool causal;
  float scale, scale_log2;
};

// The cluster merge of a decode CTA's rows [0, live_rows): called by every thread of every CTA of the cluster (the
// splits of one sequence, KV head and row block), after each wrote its partials to part_o / part_lse. Rank c
// merges rows c, c + splits, ..., a warp a row, in combine_splits_kernel's order, reading its peers' partials
// through distributed shared memory; q_index(r) is row r's (token, head) row of out.
template <typename T, int D, class RowIndex>
__device__ __forceinline__ void merge_in_cluster(const FwdParams& p, const float* part_o, const float* part_lse,
                                                 int live_rows, RowIndex q_index) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = int(cluster.num_blocks()), rank = int(cluster.block_rank());
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  cluster.sync();  // the partials are written (release / acquire across the cluster)
  constexpr int kPerLane = D / 32;
  for (int r = rank + splits * warp; r < live_rows; r += splits * kFwdWarps) {
    float mx = -kInf;
    for (int sp = 0; sp < splits; ++sp) mx = fmaxf(mx, *cluster.map_shared_rank(part_lse + r, sp));
    float acc[kPerLane] = {};
    float wsum = 0.f;
    if (mx != -kInf) {
      for (int sp = 0; sp < splits; ++sp) {
        const float w = expf(*cluster.map_shared_rank(part_lse + r, sp) - mx);  // exp(-inf) = 0: an empty split
        wsum += w;
        const float* src = cluster.map_shared_rank(part_o + r * D, sp) + lane * kPerLane;  // 8- or 16-byte aligned
        float v[kPerLane];
        if constexpr (kPerLane == 4) *reinterpret_cast<float4*>(v) = *reinterpret_cast<const float4*>(src);
        else *reinterpret_cast<float2*>(v) = *reinterpret_cast<const float2*>(src);
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[e] += w * v[e];
      }
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    T* dst = static_cast<T*>(p.out) + q_index(r) * D + lane * kPerLane;
#pragma unroll
    for (int e = 0; e < kPerLane; e += 2) store2(dst + e, acc[e] * inv, acc[e + 1] * inv);
  }
  cluster.sync();  // no CTA leaves (and frees its shared memory) while a peer may still read it
}

template <typename T, int D, class Tile>
__global__ void __launch_bounds__(kFwdThreads) flash_fwd_kernel(const FwdParams p) {
  pdl_wait();  // decode launches may be PDL launches (common.h); a no-op otherwise
  pdl_launch_dependents();
  constexpr int BM = Tile::BM, BN = Tile::BN, MT = Tile::MT, DT = D / 8;
  constexpr bool WK = Tile::kWarpKeys;
  constexpr int NT = Tile::KW / 8;  // 8-key column tiles of S this warp computes
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][D]
  constexpr int S = Tile::kStages;
  T* sK = sQ + BM * D;                 // [S][BN][D]
  T* sV = sK + S * BN * D;             // [S][BN][D]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z;
  int m_block, head_block, split;
  if (p.decode) {
    split = blockIdx.x;
    head_block = blockIdx.y / p.num_m_blocks;  // the KV head
    m_block = blockIdx.y % p.num_m_blocks;
  } else {
    split = 0;
    head_block = blockIdx.y;                    // the query head
    m_block = gridDim.x - 1 - blockIdx.x;       // longest causal rows first
  }

  const int q_tok0 = p.cu_q ? p.cu_q[b] : b * p.seqlen_q;
  const int seqlen_q = p.cu_q ? p.cu_q[b + 1] - q_tok0 : p.seqlen_q;
  int seqlen_k;
  int64_t k_off, v_off;
  if (p.cu_k) {
    const int k_tok0 = p.cu_k[b];
    seqlen_k = p.cu_k[b + 1] - k_tok0;
    k_off = k_tok0 * p.k_row_stride;
    v_off = k_tok0 * p.v_row_stride;
  } else {
    seqlen_k = p.seqused_k ? p.seqused_k[b] : p.seqlen_k;
    k_off = b * p.k_batch_stride;
    v_off = b * p.v_batch_stride;
  }
  const int rows = seqlen_q * p.pack;  // CTA rows of this (sequence, head block): row r = token r / pack
  const int m0 = m_block * BM;
  if (m0 >= rows) return;
  const int kv_head = head_block * p.pack / p.group;
  const int diag = seqlen_k - seqlen_q;  // causal: token i sees keys j <= i + diag

  int n_end = cdiv(seqlen_k, BN);
  if (p.causal) {
    const int last_tok = min(seqlen_q - 1, (m0 + BM - 1) / p.pack);
    n_end = min(n_end, cdiv(max(0, last_tok + diag + 1), BN));
  }
  int n_begin = 0;
  if (p.decode) {
    n_begin = split * p.blocks_per_split;
    n_end = min(n_end, n_begin + p.blocks_per_split);
  }

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k) + k_off + int64_t(kv_head) * D;
  const T* v = static_cast<const T*>(p.v) + v_off + int64_t(kv_head) * D;
  auto row_token = [&](int r) { return (m0 + r) / p.pack; };
  auto row_head = [&](int r) { return head_block * p.pack + (m0 + r) % p.pack; };
  auto q_row = [&](int r) -> const T* {
    if (m0 + r >= rows) return nullptr;
    return q + (q_tok0 + row_token(r)) * p.q_row_stride + int64_t(row_head(r)) * D;
  };
  auto load_kv = [&](int nb, int stage) {
    const int n0 = nb * BN;
    load_tile<D, BN, kFwdThreads>(
        sK + stage * BN * D, [&](int r) { return n0 + r < seqlen_k ? k + (n0 + r) * p.k_row_stride : nullptr; },
        static_cast<const T*>(p.k), tid);
    load_tile<D, BN, kFwdThreads>(
        sV + stage * BN * D, [&](int r) { return n0 + r < seqlen_k ? v + (n0 + r) * p.v_row_stride : nullptr; },
        static_cast<const T*>(p.v), tid);
  };

  // Per warp: MT m-tiles of 16 rows; in m-tile mt this lane holds rows g and g + 8 (h = 0, 1). WarpKeys: every
  // warp has the CTA's 16 rows and keys [kw, kw + 16) of each tile.
  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = WK ? 0 : warp * 16 * MT;
  const int kw = WK ? warp * Tile::KW : 0;
  bool warp_active = m0 + warp_row0 < rows;
  float o[MT][DT][4] = {};
  float row_max[MT][2], row_sum[MT][2];  // running max; this lane's partial sums (reduced over the quad at the end)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) row_max[mt][0] = row_max[mt][1] = -kInf, row_sum[mt][0] = row_sum[mt][1] = 0.f;

  // One cp.async group per tile (empty past the last), so that "all but the newest S - 2 groups" is tile nb.
  if (n_begin < n_end) {
    load_tile<D, BM, kFwdThreads>(sQ, q_row, q, tid);
    load_kv(n_begin, 0);
    cp_async_commit();
#pragma unroll
    for (int i = 1; i < S - 1; ++i) {
      if (n_begin + i < n_end) load_kv(n_begin + i, i);
      cp_async_commit();
    }
  }
  for (int nb = n_begin; nb < n_end; ++nb) {
    const int stage = S == 2 ? (nb - n_begin) & 1 : (nb - n_begin) % S;
    if constexpr (S == 2) {  // (the prefill tiles' code as it was measured: the generic form spills more at D = 128)
      cp_async_wait_all();
      __syncthreads();  // tile nb landed for all threads, and everyone is done reading the other stage
      if (nb + 1 < n_end) {
        load_kv(nb + 1, stage ^ 1);
        cp_async_commit();
      }
    } else {
      cp_async_wait<S - 2>();
      __syncthreads();  // tile nb landed for all threads, and everyone is done reading the stage refilled next
      if (nb + S - 1 < n_end) load_kv(nb + S - 1, (nb + S - 1 - n_begin) % S);
      cp_async_commit();
    }
    if (!warp_active) continue;
    const T* sKs = sK + stage * BN * D;
    const T* sVs = sV + stage * BN * D;

    float s[MT][NT][4] = {};
    // (a key offset that is a multiple of 8 keeps the XOR swizzle: rows r and r + kw share r % 8)
    gemm_abt_rows<T, D, NT, MT>(s, sQ, warp_row0, sKs + kw * D, lane);

    const int n0 = nb * BN + kw;  // first key of this warp's slice
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int tile_row0 = warp_row0 + 16 * mt;
      const bool need_mask =
          n0 + Tile::KW > seqlen_k || (p.causal && n0 + Tile::KW - 1 > (m0 + tile_row0) / p.pack + diag);
      if (need_mask) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = n0 + j * 8 + 2 * t + (e & 1);
            const int tok = row_token(tile_row0 + g + 8 * (e >> 1));
            if (key >= seqlen_k || (p.causal && key > tok + diag)) s[mt][j][e] = -kInf;
          }
      }

      // Online softmax: rescale O and the running sum by exp2(scale * (m_old - m_new)).
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = row_max[mt][h];
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * h], s[mt][j][2 * h + 1]));
        mx = quad_max(mx);
        const float mx_scaled = mx == -kInf ? 0.f : mx * p.scale_log2;  // fully masked so far: keep exp2 finite
        const float alpha = exp2_approx(row_max[mt][h] * p.scale_log2 - mx_scaled);
        row_max[mt][h] = mx;
        row_sum[mt][h] *= alpha;
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          o[mt][j][2 * h] *= alpha;
          o[mt][j][2 * h + 1] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          s[mt][j][2 * h] = exp2_approx(fmaf(s[mt][j][2 * h], p.scale_log2, -mx_scaled));
          s[mt][j][2 * h + 1] = exp2_approx(fmaf(s[mt][j][2 * h + 1], p.scale_log2, -mx_scaled));
          row_sum[mt][h] += s[mt][j][2 * h] + s[mt][j][2 * h + 1];
        }
      }
    }
    gemm_pb_rows<T, D, NT, MT>(o, s, sVs + kw * D, lane);
  }

  if constexpr (WK) {
    // Merge the four warps' states into warp 0 (same rows, same fragment layout: lane by lane), through the
    // K ring: slot[warp - 1][lane] = {row_max[2], row_sum[2], o[DT][4]} (the V ring then takes a cluster's partials).
    constexpr int kSlot = 4 + 4 * DT;
    static_assert(3 * 32 * kSlot * 4 <= S * BN * D * int(sizeof(T)), "merge slots fit in the K ring");
    float* slots = reinterpret_cast<float*>(sK);
    __syncthreads();  // every warp is done with the last K/V tile
    if (warp > 0) {
      float* mine = slots + ((warp - 1) * 32 + lane) * kSlot;
      mine[0] = row_max[0][0], mine[1] = row_max[0][1], mine[2] = row_sum[0][0], mine[3] = row_sum[0][1];
#pragma unroll
      for (int j = 0; j < DT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[4 + 4 * j + e] = o[0][j][e];
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2 && warp == 0; ++h) {  // (the other warps stay: a cluster merge needs every thread)
      float mx = row_max[0][h];
      for (int w = 0; w < kFwdWarps - 1; ++w) mx = fmaxf(mx, slots[(w * 32 + lane) * kSlot + h]);
      // weight of a state = exp2(scale·(its max − the merged max)); a state that saw no key (max −inf) weighs 0
      auto weight = [&](float m) { return m == -kInf ? 0.f : exp2f((m - mx) * p.scale_log2); };
      const float a0 = weight(row_max[0][h]);
      row_sum[0][h] *= a0;
#pragma unroll
      for (int j = 0; j < DT; ++j) o[0][j][2 * h] *= a0, o[0][j][2 * h + 1] *= a0;
      for (int w = 0; w < kFwdWarps - 1; ++w) {
        const float* other = slots + (w * 32 + lane) * kSlot;
        const float aw = weight(other[h]);
        row_sum[0][h] += aw * other[2 + h];
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          o[0][j][2 * h] += aw * other[4 + 4 * j + 2 * h];
          o[0][j][2 * h + 1] += aw * other[4 + 4 * j + 2 * h + 1];
        }
      }
      row_max[0][h] = mx;
    }
  }
  // Cluster merge: this CTA's normalized partial O [BM][D] and lse [BM] go to its own shared memory (the V ring
  // and the Q tile, free once every warp is past the last tile; the WarpKeys merge above used the K ring).
  constexpr bool kCluster = Tile::kDecode;  // compiled into the decode tiles only; p.cluster_combine picks it
  float* part_o = reinterpret_cast<float*>(sV);
  float* part_lse = reinterpret_cast<float*>(sQ);
  static_assert(!kCluster || BM * D * 4 <= S * BN * D * int(sizeof(T)), "the partials fit in the V ring");
  const bool cluster_combine = kCluster && p.cluster_combine;
  if (cluster_combine) __syncthreads();
  if (warp_active && (!WK || warp == 0)) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float l = quad_sum(row_sum[mt][h]);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const float lse = l > 0.f ? row_max[mt][h] * p.scale + logf(l) : -kInf;
        const int r = warp_row0 + 16 * mt + g + 8 * h;
        if (m0 + r >= rows) continue;
        const int64_t q_index = int64_t(q_tok0 + row_token(r)) * p.hq + row_head(r);  // token-major (token, head)
        if (cluster_combine || p.o_accum) {
          float* dst = cluster_combine ? part_o + r * D : p.o_accum + (split * p.rows_total + q_index) * D;
#pragma unroll
          for (int j = 0; j < DT; ++j)
            *reinterpret_cast<float2*>(dst + j * 8 + 2 * t) =
                make_float2(o[mt][j][2 * h] * inv, o[mt][j][2 * h + 1] * inv);
          if (t == 0) (cluster_combine ? part_lse[r] : p.lse_accum[split * p.rows_total + q_index]) = lse;
        } else {
          T* dst = static_cast<T*>(p.out) + q_index * D;  // q_row_stride == Hq * D
#pragma unroll
          for (int j = 0; j < DT; ++j) store2(dst + j * 8 + 2 * t, o[mt][j][2 * h] * inv, o[mt][j][2 * h + 1] * inv);
          if (t == 0 && p.lse) {
            const int tok = row_token(r), head = row_head(r);
            const int64_t li = p.cu_q ? int64_t(head) * p.total_q + q_tok0 + tok
                                      : (int64_t(b) * p.hq + head) * p.seqlen_q + tok;
            p.lse[li] = lse;
          }
        }
      }
  }
  if constexpr (kCluster) {
    if (cluster_combine) merge_in_cluster<T, D>(p, part_o, part_lse, min(BM, rows - m0), [&](int r) {
      return int64_t(q_tok0 + row_token(r)) * p.hq + row_head(r);
    });
  }
}

// Merges split-KV partials: out = Σ_s exp(lse_s - lse) O_s with lse = log Σ_s exp(lse_s). One warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(128) combine_splits_kernel(const float* o_accum, const float* lse_accum, T* out,
                                                              int num_splits, int64_t rows) {
  pdl_wait();  // a decode-step kernel: may be a PDL launch (common.h)
  pdl_launch_dependents();
  constexpr int kPerLane = D / 32;  // 2 or 4 consecutive elements per lane
  const int64_t row = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float mx = -kInf;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, lse_accum[s * rows + row]);
  float acc[kPerLane] = {};
  float wsum = 0.f;
  if (mx != -kInf) {
    for (int s = 0; s < num_splits; ++s) {
      const float w = expf(lse_accum[s * rows + row] - mx);  // exp(-inf) = 0 for empty splits
      wsum += w;
      const float* src = o_accum + (s * rows + row) * D + lane * kPerLane;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[e] += w * src[e];
    }
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  T* dst = out + row * D + lane * kPerLane;
#pragma unroll
  for (int e = 0; e < kPerLane; e += 2) store2(dst + e, acc[e] * inv, acc[e + 1] * inv);
}

template <typename T, int D, class Tile>
constexpr int fwd_smem() {
  return (Tile::BM + 2 * Tile::kStages * Tile::BN) * D * int(sizeof(T));  // Q + the stages of K and V
}

// The attributes a launch needs: the shared memory opt-in, and for decode clusters above 8 CTAs the non-portable
// size (H100: 16 fit one GPC).
template <typename T, int D, class Tile>
void set_fwd_attributes() {
  auto kernel = flash_fwd_kernel<T, D, Tile>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, fwd_smem<T, D, Tile>()),
             "flash_fwd: cudaFuncSetAttribute");
  if (Tile::kDecode)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
               "flash_fwd: non-portable cluster size");
}

template <typename T, int D, class Tile>
void launch_fwd(const FwdParams& p, dim3 grid, cudaStream_t stream) {
  auto kernel = flash_fwd_kernel<T, D, Tile>;
  set_fwd_attributes<T, D, Tile>();
  constexpr int smem = fwd_smem<T, D, Tile>();
  if (p.decode) launch_pdl(kernel, grid, dim3(kFwdThreads), smem, stream, p.cluster_combine ? grid.x : 1u, p);
  else kernel<<<grid, kFwdThreads, smem, stream>>>(p);
  L3K_CHECK_LAUNCH("flash_fwd_kernel");
}

// The largest cluster (16, 8, 4 or 2 CTAs; 1: none) of this decode kernel the device can co-schedule.
template <typename T, int D, class Tile>
int max_decode_cluster() {
  set_fwd_attributes<T, D, Tile>();
  for (unsigned c : {16u, 8u, 4u, 2u}) {
    const LaunchConfig launch(dim3(c), dim3(kFwdThreads), fwd_smem<T, D, Tile>(), nullptr, c, false);
    int clusters = 0;
    const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, flash_fwd_kernel<T, D, Tile>, &launch.config);
    if (err == cudaSuccess && clusters > 0) return int(c);
    if (err != cudaSuccess) (void)cudaGetLastError();  // a size the device rejects sets the last error: clear it
  }
  return 1;
}

template <typename T, int D>
void launch_combine(const FwdParams& p, int num_splits, cudaStream_t stream) {
  const int64_t blocks = (p.rows_total + 3) / 4;
  launch_pdl(combine_splits_kernel<T, D>, dim3(unsigned(blocks)), dim3(128), 0, stream, 1u, p.o_accum, p.lse_accum,
             static_cast<T*>(p.out), num_splits, p.rows_total);
  L3K_CHECK_LAUNCH("combine_splits_kernel");
}

// Instantiates `fn<T, D>` for the runtime dtype and head dim (bf16/fp16 x 64/128: four variants per kernel).
template <template <typename, int> class Fn, typename... Args>
void dispatch(DType dtype, int d, Args&&... args) {
  if (dtype == DType::BF16) {
    if (d == 128) return Fn<__nv_bfloat16, 128>::run(args...);
    return Fn<__nv_bfloat16, 64>::run(args...);
  }
  if (d == 128) return Fn<__half, 128>::run(args...);
  return Fn<__half, 64>::run(args...);
}
template <typename T, int D>
struct RunFwd {
  static void run(const FwdParams& p, dim3 grid, cudaStream_t s) {
    if (p.decode && p.warp_keys) return launch_fwd<T, D, DecodeWarpKeysTile>(p, grid, s);
    if (p.decode) return launch_fwd<T, D, DecodeTile>(p, grid, s);
    launch_fwd<T, D, PrefillTile<D>>(p, grid, s);
  }
};
template <typename T, int D>
struct RunCombine {
  static void run(const FwdParams& p, int splits, cudaStream_t s) { launch_combine<T, D>(p, splits, s); }
};

void check_common(int dtype, int d, int hq, int hkv) {
  const DType dt = to_dtype(dtype, "dtype");
  require(dt == DType::BF16 || dt == DType::F16, "dtype", "expected bf16 or fp16, got code " + std::to_string(dtype));
  require(d == 64 || d == 128, "d", "expected head dim 64 or 128, got " + std::to_string(d));
  require(hkv > 0 && hq > 0 && hq % hkv == 0, "hkv",
          "query heads (" + std::to_string(hq) + ") must be a positive multiple of KV heads (" +
              std::to_string(hkv) + ")");
}

}  // namespace l3k::attn

namespace l3k {

void flash_attn_fwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, std::uintptr_t lse,
                    std::uintptr_t cu_seqlens, std::uintptr_t cu_seqlens_k, int batch, int max_seqlen,
                    int max_seqlen_k, int total_q, int hq, int hkv, int d, bool causal, float softmax_scale,
                    int dtype, int num_sms, std::uintptr_t stream) {
  using namespace attn;
  (void)num_sms;
  check_common(dtype, d, hq, hkv);
  require(batch >= 0 && batch <= 65535, "batch", "expected 0..65535 sequences, got " + std::to_string(batch));
  require((cu_seqlens == 0) == (cu_seqlens_k == 0), "cu_seqlens_k", "pass both offset arrays or neither");
  require(softmax_scale > 0.f, "softmax_scale", "expected a positive scale");
  if (batch == 0 || max_seqlen <= 0 || (cu_seqlens && total_q <= 0)) return;
  if (flash_fwd_sm90_enabled() &&
      flash_fwd_sm90_covers(q, k, v, out, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                            cu_seqlens ? total_q : max_seqlen, hq, d, causal, dtype)) {
    return flash_attn_fwd_sm90(q, k, v, out, lse, cu_seqlens, batch, max_seqlen, total_q, hq, hkv, d,
                               softmax_scale, stream);
  }
  FwdParams p{};
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.out = as_ptr<void>(out);
  p.lse = as_ptr<float>(lse);
  p.cu_q = as_ptr<const int>(cu_seqlens);
  p.cu_k = as_ptr<const int>(cu_seqlens_k);
  p.q_row_stride = int64_t(hq) * d;
  p.k_row_stride = p.v_row_stride = int64_t(hkv) * d;
  p.k_batch_stride = p.v_batch_stride = int64_t(max_seqlen_k) * hkv * d;
  p.seqlen_q = max_seqlen;
  p.seqlen_k = max_seqlen_k;
  p.total_q = total_q;
  p.hq = hq;
  p.group = hq / hkv;
  p.pack = 1;
  p.causal = causal;
  p.scale = softmax_scale;
  p.scale_log2 = softmax_scale * kLog2e;
  const dim3 grid(cdiv(max_seqlen, d == 128 ? PrefillTile<128>::BM : PrefillTile<64>::BM), hq, batch);
  dispatch<RunFwd>(to_dtype(dtype, "dtype"), d, p, grid, as_stream(stream));
}

void decode_attn(std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t cache_seqlens,
                 std::uintptr_t out, std::uintptr_t o_accum, std::uintptr_t lse_accum, int num_splits, bool cluster,
                 int B, int Sq, int Hq, int Hkv, int D, int L, std::int64_t k_stride_b, std::int64_t k_stride_l,
                 std::int64_t v_stride_b, std::int64_t v_stride_l, float softmax_scale, int dtype, int num_sms,
                 std::uintptr_t stream) {
  using namespace attn;
  (void)num_sms;
  check_common(dtype, D, Hq, Hkv);
  require(B >= 0 && B <= 65535, "B", "expected 0..65535 sequences, got " + std::to_string(B));
  require(num_splits >= 1, "num_splits", "expected >= 1, got " + std::to_string(num_splits));
  require(k_stride_l % 8 == 0 && k_stride_b % 8 == 0 && v_stride_l % 8 == 0 && v_stride_b % 8 == 0, "k_cache",
          "cache strides must be multiples of 8 elements (16-byte rows)");
  if (B == 0 || Sq == 0 || L == 0) return;
  cluster = cluster && num_splits > 1;
  require(!cluster || num_splits <= 16, "num_splits", "a cluster merge takes at most 16 splits, got " +
                                                          std::to_string(num_splits));
  // checked after the early return: empty workspaces (no rows) have null pointers
  require(num_splits == 1 || cluster || (o_accum && lse_accum), "o_accum", "split-KV needs both partial workspaces");
  FwdParams p{};
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k_cache);
  p.v = as_ptr<const void>(v_cache);
  p.out = as_ptr<void>(out);
  p.seqused_k = as_ptr<const int>(cache_seqlens);
  p.q_row_stride = int64_t(Hq) * D;
  p.k_row_stride = k_stride_l;
  p.v_row_stride = v_stride_l;
  p.k_batch_stride = k_stride_b;
  p.v_batch_stride = v_stride_b;
  p.rows_total = int64_t(B) * Sq * Hq;
  p.seqlen_q = Sq;
  p.seqlen_k = L;
  p.hq = Hq;
  p.group = Hq / Hkv;
  p.pack = p.group;  // all query heads of a KV group share each K/V tile
  p.warp_keys = Sq * p.group <= DecodeWarpKeysTile::BM;  // every decode step of a GQA model with group <= 16
  p.num_m_blocks = cdiv(Sq * p.group, p.warp_keys ? DecodeWarpKeysTile::BM : DecodeTile::BM);
  p.blocks_per_split = cdiv(cdiv(L, DecodeTile::BN), num_splits);
  p.decode = true;
  p.cluster_combine = cluster;
  p.causal = true;
  p.scale = softmax_scale;
  p.scale_log2 = softmax_scale * kLog2e;
  if (num_splits > 1 && !cluster) {
    p.o_accum = as_ptr<float>(o_accum);
    p.lse_accum = as_ptr<float>(lse_accum);
  }
  require(int64_t(Hkv) * p.num_m_blocks <= 65535, "Hq", "too many query rows per KV head");
  const DType dt = to_dtype(dtype, "dtype");
  const dim3 grid(num_splits, Hkv * p.num_m_blocks, B);
  dispatch<RunFwd>(dt, D, p, grid, as_stream(stream));
  if (num_splits > 1 && !cluster) dispatch<RunCombine>(dt, D, p, num_splits, as_stream(stream));
}

int decode_attn_max_cluster(int d, int dtype, int rows_per_kv_head) {
  using namespace attn;
  check_common(dtype, d, 1, 1);
  require(rows_per_kv_head >= 1, "rows_per_kv_head", "expected >= 1, got " + std::to_string(rows_per_kv_head));
  const bool warp_keys = rows_per_kv_head <= DecodeWarpKeysTile::BM;
  const bool bf16 = to_dtype(dtype, "dtype") == DType::BF16;
  if (bf16 && d == 128) return warp_keys ? max_decode_cluster<__nv_bfloat16, 128, DecodeWarpKeysTile>()
                                         : max_decode_cluster<__nv_bfloat16, 128, DecodeTile>();
  if (bf16) return warp_keys ? max_decode_cluster<__nv_bfloat16, 64, DecodeWarpKeysTile>()
                             : max_decode_cluster<__nv_bfloat16, 64, DecodeTile>();
  if (d == 128) return warp_keys ? max_decode_cluster<__half, 128, DecodeWarpKeysTile>()
                                 : max_decode_cluster<__half, 128, DecodeTile>();
  return warp_keys ? max_decode_cluster<__half, 64, DecodeWarpKeysTile>() : max_decode_cluster<__half, 64, DecodeTile>();
}

}  // namespace l3k
