// Launchers of the attention family (csrc/attention/): flash attention forward and backward, KV-cache decode.
// Pointers are device addresses and the stream a cudaStream_t, all as uintptr_t (0 = null); dtype codes as in
// common.h. Workspaces are allocated by the caller (Python, with torch.empty) so kernels never allocate.
#pragma once
#include <cstdint>

namespace l3k {

// out/lse from q [B,S,Hq,D] (k/v [B,Sk,Hkv,D]) when cu_seqlens == 0, else packed q [T,Hq,D] (k/v [Tk,Hkv,D])
// with int32 offsets cu_seqlens / cu_seqlens_k [batch+1]. lse fp32 [B,Hq,S] or [Hq,T] (total_q = T).
// Causal masks are aligned bottom-right per sequence; rows that see no key get out 0 and lse -inf.
void flash_attn_fwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, std::uintptr_t lse,
                    std::uintptr_t cu_seqlens, std::uintptr_t cu_seqlens_k, int batch, int max_seqlen,
                    int max_seqlen_k, int total_q, int hq, int hkv, int d, bool causal, float softmax_scale,
                    int dtype, int num_sms, std::uintptr_t stream);

// The Hopper TMA + wgmma forward (flash_fwd_sm90.cu), used by flash_attn_fwd when enabled (environment variable
// L3K_FLASH_FWD_SM90=1) for what it covers: causal self-attention (equal query/key lengths, or packed documents with
// one set of offsets for both), D = 64 or 128, bf16, 16-byte aligned tensors.
bool flash_fwd_sm90_enabled();
bool flash_fwd_sm90_covers(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                           std::uintptr_t cu_seqlens, std::uintptr_t cu_seqlens_k, int seqlen_q, int seqlen_k,
                           std::int64_t rows, int hq, int d, bool causal, int dtype);
void flash_attn_fwd_sm90(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                         std::uintptr_t lse, std::uintptr_t cu_seqlens, int batch, int max_seqlen, int total_q, int hq,
                         int hkv, int d, float softmax_scale, std::uintptr_t stream);

// The Hopper TMA + wgmma backward (flash_bwd_sm90.cu), used by flash_attn_bwd when enabled (L3K_FLASH_BWD_SM90=1)
// for causal self-attention (equal lengths, or packed documents with one set of offsets for queries and keys),
// D = 64 or 128, bf16, 16-byte aligned tensors. dsum: the fp32 workspace shaped like lse.
bool flash_bwd_sm90_enabled();
bool flash_bwd_sm90_covers(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t dout,
                           std::uintptr_t cu_seqlens, std::uintptr_t cu_seqlens_k, int seqlen_q, int seqlen_k,
                           std::int64_t rows_q, std::int64_t rows_k, int batch, int hq, int d, bool causal,
                           int dtype);
void flash_attn_bwd_sm90(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                         std::uintptr_t out, std::uintptr_t lse, std::uintptr_t dsum, std::uintptr_t dq,
                         std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t cu_seqlens, int batch, int max_seqlen,
                         int total_q, int hq, int hkv, int d, float softmax_scale, std::uintptr_t stream);

// dq/dk/dv (dk/dv summed over each KV head's query heads). dsum: fp32 workspace shaped like lse.
// total_q_or_S / total_k_or_Sk: tokens of packed q/k, or the padded lengths. dq_accum 0: deterministic (a dq
// kernel, no atomics); else an fp32 workspace like q (16-byte aligned, any contents) that the dK/dV kernel sums dQ
// into with atomics (5 tile GEMMs instead of 7; needs deterministic false).
void flash_attn_bwd(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                    std::uintptr_t lse, std::uintptr_t dsum, std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
                    std::uintptr_t cu_seqlens, std::uintptr_t cu_seqlens_k, int batch, int max_seqlen,
                    int max_seqlen_k, int total_q_or_S, int total_k_or_Sk, int hq, int hkv, int d, bool causal,
                    float softmax_scale, bool deterministic, int dtype, int num_sms, std::uintptr_t stream,
                    std::uintptr_t dq_accum);

// q [B,Sq,Hq,D] contiguous against caches [B,L,Hkv,D] (strides in elements, unit stride in D) with int32
// cache_seqlens [B]. num_splits > 1 splits each cache over CTAs (flash-decoding). With `cluster` the splits run as
// one thread-block cluster and merge in distributed shared memory (num_splits <= decode_attn_max_cluster(...));
// otherwise they need fp32 workspaces o_accum [num_splits,B,Sq,Hq,D] and lse_accum [num_splits,B,Sq,Hq] and a
// combine kernel; with 1 split or a cluster they may be 0.
void decode_attn(std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t cache_seqlens,
                 std::uintptr_t out, std::uintptr_t o_accum, std::uintptr_t lse_accum, int num_splits, bool cluster,
                 int B, int Sq, int Hq, int Hkv, int D, int L, std::int64_t k_stride_b, std::int64_t k_stride_l,
                 std::int64_t v_stride_b, std::int64_t v_stride_l, float softmax_scale, int dtype, int num_sms,
                 std::uintptr_t stream);

// The most splits (16, 8, 4, 2; 1: no cluster) decode_attn can run as one cluster on the current device, for its
// head dim, dtype and rows per KV head (Sq times the query heads of a group).
int decode_attn_max_cluster(int d, int dtype, int rows_per_kv_head);

// RoPE for training: x [tokens, heads, d] (token stride x_row_stride, heads dense) rotated pairwise by rot
// [tokens, d/2] fp32 (cos, sin), or by the conjugate rotation when `inverse` (the backward), into out dense.
void rope_rotate(std::uintptr_t x, std::int64_t x_row_stride, std::uintptr_t rot, std::uintptr_t out,
                 std::int64_t tokens, int heads, int d, bool inverse, int dtype, int num_sms, std::uintptr_t stream);

// RoPE on the q and k heads of qkv [T, (Hq + 2 Hkv) D] (row stride qkv_row_stride, in elements) by rot [T, D/2]
// fp32 (cos, sin) pairs, q written to q_out [T, Hq, D], rotated k and raw v appended to the caches [Bmax, L, Hkv, D]
// at (t / S, positions[t]) (int64). Tokens whose position is outside [0, L) write no cache entry and get NaN q.
void rope_kv_cache(std::uintptr_t qkv, std::int64_t qkv_row_stride, std::uintptr_t rot, std::uintptr_t positions,
                   std::uintptr_t q_out, std::uintptr_t k_cache, std::uintptr_t v_cache, std::int64_t tokens, int S,
                   int hq, int hkv, int d, int L, std::int64_t k_stride_b, std::int64_t k_stride_l,
                   std::int64_t v_stride_b, std::int64_t v_stride_l, int dtype, std::uintptr_t stream);

}  // namespace l3k
