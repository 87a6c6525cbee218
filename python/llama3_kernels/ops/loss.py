"""Cross-entropy over the vocabulary, computed in fp32 straight from 16-bit logits.

`F.cross_entropy(logits.float(), ...)`, what a Llama training step usually runs, writes an fp32 copy of the
[tokens, 128256] logits and keeps fp32 log-probabilities for the backward: about 40 GB of traffic a step for 8192
tokens. The kernels read the 16-bit logits once forward (the row's lse and loss) and once backward (writing
dlogits), and save only the logits and an fp32 lse per row. L3K_CROSS_ENTROPY=0 turns them off (the reference runs),
e.g. while they are checked on a new device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama3_kernels import reference
from llama3_kernels.ops._common import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    kernel,
    on_input_device,
    ptr,
    rows_view,
    sm_count,
    stream,
    switched_off,
    use_rowwise_kernel,
)

REDUCTIONS = ("mean", "sum", "none")


def _targets_ok(targets: Tensor) -> bool:
    """What the kernels read: packed int64 targets (anything else takes the reference); and the kernels on."""
    return targets.dtype == torch.int64 and targets.is_contiguous() and not switched_off("L3K_CROSS_ENTROPY")


@torch.library.custom_op("llama3_kernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """logits [M, V] (rows may be strided), targets [M] int64. Returns (loss [M], lse [M]), both fp32."""
    return reference.cross_entropy(logits, targets, ignore_index)


@cross_entropy_fwd.register_kernel("cuda")
@on_input_device
def _cross_entropy_fwd_cuda(logits, targets, ignore_index):
    if not (_targets_ok(targets) and use_rowwise_kernel("cross_entropy_fwd", (logits,), (targets,))):
        return reference.cross_entropy(logits, targets, ignore_index)
    m, v = logits.shape
    loss = torch.empty((m,), dtype=torch.float32, device=logits.device)
    lse = torch.empty((m,), dtype=torch.float32, device=logits.device)
    kernel("cross_entropy_fwd")(
        ptr(logits), logits.stride(0), ptr(targets), ptr(loss), ptr(lse), m, v, ignore_index,
        DTYPE_CODES[logits.dtype], sm_count(logits.device.index), stream(logits),
    )  # fmt: skip
    return loss, lse


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32), logits.new_empty(
        (logits.shape[0],), dtype=torch.float32
    )


@torch.library.custom_op("llama3_kernels::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(grad: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, ignore_index: int) -> Tensor:
    """grad [M] fp32 (of the per-row loss). Returns dlogits [M, V] contiguous, in the logits' dtype."""
    return reference.cross_entropy_backward(grad, logits, targets, lse, ignore_index)


@cross_entropy_bwd.register_kernel("cuda")
@on_input_device
def _cross_entropy_bwd_cuda(grad, logits, targets, lse, ignore_index):
    ok = _targets_ok(targets) and grad.dtype == torch.float32 and grad.is_contiguous() and lse.is_contiguous()
    if not (ok and use_rowwise_kernel("cross_entropy_bwd", (logits,), (grad, targets, lse))):
        return reference.cross_entropy_backward(grad, logits, targets, lse, ignore_index)
    m, v = logits.shape
    dlogits = torch.empty((m, v), dtype=logits.dtype, device=logits.device)
    kernel("cross_entropy_bwd")(
        ptr(grad), ptr(logits), logits.stride(0), ptr(targets), ptr(lse), ptr(dlogits), m, v, ignore_index,
        DTYPE_CODES[logits.dtype], sm_count(logits.device.index), stream(logits),
    )  # fmt: skip
    return dlogits


@cross_entropy_bwd.register_fake
def _(grad, logits, targets, lse, ignore_index):
    return logits.new_empty(logits.shape)


def _ce_setup(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1])


def _ce_backward(ctx, dloss, _dlse):
    logits, targets, lse = ctx.saved_tensors
    return cross_entropy_bwd(dloss.float().contiguous(), logits, targets, lse, ctx.ignore_index), None, None


torch.library.register_autograd("llama3_kernels::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits against class indices, in fp32 without an fp32 copy of the logits.

    The values of `F.cross_entropy(logits.float(), targets, ignore_index=..., reduction=...)`.

    Args:
        logits: [..., V] float32, float16 or bfloat16 (the last dim contiguous).
        targets: [...] integer class indices; `ignore_index` marks positions that add nothing.
        reduction: "mean" (over the positions not ignored), "sum", or "none" ([...] per position, 0 where ignored).
    Returns:
        fp32: a scalar, or [...] for "none". Differentiable with respect to logits (the gradient has their dtype).
        A target outside [0, V) that is not `ignore_index` gives NaN at its position (and in a reduction); on CPU
        tensors in eager mode it raises instead (a check on GPU tensors would wait for the device).
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_ndim=1)
    if (
        not isinstance(targets, Tensor)
        or targets.dtype == torch.bool
        or targets.dtype.is_floating_point
        or targets.dtype.is_complex
    ):
        raise TypeError(f"targets: expected an integer torch.Tensor, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (logits without the class dim), "
                         f"got {tuple(targets.shape)}")  # fmt: skip
    check_same_device(logits=logits, targets=targets)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    n_classes = logits.shape[-1]
    if n_classes == 0:
        raise ValueError(f"logits: expected at least one class, got shape {tuple(logits.shape)}")
    t = targets.reshape(-1).long().contiguous()
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
        if bad.any():
            raise ValueError(f"targets: {int(t[bad][0])} is outside [0, {n_classes}) and is not ignore_index")
    loss, _ = cross_entropy_fwd(rows_view("logits", logits), t, int(ignore_index))
    if reduction == "none":
        return loss.view(targets.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (t != ignore_index).sum()  # no host sync; 0 / 0 = NaN when every position is ignored
