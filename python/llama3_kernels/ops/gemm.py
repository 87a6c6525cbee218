"""FP8 row-wise GEMM: y = (xq · wqᵀ) · x_scale[:, None] · w_scale[None, :] (+ bias), fp32 accumulation.

wq is stored [N, K] (a PyTorch Linear weight), so the GEMM is row-major A times column-major B.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama3_kernels import reference
from llama3_kernels.ops._common import (
    DTYPE_CODES,
    HALF_DTYPES,
    check_same_device,
    check_shape,
    check_tensor,
    kernel,
    on_input_device,
    ptr,
    stream,
    use_cuda_kernel,
)

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.library.custom_op("llama3_kernels::fp8_rowwise_mm_fwd", mutates_args=())
def fp8_rowwise_mm_fwd(
    xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """xq [M, K] e4m3, x_scale [M] fp32, wq [N, K] e4m3, w_scale [N] fp32, bias [N] → [M, N]."""
    return reference.fp8_rowwise_mm(xq, x_scale, wq, w_scale, bias, out_dtype)


@fp8_rowwise_mm_fwd.register_kernel("cuda")
@on_input_device
def _fp8_mm_cuda(xq, x_scale, wq, w_scale, bias, out_dtype):
    m, k = xq.shape
    n = wq.shape[0]
    xq, x_scale, wq, w_scale = xq.contiguous(), x_scale.contiguous(), wq.contiguous(), w_scale.contiguous()
    bias32 = bias.float().contiguous() if bias is not None else None  # the epilogue reads fp32: exact for any dtype
    launchable = (
        use_cuda_kernel("fp8_rowwise_mm", xq, x_scale, wq, w_scale, bias32)
        and out_dtype in HALF_DTYPES
        and k % 16 == 0
        and n % 16 == 0  # the public function checks these; a direct call of the op may not
        and x_scale.dtype == w_scale.dtype == torch.float32
    )
    if not launchable or k == 0:  # fp32 output, K = 0, K or N off 16, or misaligned data: the reference
        return reference.fp8_rowwise_mm(xq, x_scale, wq, w_scale, bias, out_dtype)
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    with torch.cuda.device(xq.device):  # the launcher runs on the current device
        kernel("fp8_rowwise_mm")(
            ptr(xq), ptr(x_scale), ptr(wq), ptr(w_scale), ptr(bias32),
            DTYPE_CODES[torch.float32] if bias32 is not None else -1, ptr(y), m, n, k, DTYPE_CODES[out_dtype],
            stream(xq),
        )  # fmt: skip
    return y


@fp8_rowwise_mm_fwd.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


def fp8_rowwise_mm(
    xq: Tensor,
    x_scale: Tensor,
    wq: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Row-wise scaled FP8 matmul, the Llama 3 FFN inference GEMM.

    Args:
        xq: [..., K] float8_e4m3fn activations, contiguous.
        x_scale: [...] fp32, one scale per activation row.
        wq: [N, K] float8_e4m3fn weight, contiguous (row-major [N, K] = column-major B).
        w_scale: [N] fp32, one scale per output column.
        bias: optional [N] (bf16, fp16 or fp32).
        out_dtype: bfloat16 (default), float16 or float32.
    Returns:
        [..., N] in out_dtype.
    Raises:
        TypeError / ValueError naming the offending argument (K and N must be multiples of 16).
    """
    fp8 = (torch.float8_e4m3fn,)
    check_tensor("xq", xq, dtypes=fp8, min_ndim=1)
    check_tensor("wq", wq, dtypes=fp8, ndim=2)
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,))
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,), ndim=1)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype: expected bfloat16, float16 or float32, got {out_dtype}")
    n, k = wq.shape
    if xq.shape[-1] != k:
        raise ValueError(f"xq: expected last dim K={k} (from wq [N, K]), got shape {tuple(xq.shape)}")
    if k % 16 or n % 16:
        raise ValueError(f"wq: K and N must be multiples of 16, got wq shape {tuple(wq.shape)}")
    check_shape("x_scale", x_scale, tuple(xq.shape[:-1]))
    check_shape("w_scale", w_scale, (n,))
    if bias is not None:
        check_tensor("bias", bias, dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=1)
        check_shape("bias", bias, (n,))
    check_same_device(xq=xq, x_scale=x_scale, wq=wq, w_scale=w_scale, bias=bias)
    for name, t in (("xq", xq), ("wq", wq)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    y = fp8_rowwise_mm_fwd(
        xq.reshape(-1, k), x_scale.reshape(-1).contiguous(), wq, w_scale.contiguous(),
        bias.contiguous() if bias is not None else None, out_dtype,
    )  # fmt: skip
    return y.view(*xq.shape[:-1], n)
