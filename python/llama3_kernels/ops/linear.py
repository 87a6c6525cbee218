"""Linear layers for decode (a few token rows) with the op before them fused in: csrc/gemm/decode_gemv.cu.

    decode_linear(x, w)                         = x @ wᵀ
    rms_norm_linear(x, g, eps, w, residual)     = rms_norm(x (+ residual)) @ wᵀ, and the new residual stream
    swiglu_linear(gate_up, w)                   = swiglu(gate_up) @ wᵀ
    rms_norm_qkv_rope_cache(x, g, eps, wqkv, rot, positions, k_cache, v_cache, n_heads, residual)
                                                = rope_kv_cache(rms_norm_linear(x, g, eps, wqkv, residual)), the
                                                  decode step's first kernel of a layer: no qkv tensor is written

Each equals the composition of this library's ops with F.linear (the norm or SwiGLU output rounded to the dtype
before the product), which is also what runs whenever the kernel does not apply: more than 4 rows, gradients
needed, a CPU tensor, mismatched dtypes, or an input too long to stage in shared memory. L3K_DECODE_GEMV=0 turns
the kernel off (the unfused ops everywhere), e.g. while it is checked on a new device.

The kernel is a programmatic dependent launch (csrc/common.h; L3K_PDL=0 turns that off): its first weight loads
may run before the previous kernel on the stream has finished. So the weight must not be the output of the op
issued just before (a model's parameters never are); the activations may be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llama3_kernels.ops._common import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_same_device,
    check_tensor,
    kernel,
    on_input_device,
    ptr,
    rows_view,
    sm_count,
    stream,
    switched_off,
    use_cuda_kernel,
)
from llama3_kernels.ops.attention import cache_layout_ok
from llama3_kernels.ops.norm import rms_norm
from llama3_kernels.ops.rope import _reference as _rope_kv_cache_reference
from llama3_kernels.ops.rope import check_cache_args, rope_kv_cache, rope_kv_cache_op
from llama3_kernels.ops.swiglu import swiglu

NONE, RMS_NORM, SWIGLU = 0, 1, 2  # prologue codes of the launcher
MAX_ROWS = 4
MAX_STAGED_BYTES = 160 * 1024  # a (M x K, 16-bit) is staged in shared memory


def _check_op(x: Tensor, w: Tensor, residual: Tensor | None, norm_weight: Tensor | None, prologue: int) -> None:
    if prologue not in (NONE, RMS_NORM, SWIGLU):
        raise ValueError(f"prologue: expected 0 (none), 1 (rms_norm) or 2 (swiglu), got {prologue}")
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x: expected x [M, Kx] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    k = w.shape[1]
    width = 2 * k if prologue == SWIGLU else k
    if x.shape[1] != width:
        raise ValueError(f"x: expected {width} columns for w's K = {k} and prologue {prologue}, got {x.shape[1]}")
    if residual is not None and (prologue != RMS_NORM or residual.shape != (x.shape[0], k)):
        raise ValueError(f"residual: only the rms_norm prologue takes one, shaped [{x.shape[0]}, {k}]")
    if prologue == RMS_NORM and (norm_weight is None or norm_weight.shape != (k,)):
        raise ValueError(f"norm_weight: the rms_norm prologue needs a [{k}] weight")


def _unfused(x: Tensor, w: Tensor, residual: Tensor | None, norm_weight: Tensor | None, eps: float, prologue: int):
    """(y, h) as separate ops: this library's rms_norm / swiglu (their references on a CPU, their kernels on a GPU
    where those apply), rounded to x's dtype, then the product (in fp32 only when w's dtype differs)."""
    k = w.shape[1]
    h = x.new_empty(0)
    if prologue == RMS_NORM and residual is None:
        a = rms_norm(x, norm_weight, eps)
    elif prologue == RMS_NORM:
        a, h = rms_norm(x, norm_weight, eps, residual)
        h = h.contiguous()
    elif prologue == SWIGLU:
        a = swiglu(x[:, :k], x[:, k : 2 * k])
    else:
        a = x
    if w.dtype == a.dtype:  # no fp32 copy of the weight (the LM head's would be large)
        return F.linear(a, w), h
    return (a.float() @ w.float().t()).to(x.dtype), h


@torch.library.custom_op("llama3_kernels::decode_gemv", mutates_args=())
def decode_gemv(
    x: Tensor, w: Tensor, residual: Tensor | None, norm_weight: Tensor | None, eps: float, prologue: int
) -> tuple[Tensor, Tensor]:
    """x [M, Kx] rows (unit last stride; the row stride may be larger), w [N, K]. Returns (y [M, N], h [M, K] for
    rms_norm with a residual, else an empty tensor). prologue: 0 none (Kx = K), 1 rms_norm (x + residual, weight
    norm_weight [K]), 2 swiglu (Kx = 2K: gate in columns 0..K-1, up in K..2K-1)."""
    _check_op(x, w, residual, norm_weight, prologue)
    return _unfused(x, w, residual, norm_weight, eps, prologue)


def _kernel_applies(x, w, residual, norm_weight, prologue) -> bool:
    (m, width), (n, k) = x.shape, w.shape
    return (
        not switched_off("L3K_DECODE_GEMV")
        and 1 <= m <= MAX_ROWS
        and n >= 1
        and k >= 8
        and x.dtype in HALF_DTYPES
        and all(t is None or t.dtype == x.dtype for t in (w, residual, norm_weight))
        and k % 8 == 0
        and m * k * 2 <= MAX_STAGED_BYTES
        and x.stride(1) == 1
        and x.stride(0) % 8 == 0
        and x.stride(0) >= width
        and w.is_contiguous()
        and (residual is None or residual.is_contiguous())
        and (norm_weight is None or norm_weight.is_contiguous())
        and use_cuda_kernel("decode_gemv", x, w, residual, norm_weight)
    )


@decode_gemv.register_kernel("cuda")
@on_input_device
def _decode_gemv_cuda(x, w, residual, norm_weight, eps, prologue):
    _check_op(x, w, residual, norm_weight, prologue)
    if not _kernel_applies(x, w, residual, norm_weight, prologue):
        return _unfused(x, w, residual, norm_weight, eps, prologue)
    m, (n, k) = x.shape[0], w.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, k) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    kernel("decode_gemv")(
        ptr(x), x.stride(0), ptr(residual), ptr(norm_weight), ptr(h) if residual is not None else 0, float(eps),
        int(prologue), ptr(w), ptr(y), m, n, k, DTYPE_CODES[x.dtype], sm_count(x.device.index), stream(x),
    )  # fmt: skip
    return y, h


@decode_gemv.register_fake
def _(x, w, residual, norm_weight, eps, prologue):
    h_shape = (x.shape[0], w.shape[1]) if prologue == RMS_NORM and residual is not None else (0,)
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty(h_shape)


def _fused(*tensors: Tensor | None) -> bool:
    """The custom op (no autograd) serves few-row calls that need no gradient."""
    rows = tensors[0].numel() // max(tensors[0].shape[-1], 1)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return 1 <= rows <= MAX_ROWS and not needs_grad


def _check(name: str, x: Tensor, w: Tensor, width: int, **others: Tensor | None) -> None:
    """x [..., width] and w [N, K] of one float dtype on one device; `others` (norm_weight, residual) there too."""
    check_tensor(name, x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", w, dtypes=(x.dtype,), ndim=2)
    check_same_device(**{name: x, "weight": w}, **others)
    if x.shape[-1] != width:
        raise ValueError(f"{name}: expected last dim {width} (from weight's K = {w.shape[1]}), got {x.shape[-1]}")


def _check_norm_input(x: Tensor, norm_weight: Tensor, weight: Tensor, residual: Tensor | None) -> None:
    """rms_norm_linear's x, norm_weight [K], weight [N, K] and residual (like x)."""
    k = weight.shape[1] if weight.dim() == 2 else -1
    _check("x", x, weight, k, norm_weight=norm_weight, residual=residual)
    check_tensor("norm_weight", norm_weight, dtypes=FLOAT_DTYPES)
    if norm_weight.shape != (k,):
        raise ValueError(f"norm_weight: expected shape ({k},) (weight's K), got {tuple(norm_weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual: expected shape {tuple(x.shape)} like x, got {tuple(residual.shape)}")


def decode_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T for x [..., K] and weight [N, K] (no bias): the decode GEMV for up to 4 rows, else F.linear.

    Raises:
        TypeError / ValueError naming the offending argument.
    """
    _check("x", x, weight, weight.shape[1] if weight.dim() == 2 else -1)
    if not _fused(x, weight):
        return F.linear(x, weight)
    y, _ = decode_gemv(rows_view("x", x), weight, None, None, 0.0, NONE)
    return y.view(*x.shape[:-1], weight.shape[0])


def rms_norm_linear(
    x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """rms_norm(x (+ residual), norm_weight, eps) @ weight.T, fused for up to 4 rows.

    Returns:
        (y [..., N], h): h is the updated residual stream x + residual, or x itself without a residual.
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    _check_norm_input(x, norm_weight, weight, residual)
    if not _fused(x, norm_weight, weight, residual):
        if residual is None:
            return F.linear(rms_norm(x, norm_weight, eps), weight), x
        y, h = rms_norm(x, norm_weight, eps, residual)
        return F.linear(y, weight), h
    r2 = rows_view("residual", residual).contiguous() if residual is not None else None
    y, h = decode_gemv(rows_view("x", x), weight, r2, norm_weight, float(eps), RMS_NORM)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y, (h.view(x.shape) if residual is not None else x)


def swiglu_linear(gate_up: Tensor, weight: Tensor) -> Tensor:
    """swiglu(gate_up) @ weight.T with gate_up [..., 2F] (gate first) and weight [N, F], fused for up to 4 rows.

    Raises:
        TypeError / ValueError naming the offending argument.
    """
    _check("gate_up", gate_up, weight, 2 * weight.shape[1] if weight.dim() == 2 else -1)
    if not _fused(gate_up, weight):
        return F.linear(swiglu(gate_up), weight)
    y, _ = decode_gemv(rows_view("gate_up", gate_up), weight, None, None, 0.0, SWIGLU)
    return y.view(*gate_up.shape[:-1], weight.shape[0])


def _check_qkv_op(x, w, residual, norm_weight, rot_pairs, positions, k_cache, v_cache, n_heads) -> None:
    """The custom op's own shape checks (it may be called directly, not only through rms_norm_qkv_rope_cache):
    a wrong count would make the kernel read past w or write past q."""
    _check_op(x, w, residual, norm_weight, RMS_NORM)
    if positions.dtype != torch.int64 or positions.dim() != 2 or positions.numel() != x.shape[0]:
        raise ValueError(f"positions: expected int64 [B, S] with B·S = {x.shape[0]} (x's rows), got "
                         f"{positions.dtype} {tuple(positions.shape)}")  # fmt: skip
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.dtype != x.dtype or v_cache.dtype != x.dtype:
        raise ValueError(f"k_cache: expected caches [Bmax, L, Hkv, D] in x's dtype, got {tuple(k_cache.shape)} "
                         f"{k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")  # fmt: skip
    b, s = positions.shape
    bmax, _, hkv, d = k_cache.shape
    if d % 2 or w.shape[0] != (n_heads + 2 * hkv) * d or bmax < b:
        raise ValueError(f"w: expected (n_heads + 2 Hkv) · D = {(n_heads + 2 * hkv) * d} rows for caches "
                         f"{tuple(k_cache.shape)} and batch {b}, got {tuple(w.shape)}")  # fmt: skip
    if rot_pairs.dtype != torch.float32 or rot_pairs.shape != (b, s, d // 2, 2):
        raise ValueError(f"rot_pairs: expected float32 {(b, s, d // 2, 2)}, got {rot_pairs.dtype} "
                         f"{tuple(rot_pairs.shape)}")  # fmt: skip


@torch.library.custom_op("llama3_kernels::decode_qkv_rope_cache", mutates_args=("k_cache", "v_cache"))
def decode_qkv_rope_cache(
    x: Tensor,
    w: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    rot_pairs: Tensor,
    positions: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
) -> tuple[Tensor, Tensor]:
    """x [M, K] rows (M = B·S tokens), w [(Hq + 2 Hkv) D, K], rot_pairs [B, S, D/2, 2] fp32, positions [B, S] int64,
    caches [Bmax, L, Hkv, D] (written) → (q [B, S, Hq, D], h [M, K] with a residual, else empty)."""
    _check_qkv_op(x, w, residual, norm_weight, rot_pairs, positions, k_cache, v_cache, n_heads)
    y, h = _unfused(x, w, residual, norm_weight, eps, RMS_NORM)
    qkv = y.view(*positions.shape, y.shape[-1])
    return _rope_kv_cache_reference(qkv, rot_pairs, positions, k_cache, v_cache, n_heads), h


@decode_qkv_rope_cache.register_kernel("cuda")
@on_input_device
def _decode_qkv_rope_cache_cuda(x, w, residual, norm_weight, eps, rot_pairs, positions, k_cache, v_cache, n_heads):
    _check_qkv_op(x, w, residual, norm_weight, rot_pairs, positions, k_cache, v_cache, n_heads)
    (m, k), (b, s) = x.shape, positions.shape
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    if not (
        _kernel_applies(x, w, residual, norm_weight, RMS_NORM)
        and cache_layout_ok(k_cache)
        and cache_layout_ok(v_cache)
        and use_cuda_kernel("decode_gemv_rope_cache", x, k_cache, v_cache)
    ):  # the two ops it fuses, each on its own kernel where that applies
        y, h = _decode_gemv_cuda(x, w, residual, norm_weight, eps, RMS_NORM)
        return rope_kv_cache_op(y.view(b, s, -1), rot_pairs, positions, k_cache, v_cache, n_heads), h
    rot_pairs, positions = rot_pairs.contiguous(), positions.contiguous()
    q = torch.empty((b, s, n_heads, d), dtype=x.dtype, device=x.device)
    h = torch.empty((m, k) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    kernel("decode_gemv_rope_cache")(
        ptr(x), x.stride(0), ptr(residual), ptr(norm_weight), ptr(h) if residual is not None else 0, float(eps),
        ptr(w), m, k, ptr(rot_pairs), ptr(positions), ptr(q), ptr(k_cache), ptr(v_cache), s, n_heads, hkv, d,
        k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        DTYPE_CODES[x.dtype], sm_count(x.device.index), stream(x),
    )  # fmt: skip
    return q, h


@decode_qkv_rope_cache.register_fake
def _(x, w, residual, norm_weight, eps, rot_pairs, positions, k_cache, v_cache, n_heads):
    h_shape = tuple(x.shape) if residual is not None else (0,)
    return x.new_empty((*positions.shape, n_heads, k_cache.shape[3])), x.new_empty(h_shape)


def rms_norm_qkv_rope_cache(
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    wqkv: Tensor,
    rot: Tensor,
    positions: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The attention input of a decode step: rms_norm, the fused [wq; wk; wv] projection, RoPE on q and k, and k and
    v appended to the KV cache, in one kernel for up to 4 tokens (no qkv tensor is written). Same values as
    `rms_norm_linear` followed by `rope_kv_cache` (bit for bit on the GPU), which is what runs otherwise.

    Args:
        x: [B, S, K] (with `residual`: the branch output not yet added to the stream).
        norm_weight, eps: the attention norm's.
        wqkv: [(n_heads + 2 Hkv) D, K], the stacked wq; wk; wv.
        rot, positions, k_cache, v_cache, n_heads: as `rope_kv_cache`.
        residual: [B, S, K] or None.
    Returns:
        (q [B, S, Hq, D] rotated, h): h is the updated residual stream x + residual, or x without a residual.
    Raises:
        TypeError / ValueError naming the offending argument (on the GPU, positions outside [0, L) give NaN q and
        no cache write, as `rope_kv_cache`).
    """
    if isinstance(x, Tensor) and x.dim() != 3:
        raise ValueError(f"x: expected [B, S, K], got shape {tuple(x.shape)}")
    _check_norm_input(x, norm_weight, wqkv, residual)
    check_cache_args("x", x, "wqkv", wqkv.shape[0], rot, positions, k_cache, v_cache, n_heads)
    if not _fused(x, norm_weight, wqkv, residual):
        qkv, h = rms_norm_linear(x, norm_weight, eps, wqkv, residual)
        return rope_kv_cache(qkv, rot, positions, k_cache, v_cache, n_heads), h
    r2 = rows_view("residual", residual).contiguous() if residual is not None else None
    rot_pairs = torch.view_as_real(rot.resolve_conj() if rot.is_conj() else rot)
    q, h = decode_qkv_rope_cache(
        rows_view("x", x), wqkv, r2, norm_weight, float(eps), rot_pairs, positions, k_cache, v_cache, n_heads
    )
    return q, (h.view(x.shape) if residual is not None else x)
