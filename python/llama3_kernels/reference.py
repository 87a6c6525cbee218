"""fp32 PyTorch references: the specification of every op in llama3_kernels.

Each function computes in fp32 and casts once at the end, so a kernel that matches it within its own
rounding is correct. The CPU implementation of every custom op is the function here, and the CUDA
implementation falls back to it where no compiled kernel exists.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # keeps zero and tiny rows finite
FP8_DTYPE = torch.float8_e4m3fn


# --------------------------------------------------------------------------------------------- norms
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """y = h / rms(h) * weight with h = x (+ residual, rounded to x.dtype). Returns (y, h or None, rstd)."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    y = (hf * rstd.unsqueeze(-1) * weight.float()).to(x.dtype)
    return y, (None if residual is None else h), rstd


def rms_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of rms_norm: (dx, dweight). `dh` is the gradient flowing into the returned residual h."""
    hf, g = h.float(), dy.float() * weight.float()
    xhat = hf * rstd.unsqueeze(-1)
    dx = rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.float()
    dw = (dy.float() * xhat).reshape(-1, h.shape[-1]).sum(0)
    return dx.to(h.dtype), dw.to(weight.dtype)


# ------------------------------------------------------------------------------------------- swiglu
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, cast to gate.dtype."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of swiglu."""
    g, u, d = gate.float(), up.float(), dy.float()
    sig = torch.sigmoid(g)
    dgate = d * u * sig * (1.0 + g * (1.0 - sig))
    dup = d * g * sig
    return dgate.to(gate.dtype), dup.to(up.dtype)


# ---------------------------------------------------------------------------------------------- fp8
def fp8_scale(amax: torch.Tensor, amax_ub: float) -> torch.Tensor:
    """Row scale from a row amax: max(min(amax, ub) / 448, 1 / (448 * 512)), fp32."""
    return torch.clamp(amax.float().clamp(max=amax_ub) / FP8_MAX, min=FP8_MIN_SCALE)


def quantize_fp8_rowwise(x: torch.Tensor, amax_ub: float = 1200.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization: returns (q, scale) with x ≈ q * scale[..., None]."""
    xf = x.float()
    scale = fp8_scale(xf.abs().amax(-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1]), amax_ub)
    q = (xf * (1.0 / scale).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    amax_ub: float = 1200.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RMSNorm, then row-wise fp8 quantization of the fp32 result (never rounded to 16 bits)."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    q, scale = quantize_fp8_rowwise(y, amax_ub)
    return q, scale, (None if residual is None else h)


def swiglu_fp8(gate: torch.Tensor, up: torch.Tensor, amax_ub: float = 1200.0):
    """silu(gate) * up in fp32, quantized row-wise to e4m3."""
    g = gate.float()
    return quantize_fp8_rowwise(g * torch.sigmoid(g) * up.float(), amax_ub)


def fp8_rowwise_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y = (xq @ wq.T) * x_scale[:, None] * w_scale[None, :] (+ bias), fp32 accumulation; wq is [N, K]."""
    acc = xq.float() @ wq.float().t()
    y = acc * x_scale.float().unsqueeze(-1) * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# -------------------------------------------------------------------------------------------- loss
def _labels(
    targets: torch.Tensor, n_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid, bad, safe index): valid = not ignored, bad = valid but outside [0, n_classes)."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= n_classes))
    return valid, bad, torch.where(valid & ~bad, targets, 0)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy in fp32 of logits [M, V] against targets [M]: (loss, lse), loss = lse - logit[target],
    0 where target == ignore_index and NaN where a target is outside [0, V)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid, bad, index = _labels(targets, x.shape[-1], ignore_index)
    loss = torch.where(valid, lse - x.gather(-1, index.unsqueeze(-1)).squeeze(-1), 0.0)
    return loss.masked_fill(bad, math.nan), lse


def cross_entropy_backward(
    grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """dlogits = grad[:, None] * (softmax(logits) - onehot(target)) in the logits' dtype; 0 on ignored rows, NaN on
    rows whose target is outside [0, V)."""
    x = logits.float()
    valid, bad, index = _labels(targets, x.shape[-1], ignore_index)
    d = torch.exp(x - lse.unsqueeze(-1))
    d.scatter_add_(-1, index.unsqueeze(-1), torch.where(valid, -1.0, 0.0).unsqueeze(-1))
    g = torch.where(valid, grad.float(), 0.0).masked_fill(bad, math.nan)
    return (d * g.unsqueeze(-1)).to(logits.dtype)


# ---------------------------------------------------------------------------------------- attention
def _softmax_probs(q, k, v, scale, causal):
    """Attention probabilities of one sequence with the G query heads of each KV head stacked along rows.

    q [Sq, Hq, D], k/v [Sk, Hkv, D] → (qf [Hkv, G*Sq, D], kf, vf [Hkv, Sk, D], p [Hkv, G*Sq, Sk], lse [Hkv, G*Sq]).
    Causal masks are aligned bottom-right (query i sees keys j <= i + Sk - Sq), as in FlashAttention.
    Query rows that see no key get p = 0 and lse = -inf.
    """
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    group = hq // hkv
    qf = q.float().permute(1, 0, 2).reshape(hkv, group * sq, d)  # [Hkv, G*Sq, D]
    kf, vf = k.float().permute(1, 0, 2), v.float().permute(1, 0, 2)  # [Hkv, Sk, D]
    s = (qf @ kf.transpose(1, 2)) * scale  # [Hkv, G*Sq, Sk]
    if causal:
        i = torch.arange(sq, device=q.device).repeat(group)
        j = torch.arange(sk, device=q.device)
        s = s.masked_fill(j[None, :] > (i[:, None] + sk - sq), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G*Sq]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    return qf, kf, vf, p, lse


def _attend(q, k, v, scale, causal):
    """One sequence: q [Sq, Hq, D], k/v [Sk, Hkv, D] → (out [Sq, Hq, D] fp32, lse [Hq, Sq] fp32)."""
    sq, hq, d = q.shape
    _, _, vf, p, lse = _softmax_probs(q, k, v, scale, causal)
    out = (p @ vf).reshape(hq, sq, d).permute(1, 0, 2)
    return out, lse.reshape(hq, sq)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scale + mask) v with GQA. Returns (out, lse).

    Padded: q [B, S, Hq, D], k/v [B, Sk, Hkv, D] → out like q, lse [B, Hq, S].
    Varlen: q [T, Hq, D], k/v [Tk, Hkv, D] with cu_seqlens (and cu_seqlens_k, default cu_seqlens)
    → out like q, lse [Hq, T]. Each sequence attends only within itself (the document mask).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        outs = [_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])]
        if not outs:
            return q.new_zeros(q.shape), q.new_zeros(0, q.shape[2], q.shape[1], dtype=torch.float32)
        return torch.stack([o for o, _ in outs]).to(q.dtype), torch.stack([s for _, s in outs])
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    bq, bk = cu_seqlens.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        if bq[i + 1] > bq[i]:
            o, s = _attend(q[bq[i] : bq[i + 1]], k[bk[i] : bk[i + 1]], v[bk[i] : bk[i + 1]], scale, causal)
            out[bq[i] : bq[i + 1]], lse[:, bq[i] : bq[i + 1]] = o, s
    return out.to(q.dtype), lse


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """New tokens against a KV cache that already holds them.

    q [B, Sq, Hq, D]; caches [B, L, Hkv, D]; cache_seqlens [B] = valid cache length per sequence. The Sq
    queries sit at positions cache_seqlens[b] - Sq ... cache_seqlens[b] - 1, causal among themselves.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lens = cache_seqlens.tolist()
    outs = [_attend(q[b], k_cache[b, : lens[b]], v_cache[b, : lens[b]], scale, True)[0] for b in range(q.shape[0])]
    return torch.stack(outs).to(q.dtype) if outs else q.new_zeros(q.shape)


def rope_rotate(x: torch.Tensor, rot: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [..., H, D] with its interleaved pairs (x[2i], x[2i+1]) rotated by rot [..., D/2] complex64 (cos + i sin),
    or by its conjugate (the inverse rotation), as fp32 complex products; x's dtype out, contiguous."""
    if inverse:  # an explicit conjugate: rot.conj() is a lazy view that AOT tracing mishandles
        rot = torch.complex(rot.real, -rot.imag)
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [..., H, D/2]
    return torch.view_as_real(pairs * rot.unsqueeze(-2)).flatten(-2).to(x.dtype).contiguous()


def rope_kv_cache(
    qkv: torch.Tensor,
    rot: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """RoPE on the q and k heads of a fused projection; k and v appended to a KV cache (in place).

    qkv [B, S, (Hq + 2 Hkv) D]; rot [B, S, D/2] complex64 (cos + i sin of each token's angles); positions
    [B, S] int64; caches [Bmax, L, Hkv, D]. Pairs are interleaved (x[2i], x[2i+1]) and rotated in fp32 as
    complex numbers. Writes k_cache[b, positions[b, s]] = rotated k, v_cache[...] = v; returns the rotated
    q [B, S, Hq, D] (contiguous, qkv's dtype).
    """
    b, s, _ = qkv.shape
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    x = qkv.unflatten(-1, (n_heads + 2 * hkv, d))  # [B, S, Hq + 2 Hkv, D]
    qk = rope_rotate(x[:, :, : n_heads + hkv], rot)  # [B, S, Hq + Hkv, D]
    rows = torch.arange(b, device=qkv.device).unsqueeze(1)  # [B, 1]
    k_cache[rows, positions] = qk[:, :, n_heads:]
    v_cache[rows, positions] = x[:, :, n_heads + hkv :]
    return qk[:, :, :n_heads].contiguous()


def _attend_backward(q, k, v, dout, scale, causal):
    """Gradients of `_attend` for one sequence, in fp32: (dq [Sq,Hq,D], dk [Sk,Hkv,D], dv [Sk,Hkv,D]).

    dV = Pᵀ dO; dP = dO Vᵀ; dS = P ∘ (dP − rowsum(dO ∘ O)); dQ = dS K · scale; dK = dSᵀ Q · scale.
    The G query heads of a KV head are stacked along the rows, so the matmuls sum dK/dV over the group.
    """
    sq, hq, d = q.shape
    hkv = k.shape[1]
    qf, kf, vf, p, _ = _softmax_probs(q, k, v, scale, causal)
    dof = dout.float().permute(1, 0, 2).reshape(hkv, (hq // hkv) * sq, d)  # [Hkv, G*Sq, D] like qf
    o = p @ vf
    dv = p.transpose(1, 2) @ dof
    ds = p * ((dof @ vf.transpose(1, 2)) - (dof * o).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(1, 2) @ qf) * scale
    return dq.reshape(hq, sq, d).permute(1, 0, 2), dk.permute(1, 0, 2), dv.permute(1, 0, 2)


def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of flash_attention in fp32, cast to the input dtypes; dk/dv summed per GQA group."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            dq[b], dk[b], dv[b] = _attend_backward(q[b], k[b], v[b], dout[b], scale, causal)
    else:
        bq = cu_seqlens.tolist()
        bk = (cu_seqlens if cu_seqlens_k is None else cu_seqlens_k).tolist()
        for i in range(len(bq) - 1):
            qs, ks = slice(bq[i], bq[i + 1]), slice(bk[i], bk[i + 1])
            if bq[i + 1] > bq[i] and bk[i + 1] > bk[i]:
                dq[qs], dk[ks], dv[ks] = _attend_backward(q[qs], k[ks], v[ks], dout[qs], scale, causal)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
