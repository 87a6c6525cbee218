"""SwiGLU, silu(gate) * up, with separate or fused gate-up inputs, and its FP8-emitting form.

Custom ops take 2-D row views whose rows may be strided (the halves of a fused [M, 2F] tensor are
views with row stride 2F), so the fused layout is never copied.
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
from llama3_kernels.ops.norm import kernel_rows


def _ref_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return reference.swiglu(gate, up).contiguous()


def _ref_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dg, du = reference.swiglu_backward(dy, gate, up)
    return dg.contiguous(), du.contiguous()


@torch.library.custom_op("llama3_kernels::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up: [M, F] (rows may be strided). Returns silu(gate) * up, [M, F] contiguous."""
    return _ref_fwd(gate, up)


@swiglu_fwd.register_kernel("cuda")
@on_input_device
def _swiglu_fwd_cuda(gate, up):
    if not use_rowwise_kernel("swiglu_fwd", (gate, up)):
        return _ref_fwd(gate, up)
    m, f = gate.shape
    check_shape("up", up, (m, f))
    gate, up = kernel_rows(gate), kernel_rows(up)
    y = torch.empty((m, f), dtype=gate.dtype, device=gate.device)
    kernel("swiglu_fwd")(
        ptr(gate), gate.stride(0), ptr(up), up.stride(0), ptr(y), m, f,
        DTYPE_CODES[gate.dtype], sm_count(gate.device.index), stream(gate),
    )  # fmt: skip
    return y


@swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("llama3_kernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (dgate, dup), each [M, F] contiguous."""
    return _ref_bwd(dy, gate, up)


@swiglu_bwd.register_kernel("cuda")
@on_input_device
def _swiglu_bwd_cuda(dy, gate, up):
    if not use_rowwise_kernel("swiglu_bwd", (gate, up, dy)):
        return _ref_bwd(dy, gate, up)
    m, f = gate.shape
    check_shape("up", up, (m, f))
    check_shape("dy", dy, (m, f))
    dy, gate, up = dy.contiguous(), kernel_rows(gate), kernel_rows(up)
    dg = torch.empty((m, f), dtype=gate.dtype, device=gate.device)
    du = torch.empty((m, f), dtype=up.dtype, device=gate.device)
    kernel("swiglu_bwd")(
        ptr(dy), ptr(gate), gate.stride(0), ptr(up), up.stride(0), ptr(dg), ptr(du), m, f,
        DTYPE_CODES[gate.dtype], sm_count(gate.device.index), stream(gate),
    )  # fmt: skip
    return dg, du


@swiglu_bwd.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return swiglu_bwd(dy.contiguous(), gate, up)


torch.library.register_autograd("llama3_kernels::swiglu_fwd", _swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("llama3_kernels::swiglu_fp8_fwd", mutates_args=())
def swiglu_fp8_fwd(gate: Tensor, up: Tensor, amax_ub: float) -> tuple[Tensor, Tensor]:
    """Returns (q [M, F] e4m3, scale [M] fp32) of silu(gate) * up computed in fp32."""
    return reference.swiglu_fp8(gate, up, amax_ub)


@swiglu_fp8_fwd.register_kernel("cuda")
@on_input_device
def _swiglu_fp8_cuda(gate, up, amax_ub):
    if not use_rowwise_kernel("swiglu_fp8_fwd", (gate, up)):
        return reference.swiglu_fp8(gate, up, amax_ub)
    m, f = gate.shape
    check_shape("up", up, (m, f))
    gate, up = kernel_rows(gate), kernel_rows(up)
    q = torch.empty((m, f), dtype=torch.float8_e4m3fn, device=gate.device)
    scale = torch.empty((m,), dtype=torch.float32, device=gate.device)
    kernel("swiglu_fp8_fwd")(
        ptr(gate), gate.stride(0), ptr(up), up.stride(0), ptr(q), ptr(scale), m, f, float(amax_ub),
        DTYPE_CODES[gate.dtype], sm_count(gate.device.index), stream(gate),
    )  # fmt: skip
    return q, scale


@swiglu_fp8_fwd.register_fake
def _(gate, up, amax_ub):
    return gate.new_empty(gate.shape, dtype=torch.float8_e4m3fn), gate.new_empty((gate.shape[0],), dtype=torch.float32)


def _split(gate: Tensor, up: Tensor | None) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Validate and return 2-D (gate, up) row views plus the output shape."""
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES, min_ndim=1)
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"gate: a fused gate-up tensor needs an even last dim, got shape {tuple(gate.shape)}")
        f = gate.shape[-1] // 2
        g2 = rows_view("gate", gate)
        return g2[:, :f], g2[:, f:], (*gate.shape[:-1], f)
    check_tensor("up", up, dtypes=(gate.dtype,))
    check_shape("up", up, tuple(gate.shape))
    check_same_device(gate=gate, up=up)
    return rows_view("gate", gate), rows_view("up", up), tuple(gate.shape)


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """SwiGLU activation silu(gate) * up, computed in fp32.

    Args:
        gate: [..., F], or the fused [..., 2F] gate-up tensor (gate first) when `up` is None.
        up: [..., F] like gate, or None.
    Returns:
        [..., F] in gate's dtype. Differentiable.
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    g2, u2, shape = _split(gate, up)
    return swiglu_fwd(g2, u2).view(shape)


def swiglu_fp8(gate: Tensor, up: Tensor | None = None, amax_ub: float = 1200.0) -> tuple[Tensor, Tensor]:
    """SwiGLU fused with row-wise e4m3 quantization of its fp32 result.

    Args:
        gate, up: as in `swiglu`.
        amax_ub: upper bound on the row amax used for the scale.
    Returns:
        (q [..., F] float8_e4m3fn, scale [...] fp32).
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    g2, u2, shape = _split(gate, up)
    if not amax_ub > 0:
        raise ValueError(f"amax_ub: expected a positive float, got {amax_ub!r}")
    q, scale = swiglu_fp8_fwd(g2, u2, float(amax_ub))
    return q.view(shape), scale.view(shape[:-1])
