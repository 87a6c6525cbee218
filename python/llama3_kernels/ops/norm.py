"""RMSNorm, optionally fused with the residual add and with row-wise FP8 quantization.

Layers: custom ops on 2-D row views (CPU = reference, CUDA = `_C` launcher when built), fake impls,
autograd through `rms_norm_bwd`, and the documented public functions `rms_norm` / `rms_norm_fp8`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama3_kernels import reference
from llama3_kernels.ops._common import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    check_same_device,
    check_shape,
    check_tensor,
    kernel,
    on_input_device,
    ptr,
    rows_view,
    sm_count,
    stream,
    use_rowwise_kernel,
)

_EMPTY = (0,)
_DW_PARTIAL_ROWS_PER_SM = 16  # rms_norm_bwd scratch: at most this many fp32 partial dW rows per SM


def kernel_rows(t: Tensor | None) -> Tensor | None:
    """A [M, N] input as the norm-family launchers read it: unit column stride, row stride >= N.

    Row views (strided rows, the halves of a fused tensor) pass as they are; an expanded (row stride 0) or
    otherwise overlapping view is copied, since the launchers reject a row stride below N.
    """
    if t is None:
        return None
    m, n = t.shape
    ok = (n <= 1 or t.stride(1) == 1) and (m <= 1 or t.stride(0) >= n)
    return t if ok else t.contiguous()


def _ref_fwd(x, weight, residual, eps):
    y, h, rstd = reference.rms_norm(x, weight, eps, residual)
    return y, (x.new_empty(_EMPTY) if h is None else h), rstd


def _ref_fp8_fwd(x, weight, residual, eps, amax_ub):
    q, scale, h = reference.rms_norm_fp8(x, weight, eps, residual, amax_ub)
    return q, scale, (x.new_empty(_EMPTY) if h is None else h)


def _check_kernel_shapes(x: Tensor, weight: Tensor, **like_x: Tensor | None) -> None:
    """The launchers trust their sizes: a short weight or residual would be read out of bounds."""
    check_shape("weight", weight, (x.shape[1],))
    for name, t in like_x.items():
        if t is not None:
            check_shape(name, t, tuple(x.shape))


# ------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("llama3_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual: [M, N]. Returns y [M, N], h [M, N] (empty without residual), rstd [M] fp32."""
    return _ref_fwd(x, weight, residual, eps)


@rms_norm_fwd.register_kernel("cuda")
@on_input_device
def _rms_norm_fwd_cuda(x, weight, residual, eps):
    if not use_rowwise_kernel("rms_norm_fwd", (x, residual), (weight,)):
        return _ref_fwd(x, weight, residual, eps)
    m, n = x.shape
    _check_kernel_shapes(x, weight, residual=residual)
    x, residual, weight = kernel_rows(x), kernel_rows(residual), weight.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(_EMPTY)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    kernel("rms_norm_fwd")(
        ptr(x), x.stride(0), ptr(residual), residual.stride(0) if residual is not None else 0,
        ptr(weight), DTYPE_CODES[weight.dtype], ptr(y), ptr(h) if residual is not None else 0, ptr(rstd),
        m, n, float(eps), DTYPE_CODES[x.dtype], sm_count(x.device.index), stream(x),
    )  # fmt: skip
    return y, h, rstd


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    h = torch.empty_like(x) if residual is not None else x.new_empty(_EMPTY)
    return torch.empty_like(x), h, x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("llama3_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh: Tensor | None) -> tuple[Tensor, Tensor]:
    """Returns (dx [M, N] in h.dtype, dweight [N] in weight.dtype); dh adds the residual-stream gradient."""
    return reference.rms_norm_backward(dy, h, weight, rstd, dh)


@rms_norm_bwd.register_kernel("cuda")
@on_input_device
def _rms_norm_bwd_cuda(dy, h, weight, rstd, dh):
    if not use_rowwise_kernel("rms_norm_bwd", (h, dy, dh), (weight,)):
        return reference.rms_norm_backward(dy, h, weight, rstd, dh)
    m, n = h.shape
    _check_kernel_shapes(h, weight, dy=dy, dh=dh)
    check_shape("rstd", rstd, (m,))
    dy, h, weight, rstd = dy.contiguous(), h.contiguous(), weight.contiguous(), rstd.float().contiguous()
    dh = dh.contiguous() if dh is not None else None
    dx = torch.empty((m, n), dtype=h.dtype, device=h.device)
    dw = torch.empty((n,), dtype=weight.dtype, device=h.device)
    # fp32 dW partial rows, one per resident row group: bounded by the SM count, never by M. The kernel uses
    # at most `rows` of them (fewer CTAs if that bound bites), and only those are read back. A grid of
    # ceil(m / rpc) CTAs of rpc <= 4 row groups uses at most m + 3 rows: small batches get a small buffer.
    num_sms = sm_count(h.device.index)
    rows = min(_DW_PARTIAL_ROWS_PER_SM * num_sms, m + 3)
    partial = torch.empty((rows, n), dtype=torch.float32, device=h.device)
    kernel("rms_norm_bwd")(
        ptr(dy), ptr(h), ptr(weight), DTYPE_CODES[weight.dtype], ptr(rstd), ptr(dh), ptr(dx), ptr(dw),
        ptr(partial), rows, m, n, DTYPE_CODES[h.dtype], num_sms, stream(h),
    )  # fmt: skip
    return dx, dw


@rms_norm_bwd.register_fake
def _(dy, h, weight, rstd, dh):
    return torch.empty_like(h), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, _ = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _rms_norm_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dh = dh if ctx.has_residual and dh is not None and dh.numel() else None
    dx, dw = rms_norm_bwd(dy.contiguous(), h, weight, rstd, dh)
    return dx, dw, (dx if ctx.has_residual else None), None


torch.library.register_autograd("llama3_kernels::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup)


@torch.library.custom_op("llama3_kernels::rms_norm_fp8_fwd", mutates_args=())
def rms_norm_fp8_fwd(
    x: Tensor, weight: Tensor, residual: Tensor | None, eps: float, amax_ub: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (q [M, N] e4m3, scale [M] fp32, h [M, N] or empty)."""
    return _ref_fp8_fwd(x, weight, residual, eps, amax_ub)


@rms_norm_fp8_fwd.register_kernel("cuda")
@on_input_device
def _rms_norm_fp8_cuda(x, weight, residual, eps, amax_ub):
    if not use_rowwise_kernel("rms_norm_fp8_fwd", (x, residual), (weight,)):
        return _ref_fp8_fwd(x, weight, residual, eps, amax_ub)
    m, n = x.shape
    _check_kernel_shapes(x, weight, residual=residual)
    x, residual, weight = kernel_rows(x), kernel_rows(residual), weight.contiguous()
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(_EMPTY)
    kernel("rms_norm_fp8_fwd")(
        ptr(x), x.stride(0), ptr(residual), residual.stride(0) if residual is not None else 0,
        ptr(weight), DTYPE_CODES[weight.dtype], ptr(q), ptr(scale), ptr(h) if residual is not None else 0,
        m, n, float(eps), float(amax_ub), DTYPE_CODES[x.dtype], sm_count(x.device.index), stream(x),
    )  # fmt: skip
    return q, scale, h


@rms_norm_fp8_fwd.register_fake
def _(x, weight, residual, eps, amax_ub):
    h = torch.empty_like(x) if residual is not None else x.new_empty(_EMPTY)
    m = x.shape[0]
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((m,), dtype=torch.float32), h


# ------------------------------------------------------------------------------------- public API
def _check(x, weight, residual, eps):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1)
    check_shape("weight", weight, (x.shape[-1],))
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,))
        check_shape("residual", residual, tuple(x.shape))
    check_same_device(x=x, weight=weight, residual=residual)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if x.shape[-1] == 0:
        raise ValueError(f"x: expected a non-empty last dim, got shape {tuple(x.shape)}")


def rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-5, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Root-mean-square normalization over the last dim, y = h / sqrt(mean(h²) + eps) * weight.

    Args:
        x: [..., N] fp32, fp16 or bf16; the last dim must have unit stride.
        weight: [N], any float dtype (fp32 master weights are fine).
        eps: added to the mean square.
        residual: optional [..., N] like x; then h = x + residual (rounded to x.dtype).
    Returns:
        y like x; with a residual, (y, h) where h is the updated residual stream.
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    _check(x, weight, residual, eps)
    shape = x.shape
    x2 = rows_view("x", x)
    r2 = rows_view("residual", residual) if residual is not None else None
    y, h, _ = rms_norm_fwd(x2, weight, r2, float(eps))
    if residual is None:
        return y.view(shape)
    return y.view(shape), h.view(shape)


def rms_norm_fp8(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    amax_ub: float = 1200.0,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """RMSNorm fused with row-wise e4m3 quantization (the row is read once).

    Args:
        x, weight, eps, residual: as in `rms_norm`.
        amax_ub: upper bound on the row amax used for the scale (Llama 3 uses 1200).
    Returns:
        (q [..., N] float8_e4m3fn, scale [...] fp32), plus h when a residual is given.
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    _check(x, weight, residual, eps)
    if not amax_ub > 0:
        raise ValueError(f"amax_ub: expected a positive float, got {amax_ub!r}")
    shape = x.shape
    r2 = rows_view("residual", residual) if residual is not None else None
    q, scale, h = rms_norm_fp8_fwd(rows_view("x", x), weight, r2, float(eps), float(amax_ub))
    out = (q.view(shape), scale.view(shape[:-1]))
    return out if residual is None else (*out, h.view(shape))
