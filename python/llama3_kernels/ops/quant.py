"""Row-wise FP8 (e4m3) quantization with the Llama 3 scale rule (amax bounded at `amax_ub`)."""

from __future__ import annotations

import torch
from torch import Tensor

from llama3_kernels import reference
from llama3_kernels.ops._common import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    check_tensor,
    kernel,
    on_input_device,
    ptr,
    rows_view,
    sm_count,
    stream,
    use_cuda_kernel,
)
from llama3_kernels.ops.norm import kernel_rows


@torch.library.custom_op("llama3_kernels::quantize_fp8_rowwise_fwd", mutates_args=())
def quantize_fp8_rowwise_fwd(x: Tensor, amax_ub: float) -> tuple[Tensor, Tensor]:
    """x: [M, N]. Returns (q [M, N] e4m3, scale [M] fp32)."""
    return reference.quantize_fp8_rowwise(x, amax_ub)


@quantize_fp8_rowwise_fwd.register_kernel("cuda")
@on_input_device
def _quantize_cuda(x, amax_ub):
    if not use_cuda_kernel("quantize_fp8_rowwise", x, align=1):
        return reference.quantize_fp8_rowwise(x, amax_ub)
    m, n = x.shape
    x = kernel_rows(x)
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    kernel("quantize_fp8_rowwise")(
        ptr(x), x.stride(0), ptr(q), ptr(scale), m, n, float(amax_ub),
        DTYPE_CODES[x.dtype], sm_count(x.device.index), stream(x),
    )  # fmt: skip
    return q, scale


@quantize_fp8_rowwise_fwd.register_fake
def _(x, amax_ub):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0],), dtype=torch.float32)


def quantize_fp8_rowwise(x: Tensor, amax_ub: float = 1200.0) -> tuple[Tensor, Tensor]:
    """Quantize each row of x to float8_e4m3fn with its own fp32 scale.

    scale = max(min(amax, amax_ub) / 448, 1 / (448 * 512)); q = clamp(x / scale, ±448). A zero row gives
    zeros and the minimum scale, never NaN.

    Args:
        x: [..., N] fp32, fp16 or bf16 with a unit stride in the last dim.
        amax_ub: upper bound on the row amax (Llama 3: 1200).
    Returns:
        (q [..., N] float8_e4m3fn, scale [...] fp32), with x ≈ q * scale[..., None].
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if not amax_ub > 0:
        raise ValueError(f"amax_ub: expected a positive float, got {amax_ub!r}")
    q, scale = quantize_fp8_rowwise_fwd(rows_view("x", x), float(amax_ub))
    return q.view(x.shape), scale.view(x.shape[:-1])
