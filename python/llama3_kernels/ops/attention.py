"""Flash attention (GQA, causal, padded or varlen/document-masked, log-sum-exp out) and KV-cache decode.

Layout follows FlashAttention: padded q [B, S, Hq, D], k/v [B, Sk, Hkv, D]; packed varlen q [T, Hq, D]
with int32 `cu_seqlens` [num_seqs + 1]. K/V heads are shared by Hq / Hkv query heads and never repeated.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from llama3_kernels import reference
from llama3_kernels.ops._common import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_same_device,
    check_tensor,
    has_kernel,
    kernel,
    on_input_device,
    ptr,
    sm_count,
    stream,
    switched_off,
    use_cuda_kernel,
)

KERNEL_HEAD_DIMS = (64, 128)


def _kernel_ok(name: str, q: Tensor, *tensors: Tensor | None) -> bool:
    return q.dtype in HALF_DTYPES and q.shape[-1] in KERNEL_HEAD_DIMS and use_cuda_kernel(name, q, *tensors)


# ------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("llama3_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns (out like q, lse fp32: [B, Hq, S] padded or [Hq, T] varlen)."""
    return reference.flash_attention(q, k, v, causal, softmax_scale, cu_seqlens, cu_seqlens_k)


@flash_attn_fwd.register_kernel("cuda")
@on_input_device
def _flash_attn_fwd_cuda(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, softmax_scale):
    if not _kernel_ok("flash_attn_fwd", q, k, v):
        return reference.flash_attention(q, k, v, causal, softmax_scale, cu_seqlens, cu_seqlens_k)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    varlen = cu_seqlens is not None
    if varlen and (cu_seqlens_k is None or cu_seqlens_k.data_ptr() == cu_seqlens.data_ptr()):
        if k.shape[0] != q.shape[0]:  # one set of offsets: the kernels read k/v rows up to q's token count
            raise ValueError(f"k: packed k with the queries' offsets needs T={q.shape[0]} tokens, got {k.shape[0]}")
    batch = cu_seqlens.shape[0] - 1 if varlen else q.shape[0]
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty((hq, q.shape[0]) if varlen else (batch, hq, q.shape[1]), dtype=torch.float32, device=q.device)
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens
    kernel("flash_attn_fwd")(
        ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(cu_seqlens), ptr(cu_k),
        batch, max_seqlen, max_seqlen_k, q.shape[0] if varlen else 0, hq, hkv, d, bool(causal),
        float(softmax_scale), DTYPE_CODES[q.dtype], sm_count(q.device.index), stream(q),
    )  # fmt: skip
    return out, lse


@flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, softmax_scale):
    if cu_seqlens is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("llama3_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv); dk/dv are summed over the query heads that share each KV head."""
    return reference.flash_attention_backward(dout, q, k, v, causal, softmax_scale, cu_seqlens, cu_seqlens_k)


@flash_attn_bwd.register_kernel("cuda")
@on_input_device
def _flash_attn_bwd_cuda(
    dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, softmax_scale, deterministic
):
    if not _kernel_ok("flash_attn_bwd", q, k, v, out, dout):
        return reference.flash_attention_backward(dout, q, k, v, causal, softmax_scale, cu_seqlens, cu_seqlens_k)
    q, k, v, out, dout, lse = (t.contiguous() for t in (q, k, v, out, dout, lse))
    varlen = cu_seqlens is not None
    batch = cu_seqlens.shape[0] - 1 if varlen else q.shape[0]
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dsum = torch.empty_like(lse)  # workspace: rowsum(dout * out) per (token, query head)
    # Not deterministic: dQ is summed into an fp32 workspace by the dK/dV kernel (5 tile GEMMs instead of 7);
    # L3K_BWD_FUSED_DQ=0 keeps the separate dQ kernel
    fused = not deterministic and not switched_off("L3K_BWD_FUSED_DQ")
    dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device) if fused else None
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens
    kernel("flash_attn_bwd")(
        ptr(dout), ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(dsum), ptr(dq), ptr(dk), ptr(dv),
        ptr(cu_seqlens), ptr(cu_k), batch, max_seqlen, max_seqlen_k, q.shape[0] if varlen else q.shape[1],
        k.shape[0] if varlen else k.shape[1], hq, hkv, d, bool(causal), float(softmax_scale), bool(deterministic),
        DTYPE_CODES[q.dtype], sm_count(q.device.index), stream(q), ptr(dq_accum),
    )  # fmt: skip
    return dq, dk, dv


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, softmax_scale, det):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_setup(ctx, inputs, output):
    q, k, v, cu, cu_k, max_q, max_k, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu, cu_k)
    ctx.mark_non_differentiable(lse)  # a statistic for combining partial results; no gradient flows through it
    ctx.args = (max_q, max_k, causal, scale)


def _flash_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu, cu_k = ctx.saved_tensors
    max_q, max_k, causal, scale = ctx.args
    det = torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = flash_attn_bwd(dout, q, k, v, out, lse, cu, cu_k, max_q, max_k, causal, scale, det)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("llama3_kernels::flash_attn_fwd", _flash_backward, setup_context=_flash_setup)


@torch.library.custom_op("llama3_kernels::decode_attn", mutates_args=())
def decode_attn(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, softmax_scale: float) -> Tensor:
    """q [B, Sq, Hq, D], caches [B, L, Hkv, D], cache_seqlens [B] int32 → out like q."""
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale)


def cache_layout_ok(cache: Tensor) -> bool:
    """A KV cache [B, L, Hkv, D] the kernels can address: head h at h·D within a token row (a head-major cache
    viewed as [B, L, Hkv, D] is not that), 16-byte token rows and batch rows (strides multiples of 8)."""
    return (
        cache.stride(3) == 1
        and cache.stride(0) % 8 == 0
        and cache.stride(1) % 8 == 0
        and (cache.shape[2] == 1 or cache.stride(2) == cache.shape[3])
    )


CLUSTER_MAX_TILES = 16  # key tiles a split may grow to when its count is capped at the cluster size
CLUSTER_MIN_FILL = 0.75  # and the capped grid must still cover this share of the SMs


def _decode_splits(
    batch: int, rows: int, hkv: int, cache_len: int, num_sms: int, max_cluster: int = 1
) -> tuple[int, bool]:
    """(split-KV count, whether the splits merge in a cluster).

    The count: enough CTAs for about two waves, at least 64 keys per split. The decode kernel's CTA covers 64 query
    rows (the Sq new tokens times the query heads of one KV group) and streams 64-key tiles; one split per CTA once
    the batch alone fills the GPU. A cluster (max_cluster > 1 CTAs) merges the splits without a combine kernel but
    holds at most max_cluster of them: the count is capped there while that leaves each split at most
    CLUSTER_MAX_TILES tiles and the grid still covers CLUSTER_MIN_FILL of the SMs (a batch-1 step of a model with 8
    KV heads and a 4096-token cache: 16 splits of 4 tiles, 128 CTAs instead of 264 of 2). Past that (long caches,
    or few KV heads) the longer chains or idle SMs would cost more than the combine kernel saves, and the splits
    go through the combine kernel uncapped.
    """
    ctas = batch * hkv * -(-rows // 64)
    tiles = -(-cache_len // 64)
    splits = max(1, min(tiles, -(-2 * num_sms // max(ctas, 1)), 128))
    if splits == 1 or max_cluster < 2:
        return splits, False
    if splits <= max_cluster:
        return splits, True
    if -(-tiles // max_cluster) <= CLUSTER_MAX_TILES and ctas * max_cluster >= CLUSTER_MIN_FILL * num_sms:
        return max_cluster, True
    return splits, False


@functools.cache
def _max_cluster(device_index: int, d: int, dtype_code: int, rows: int) -> int:
    """The most splits one cluster of the decode kernel holds on this device (the launcher asks the occupancy API)."""
    if not has_kernel("decode_attn_max_cluster"):
        return 1
    with torch.cuda.device(device_index):
        return kernel("decode_attn_max_cluster")(d, dtype_code, rows)


@decode_attn.register_kernel("cuda")
@on_input_device
def _decode_attn_cuda(q, k_cache, v_cache, cache_seqlens, softmax_scale):
    strides_ok = cache_layout_ok(k_cache) and cache_layout_ok(v_cache)
    if not _kernel_ok("decode_attn", q, k_cache, v_cache) or not strides_ok:
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale)
    q, cache_seqlens = q.contiguous(), cache_seqlens.contiguous()
    b, sq, hq, d = q.shape
    hkv, cache_len = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    rows, dev = sq * (hq // hkv), q.device.index
    # L3K_DECODE_CLUSTER=0: merge the splits through fp32 workspaces and a combine kernel instead
    tile_rows = min(rows, 17)  # the query only tells the <= 16-row tile from the other
    max_cluster = 1 if switched_off("L3K_DECODE_CLUSTER") else _max_cluster(dev, d, DTYPE_CODES[q.dtype], tile_rows)
    splits, cluster = _decode_splits(b, rows, hkv, cache_len, sm_count(dev), max_cluster)
    o_accum = lse_accum = None
    if splits > 1 and not cluster:  # per-split partial outputs and log-sum-exps, merged by the combine kernel
        o_accum = torch.empty((splits, b, sq, hq, d), dtype=torch.float32, device=q.device)
        lse_accum = torch.empty((splits, b, sq, hq), dtype=torch.float32, device=q.device)
    kernel("decode_attn")(
        ptr(q), ptr(k_cache), ptr(v_cache), ptr(cache_seqlens), ptr(out), ptr(o_accum), ptr(lse_accum), splits,
        cluster, b, sq, hq, hkv, d,
        k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        float(softmax_scale), DTYPE_CODES[q.dtype], sm_count(q.device.index), stream(q),
    )  # fmt: skip
    return out


@decode_attn.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale):
    return torch.empty_like(q)


# ------------------------------------------------------------------------------------- public API
def _check_qkv(q: Tensor, k: Tensor, v: Tensor, ndim: int) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=ndim)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=ndim)
    check_tensor("v", v, dtypes=(q.dtype,), ndim=ndim)
    check_same_device(q=q, k=k, v=v)
    d, hq, hkv = q.shape[-1], q.shape[-2], k.shape[-2]
    if d % 8 or not 0 < d <= 256:
        raise ValueError(f"q: head dim must be a multiple of 8 in [8, 256], got {d}")
    if k.shape[-1] != d or v.shape != k.shape:
        raise ValueError(f"k, v: expected equal shapes with head dim {d}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k: query heads ({hq}) must be a multiple of KV heads ({hkv})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit stride in the head dim, got strides {t.stride()}")


def _check_cu_seqlens(name: str, cu: Tensor, total: int, device: torch.device) -> int:
    """Validate cumulative sequence lengths; returns the longest sequence."""
    check_tensor(name, cu, dtypes=(torch.int32,), ndim=1)
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device}, got {cu.device}")
    if cu.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one entry, got shape {tuple(cu.shape)}")
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name}: expected non-decreasing offsets from 0 to {total}, got {vals[:8]}…{vals[-1]}")
    return max((b - a for a, b in zip(vals, vals[1:])), default=0)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    return_lse: bool = False,
    *,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention with GQA, causal masks and packed documents. Differentiable: on the GPU the backward
    sums dQ with atomics (last bits vary from run to run) unless torch.use_deterministic_algorithms(True) is on.

    Args:
        q: [B, S, Hq, D] padded, or [T, Hq, D] packed with `cu_seqlens`. fp32, fp16 or bf16.
        k, v: [B, Sk, Hkv, D] or [Tk, Hkv, D]; Hq must be a multiple of Hkv.
        causal: mask keys after each query, aligned bottom-right when the key sequence is longer.
        softmax_scale: defaults to 1 / sqrt(D).
        cu_seqlens: int32 [N + 1] document offsets into q (and k unless `cu_seqlens_k` is given):
            tokens attend only within their own document.
        max_seqlen: longest document; computed (with a host sync) when omitted. Offsets are validated
            only when it is omitted.
        return_lse: also return the natural-log log-sum-exp, fp32 [B, Hq, S] or [Hq, T]; it is marked
            non-differentiable (gradients flow through `out` only).
        cu_seqlens_k, max_seqlen_k: separate key offsets (context parallelism: each query segment sees a
            longer key segment of its document).
    Returns:
        out like q, or (out, lse).
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    varlen = cu_seqlens is not None
    _check_qkv(q, k, v, 3 if varlen else 4)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not scale > 0:
        raise ValueError(f"softmax_scale: expected a positive float, got {softmax_scale!r}")
    if varlen:
        same_offsets = cu_seqlens_k is None or cu_seqlens_k.data_ptr() == cu_seqlens.data_ptr()
        if same_offsets and k.shape[0] != q.shape[0]:
            raise ValueError(f"k: packed k needs T={q.shape[0]} tokens like q (or cu_seqlens_k), got {k.shape[0]}")
        if max_seqlen is None:
            max_seqlen = _check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], q.device)
        if cu_seqlens_k is not None:
            if cu_seqlens_k.shape != cu_seqlens.shape:
                raise ValueError(
                    f"cu_seqlens_k: expected shape {tuple(cu_seqlens.shape)}, got {tuple(cu_seqlens_k.shape)}"
                )
            if max_seqlen_k is None:
                max_seqlen_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], k.device)
        max_seqlen_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    else:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k: only valid together with cu_seqlens")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k: expected batch {q.shape[0]} like q, got {k.shape[0]}")
        max_seqlen, max_seqlen_k = q.shape[1], k.shape[1]
    out, lse = flash_attn_fwd(q, k, v, cu_seqlens, cu_seqlens_k, int(max_seqlen), int(max_seqlen_k), causal, scale)
    return (out, lse) if return_lse else out


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    softmax_scale: float | None = None,
) -> Tensor:
    """Attention of a few new tokens per sequence against a KV cache that already holds them.

    Args:
        q: [B, Sq, Hq, D], the Sq newest tokens of each sequence.
        k_cache, v_cache: [B, L, Hkv, D] (a batch-major cache; the head dim must have unit stride).
        cache_seqlens: int32 [B], valid cache length per sequence, counting the new tokens; values must
            lie in [Sq, L] (checked on CPU only: on GPU the check would cost a sync and break CUDA graphs).
        softmax_scale: defaults to 1 / sqrt(D).
    Returns:
        [B, Sq, Hq, D] like q; new tokens are causal among themselves.
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("k_cache", k_cache, dtypes=(q.dtype,), ndim=4)
    check_tensor("v_cache", v_cache, dtypes=(q.dtype,), ndim=4)
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    b, sq, hq, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[-1] != d:
        raise ValueError(
            f"k_cache, v_cache: expected equal shapes [{b}, L, Hkv, {d}], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if hq % k_cache.shape[2]:
        raise ValueError(f"k_cache: query heads ({hq}) must be a multiple of KV heads ({k_cache.shape[2]})")
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens: expected shape ({b},), got {tuple(cache_seqlens.shape)}")
    if q.device.type == "cpu" and b:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < sq or hi > k_cache.shape[1]:
            raise ValueError(f"cache_seqlens: values must lie in [{sq}, {k_cache.shape[1]}], got [{lo}, {hi}]")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    return decode_attn(q, k_cache, v_cache, cache_seqlens, scale)
