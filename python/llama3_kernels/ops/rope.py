"""RoPE: `rope` for training and prefill (differentiable), and `rope_kv_cache`, the decode step's rotate-and-append.

Written with torch ops, a rotation casts to fp32, multiplies as complex numbers and casts back: three kernels and
fp32 copies each way. `rope` reads and writes each 16-bit element once, forward and backward (the gradient of a
rotation is the inverse rotation); L3K_ROPE=0 turns its kernel off (the reference runs), e.g. while it is checked
on a new device. The model's decode step would otherwise run five kernels per layer (those three and an index_put
for each cache); `rope_kv_cache` does it in one pass over the token's qkv row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama3_kernels import reference
from llama3_kernels.ops._common import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_last_dim_contiguous,
    check_same_device,
    check_shape,
    check_tensor,
    kernel,
    on_input_device,
    ptr,
    sm_count,
    stream,
    switched_off,
    use_cuda_kernel,
)
from llama3_kernels.ops.attention import cache_layout_ok


@torch.library.custom_op("llama3_kernels::rope_rotate", mutates_args=())
def rope_rotate_op(x: Tensor, rot_pairs: Tensor, inverse: bool) -> Tensor:
    """x [T, H, D] (last dim contiguous), rot_pairs [T, D/2, 2] fp32 (cos, sin) → x rotated, [T, H, D] contiguous."""
    return reference.rope_rotate(x, torch.view_as_complex(rot_pairs.contiguous()), inverse)


@rope_rotate_op.register_kernel("cuda")
@on_input_device
def _rope_rotate_cuda(x, rot_pairs, inverse):
    t, h, d = x.shape
    launchable = (
        not switched_off("L3K_ROPE")
        and x.dtype in HALF_DTYPES
        and d % 8 == 0
        and d <= 512
        and x.stride(2) == 1
        and x.stride(1) == d  # heads dense within a token
        and (t <= 1 or (x.stride(0) % 8 == 0 and x.stride(0) >= h * d))
        and rot_pairs.is_contiguous()
        and use_cuda_kernel("rope_rotate", x, rot_pairs)
    )
    if not launchable:
        return reference.rope_rotate(x, torch.view_as_complex(rot_pairs.contiguous()), inverse)
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    kernel("rope_rotate")(
        ptr(x), x.stride(0), ptr(rot_pairs), ptr(out), t, h, d, inverse, DTYPE_CODES[x.dtype],
        sm_count(x.device.index), stream(x),
    )  # fmt: skip
    return out


@rope_rotate_op.register_fake
def _(x, rot_pairs, inverse):
    return x.new_empty(x.shape)


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.inverse = inputs[2]


def _rope_backward(ctx, grad):
    (rot_pairs,) = ctx.saved_tensors
    return rope_rotate_op(grad, rot_pairs, not ctx.inverse), None, None


torch.library.register_autograd("llama3_kernels::rope_rotate", _rope_backward, setup_context=_rope_setup)


def rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of every head by each token's angles (Meta's RoPE convention).

    Args:
        x: [..., H, D] float32, bfloat16 or float16 (e.g. q [B, S, Hq, D]), with a unit stride in the last dim.
        rot: [..., D/2] complex64, cos + i·sin of each token's angles, broadcastable to x's leading dims
            (e.g. [S, D/2] or [B, S, D/2]). Not differentiated: a table, not a parameter.
    Returns:
        [..., H, D] in x's dtype, contiguous: the pairs as complex numbers times rot, in fp32, rounded once.
        Differentiable with respect to x.
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_tensor("rot", rot, dtypes=(torch.complex64,), min_ndim=1)
    check_last_dim_contiguous("x", x)
    *lead, h, d = x.shape
    if d % 2:
        raise ValueError(f"x: expected an even head dim (pairs), got shape {tuple(x.shape)}")
    try:
        rot = rot.expand(*lead, d // 2)
    except RuntimeError:
        raise ValueError(f"rot: expected a shape broadcastable to {(*lead, d // 2)}, got {tuple(rot.shape)}") from None
    check_same_device(x=x, rot=rot)
    if rot.requires_grad and torch.is_grad_enabled():
        raise ValueError("rot: expected a table without gradient (rope differentiates x only)")
    rot_pairs = torch.view_as_real(rot.resolve_conj().reshape(-1, d // 2).contiguous())  # [T, D/2, 2]
    return rope_rotate_op(x.reshape(-1, h, d), rot_pairs, False).view(*lead, h, d)


def _reference(qkv: Tensor, rot_pairs: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int):
    return reference.rope_kv_cache(qkv, torch.view_as_complex(rot_pairs), positions, k_cache, v_cache, n_heads)


@torch.library.custom_op("llama3_kernels::rope_kv_cache", mutates_args=("k_cache", "v_cache"))
def rope_kv_cache_op(
    qkv: Tensor, rot_pairs: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int
) -> Tensor:
    """qkv [B, S, (Hq + 2 Hkv) D], rot_pairs [B, S, D/2, 2] fp32 (cos, sin), positions [B, S] int64, caches
    [Bmax, L, Hkv, D] (written) → q [B, S, Hq, D]."""
    return _reference(qkv, rot_pairs, positions, k_cache, v_cache, n_heads)


@rope_kv_cache_op.register_kernel("cuda")
@on_input_device
def _rope_kv_cache_cuda(qkv, rot_pairs, positions, k_cache, v_cache, n_heads):
    b, s, n = qkv.shape
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    launchable = (
        qkv.dtype in HALF_DTYPES
        and d % 8 == 0
        and d <= 512
        and qkv.stride(-1) == 1
        and qkv.stride(1) % 8 == 0
        and qkv.stride(1) >= n  # (a size-1 dim may carry any stride: the launcher requires a covering one)
        and (b == 1 or qkv.stride(0) == s * qkv.stride(1))  # tokens at a uniform stride
        and cache_layout_ok(k_cache)
        and cache_layout_ok(v_cache)
        and use_cuda_kernel("rope_kv_cache", qkv, k_cache, v_cache)
    )
    if not launchable:
        return _reference(qkv, rot_pairs, positions, k_cache, v_cache, n_heads)
    rot_pairs, positions = rot_pairs.contiguous(), positions.contiguous()
    q = torch.empty((b, s, n_heads, d), dtype=qkv.dtype, device=qkv.device)
    kernel("rope_kv_cache")(
        ptr(qkv), qkv.stride(1), ptr(rot_pairs), ptr(positions), ptr(q), ptr(k_cache), ptr(v_cache), b * s, s,
        n_heads, hkv, d, k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        DTYPE_CODES[qkv.dtype], stream(qkv),
    )  # fmt: skip
    return q


@rope_kv_cache_op.register_fake
def _(qkv, rot_pairs, positions, k_cache, v_cache, n_heads):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], n_heads, k_cache.shape[3]))


def check_cache_args(
    x_name: str,
    x: Tensor,
    width_name: str,
    width: int,
    rot: Tensor,
    positions: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
) -> None:
    """rope_kv_cache's arguments around x [B, S, ...] (qkv, or the fused op's input) whose projection (qkv, or
    wqkv's rows: named `width_name`) has `width` = (n_heads + 2 Hkv) D columns: dtypes, shapes, devices, and on the
    CPU the positions' range."""
    check_tensor("k_cache", k_cache, dtypes=(x.dtype,), ndim=4)
    check_tensor("v_cache", v_cache, dtypes=(x.dtype,), ndim=4)
    check_tensor("rot", rot, dtypes=(torch.complex64,), ndim=3)
    check_tensor("positions", positions, dtypes=(torch.int64,), ndim=2)
    b, s = x.shape[:2]
    bmax, length, hkv, d = k_cache.shape
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"n_heads: expected a positive int, got {n_heads!r}")
    if d % 2 or width != (n_heads + 2 * hkv) * d:
        raise ValueError(f"{width_name}: expected (n_heads + 2 Hkv) * D = {(n_heads + 2 * hkv) * d} projection columns "
                         f"with an even D (Hkv={hkv}, D={d} from k_cache), got {width}")  # fmt: skip
    if bmax < b:
        raise ValueError(f"k_cache: expected at least {b} rows (the batch), got shape {tuple(k_cache.shape)}")
    check_shape("rot", rot, (b, s, d // 2))
    check_shape("positions", positions, (b, s))
    check_same_device(**{x_name: x}, rot=rot, positions=positions, k_cache=k_cache, v_cache=v_cache)
    if positions.device.type == "cpu" and positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= length:
            raise ValueError(f"positions: values must lie in [0, {length}) (the cache length), got [{lo}, {hi}]")


def rope_kv_cache(
    qkv: Tensor, rot: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int
) -> Tensor:
    """Rotate the q and k heads of a fused qkv projection, append k and v to a KV cache, return q.

    Args:
        qkv: [B, S, (Hq + 2 Hkv) D] (a fused [wq; wk; wv] projection), float32, bfloat16 or float16, with a
            unit stride in the last dim.
        rot: [B, S, D/2] complex64, cos + i·sin of each token's rotation angles (Meta's interleaved pairs).
        positions: [B, S] int64, the cache slot of each token: row b of the batch writes cache row b.
        k_cache, v_cache: [Bmax, L, Hkv, D] in qkv's dtype, Bmax >= B; written in place.
        n_heads: Hq.
    Returns:
        q [B, S, Hq, D] rotated, contiguous.
    Raises:
        TypeError / ValueError naming the offending argument. Positions outside [0, L) raise on the CPU; on
        the GPU (checked there without a host sync, so CUDA graphs work) such a token writes no cache entry
        and its q is NaN.
    """
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=3)
    check_last_dim_contiguous("qkv", qkv)
    check_cache_args("qkv", qkv, "qkv", qkv.shape[-1], rot, positions, k_cache, v_cache, n_heads)
    rot_pairs = torch.view_as_real(rot.resolve_conj() if rot.is_conj() else rot)
    return rope_kv_cache_op(qkv, rot_pairs, positions, k_cache, v_cache, n_heads)
