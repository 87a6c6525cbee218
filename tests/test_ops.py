"""The op surface on CPU: references against independent torch formulas, autograd, opcheck, bad inputs.

Tolerances: fp32 paths compare to fp64 formulas at 1e-5 (a few fp32 ulps over reductions of ≤ 2K terms);
16-bit outputs may differ from the fp64 formula by one rounding of their own format.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llama3_kernels as l3k
from llama3_kernels import reference
from llama3_kernels.ops._common import has_kernel, kernel
from llama3_kernels.ops.attention import _decode_splits, decode_attn, flash_attn_bwd, flash_attn_fwd
from llama3_kernels.ops.gemm import fp8_rowwise_mm_fwd
from llama3_kernels.ops.linear import decode_gemv, decode_qkv_rope_cache
from llama3_kernels.ops.loss import cross_entropy_bwd, cross_entropy_fwd
from llama3_kernels.ops.norm import rms_norm_bwd, rms_norm_fp8_fwd, rms_norm_fwd
from llama3_kernels.ops.quant import quantize_fp8_rowwise_fwd
from llama3_kernels.ops.rope import rope_kv_cache_op, rope_rotate_op
from llama3_kernels.ops.swiglu import swiglu_bwd, swiglu_fp8_fwd, swiglu_fwd

E4M3 = torch.float8_e4m3fn
ODD_SHAPES = [(1, 760), (37, 1128), (199, 64)]


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def assert_close(actual, expected, atol, rtol=0.0, msg=""):
    assert not torch.isnan(actual).any(), f"NaN in output {msg}"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=msg or None)


def bf16_ulps(actual: torch.Tensor, expected_f64: torch.Tensor) -> float:
    """Worst error in units of the bf16 spacing at the expected value."""
    spacing = torch.clamp(expected_f64.abs(), min=2.0**-120).log2().floor().exp2() * 2.0**-7
    return float(((actual.double() - expected_f64).abs() / spacing).max())


# ------------------------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("m,n", ODD_SHAPES)
def test_rms_norm_matches_torch(gen, m, n):
    x, w = randn(gen, m, n), randn(gen, n)
    y = l3k.rms_norm(x, w, eps=1e-5)
    assert_close(y, F.rms_norm(x.double(), (n,), w.double(), eps=1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m,n", ODD_SHAPES)
def test_rms_norm_residual(gen, m, n):
    x, r, w = randn(gen, 3, m, n), randn(gen, 3, m, n), randn(gen, n)
    y, h = l3k.rms_norm(x, w, 1e-6, residual=r)
    assert_close(h, x.double() + r.double(), atol=1e-6, rtol=1e-6)
    assert_close(y, F.rms_norm(x.double() + r.double(), (n,), w.double(), eps=1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_bf16_single_rounding(gen):
    x, w = randn(gen, 37, 1128, dtype=torch.bfloat16), randn(gen, 1128, dtype=torch.bfloat16)
    y = l3k.rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    assert bf16_ulps(y, F.rms_norm(x.double(), (1128,), w.double(), eps=1e-5)) <= 1.0


def test_rms_norm_strided_rows(gen):
    base = randn(gen, 37, 2048)
    x, w = base[:, 100:860], randn(gen, 760)  # row stride 2048, width 760
    assert x.stride() == (2048, 1)
    torch.testing.assert_close(l3k.rms_norm(x, w), l3k.rms_norm(x.contiguous(), w), atol=0, rtol=0)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_grad(gen, with_residual):
    m, n = 37, 760
    x, r, w = (randn(gen, *s).requires_grad_() for s in ((m, n), (m, n), (n,)))
    dy, dh = randn(gen, m, n), randn(gen, m, n)
    if with_residual:
        y, h = l3k.rms_norm(x, w, residual=r)
        ((y * dy).sum() + (h * dh).sum()).backward()
    else:
        (l3k.rms_norm(x, w) * dy).sum().backward()
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    h64 = x64 + r64 if with_residual else x64
    loss = (F.rms_norm(h64, (n,), w64, eps=1e-5) * dy.double()).sum()
    if with_residual:
        loss = loss + (h64 * dh.double()).sum()
    loss.backward()
    assert_close(x.grad, x64.grad, atol=1e-4, rtol=1e-5)
    assert_close(w.grad, w64.grad, atol=1e-4, rtol=1e-5)
    if with_residual:
        assert_close(r.grad, r64.grad, atol=1e-4, rtol=1e-5)


def test_rms_norm_opcheck(gen):
    x, r, w = randn(gen, 7, 96), randn(gen, 7, 96), randn(gen, 96)
    torch.library.opcheck(rms_norm_fwd, (x, w, r, 1e-5))
    torch.library.opcheck(rms_norm_fwd, (x.requires_grad_(), w.requires_grad_(), None, 1e-5))
    _, _, rstd = rms_norm_fwd(x, w, None, 1e-5)
    torch.library.opcheck(rms_norm_bwd, (randn(gen, 7, 96), x.detach(), w.detach(), rstd.detach(), None))
    torch.library.opcheck(rms_norm_fp8_fwd, (x.detach(), w.detach(), r, 1e-5, 1200.0))


def test_rms_norm_empty():
    y, h = l3k.rms_norm(torch.empty(0, 64), torch.ones(64), residual=torch.empty(0, 64))
    assert y.shape == (0, 64) and h.shape == (0, 64)


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: l3k.rms_norm(torch.ones(4, 8, dtype=torch.int32), torch.ones(8)), TypeError, "x"),
        (lambda: l3k.rms_norm(torch.ones(4, 8), torch.ones(7)), ValueError, "weight"),
        (lambda: l3k.rms_norm(torch.ones(4, 8), torch.ones(8, 1)), ValueError, "weight"),
        (lambda: l3k.rms_norm(torch.ones(4, 8), torch.ones(8), residual=torch.ones(4, 7)), ValueError, "residual"),
        (
            lambda: l3k.rms_norm(torch.ones(4, 8), torch.ones(8), residual=torch.ones(4, 8).half()),
            TypeError,
            "residual",
        ),
        (lambda: l3k.rms_norm(torch.ones(4, 8), torch.ones(8), eps=-1.0), ValueError, "eps"),
        (lambda: l3k.rms_norm(torch.ones(8, 4).t(), torch.ones(8)), ValueError, "x"),
        (lambda: l3k.rms_norm(torch.ones(4, 0), torch.ones(0)), ValueError, "x"),
        (lambda: l3k.rms_norm("x", torch.ones(8)), TypeError, "x"),
        (lambda: l3k.rms_norm_fp8(torch.ones(4, 8), torch.ones(8), amax_ub=0.0), ValueError, "amax_ub"),
    ],
)
def test_rms_norm_bad_inputs(call, exc, name):
    with pytest.raises(exc, match=rf"^{name}:"):
        call()


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    n=st.integers(1, 300),
    pad=st.integers(0, 7),
    seed=st.integers(0, 2**31 - 1),
)
def test_rms_norm_property(rows, n, pad, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, n + pad, generator=g)[..., pad:]  # non-contiguous rows when pad > 0
    w = torch.randn(n, generator=g)
    assert_close(l3k.rms_norm(x, w), F.rms_norm(x.double(), (n,), w.double(), eps=1e-5), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("m,f", ODD_SHAPES)
def test_swiglu_matches_torch(gen, m, f):
    g, u = randn(gen, m, f, scale=3), randn(gen, m, f)
    assert_close(l3k.swiglu(g, u), F.silu(g.double()) * u.double(), atol=1e-6, rtol=1e-6)
    fused = torch.cat([g, u], dim=-1)
    # strided halves may take another vectorized path: allow one fp32 rounding
    torch.testing.assert_close(l3k.swiglu(fused), l3k.swiglu(g, u), atol=1e-7, rtol=2.5e-7)


def test_swiglu_bf16_single_rounding(gen):
    g, u = randn(gen, 37, 1128, dtype=torch.bfloat16, scale=4), randn(gen, 37, 1128, dtype=torch.bfloat16)
    # one round-to-nearest of an fp32 result: half a bf16 ulp plus a few fp32 ulps (2^-16 bf16 ulps each)
    assert bf16_ulps(l3k.swiglu(g, u), F.silu(g.double()) * u.double()) <= 0.5 + 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_grad(gen, fused):
    g, u, dy = randn(gen, 2, 37, 760, scale=3), randn(gen, 2, 37, 760), randn(gen, 2, 37, 760)
    if fused:
        gu = torch.cat([g, u], -1).requires_grad_()
        (l3k.swiglu(gu) * dy).sum().backward()
        dg, du = gu.grad.split(760, -1)
    else:
        g.requires_grad_(), u.requires_grad_()
        (l3k.swiglu(g, u) * dy).sum().backward()
        dg, du = g.grad, u.grad
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    (F.silu(g64) * u64 * dy.double()).sum().backward()
    assert_close(dg, g64.grad, atol=1e-5, rtol=1e-5)
    assert_close(du, u64.grad, atol=1e-5, rtol=1e-5)


def test_swiglu_opcheck(gen):
    g, u = randn(gen, 7, 40), randn(gen, 7, 40)
    torch.library.opcheck(swiglu_fwd, (g.requires_grad_(), u.requires_grad_()))
    torch.library.opcheck(swiglu_bwd, (randn(gen, 7, 40), g.detach(), u.detach()))
    torch.library.opcheck(swiglu_fp8_fwd, (g.detach(), u.detach(), 1200.0))


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: l3k.swiglu(torch.ones(4, 7)), ValueError, "gate"),
        (lambda: l3k.swiglu(torch.ones(4, 8), torch.ones(4, 7)), ValueError, "up"),
        (lambda: l3k.swiglu(torch.ones(4, 8), torch.ones(4, 8).half()), TypeError, "up"),
        (lambda: l3k.swiglu(torch.ones(4, 8, dtype=torch.long)), TypeError, "gate"),
        (lambda: l3k.swiglu_fp8(torch.ones(4, 8), amax_ub=-1.0), ValueError, "amax_ub"),
    ],
)
def test_swiglu_bad_inputs(call, exc, name):
    with pytest.raises(exc, match=rf"^{name}:"):
        call()


def test_swiglu_empty():
    assert l3k.swiglu(torch.empty(0, 16)).shape == (0, 8)


# ------------------------------------------------------------------------------------------------ fp8
def independent_quantize(x: torch.Tensor, ub: float):
    amax = x.double().abs().amax(-1)
    scale = torch.maximum(
        torch.minimum(amax, torch.tensor(ub, dtype=torch.float64)) / 448, torch.tensor(1 / (448 * 512))
    )
    return (x.double() / scale[..., None]).clamp(-448, 448).to(E4M3), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_scale_rule(gen, dtype):
    x = randn(gen, 5, 1128, dtype=dtype)
    x[1] *= 1000.0  # amax above 1200: bounded scale, clamped values
    x[2] = 0.0  # zero row: zeros and the minimum scale
    x[3] *= 1e-6  # tiny row: minimum scale
    q, scale = l3k.quantize_fp8_rowwise(x)
    q_ref, scale_ref = independent_quantize(x, 1200.0)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (5,)
    assert_close(scale, scale_ref, atol=0, rtol=1e-7)
    assert scale[1] == pytest.approx(1200 / 448) and scale[2] == pytest.approx(1 / (448 * 512))
    assert (q[2].float() == 0).all() and not torch.isnan(q.float()).any()
    assert q.float().abs().max() <= 448
    # same e4m3 value, or a neighbour where fp32 and fp64 division straddle a rounding boundary; 16-bit
    # inputs over a scale of amax/448 often land exactly on e4m3 midpoints, so ties flip more often
    diff = (q.float() - q_ref.float()).abs()
    assert (diff <= q_ref.float().abs() * 2**-3 + 2**-9).all() and (diff > 0).float().mean() < 1e-2


def test_quantize_roundtrip_error(gen):
    x = randn(gen, 37, 760)
    q, s = l3k.quantize_fp8_rowwise(x)
    # e4m3 keeps 3 mantissa bits: relative rounding ≤ 2^-4 for normals, absolute ≤ 2^-10 * scale below them
    err = (reference.dequantize_fp8_rowwise(q, s) - x).abs()
    assert (err <= x.abs() * 2**-4 + s[:, None] * 2**-10).all()


def test_fused_fp8_forms(gen):
    x, r, w = randn(gen, 37, 760), randn(gen, 37, 760), randn(gen, 760)
    q, s, h = l3k.rms_norm_fp8(x, w, 1e-5, residual=r)
    y = F.rms_norm((x + r).double(), (760,), w.double(), eps=1e-5)
    q_ref, s_ref = independent_quantize(y, 1200.0)
    assert_close(s, s_ref, atol=0, rtol=1e-6)
    assert (q.float() != q_ref.float()).float().mean() < 1e-3
    assert_close(h, x.double() + r.double(), atol=1e-6, rtol=1e-6)
    g, u = randn(gen, 2, 37, 760, scale=3), randn(gen, 2, 37, 760)
    q, s = l3k.swiglu_fp8(g, u, amax_ub=2.0)
    q_ref, s_ref = independent_quantize(F.silu(g.double()) * u.double(), 2.0)
    assert_close(s, s_ref, atol=0, rtol=1e-6)
    assert (q.float() != q_ref.float()).float().mean() < 1e-3


def test_quantize_opcheck(gen):
    torch.library.opcheck(quantize_fp8_rowwise_fwd, (randn(gen, 7, 48, dtype=torch.bfloat16), 1200.0))


def test_quantize_bad_inputs():
    with pytest.raises(TypeError, match="^x:"):
        l3k.quantize_fp8_rowwise(torch.ones(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="^amax_ub:"):
        l3k.quantize_fp8_rowwise(torch.ones(4, 8), amax_ub=0)
    q, s = l3k.quantize_fp8_rowwise(torch.empty(0, 32))
    assert q.shape == (0, 32) and s.shape == (0,)


# ----------------------------------------------------------------------------------------------- gemm
def make_fp8_operands(gen, m, n, k):
    xq, xs = l3k.quantize_fp8_rowwise(randn(gen, m, k))
    wq, ws = l3k.quantize_fp8_rowwise(randn(gen, n, k) * 0.02, amax_ub=float("inf"))
    return xq, xs, wq, ws


@pytest.mark.parametrize("m,n,k", [(1, 32, 16), (37, 48, 64), (199, 160, 96)])
def test_fp8_mm_matches_scaled_mm(gen, m, n, k):
    xq, xs, wq, ws = make_fp8_operands(gen, m, n, k)
    bias = randn(gen, n)
    y = l3k.fp8_rowwise_mm(xq, xs, wq, ws, bias=bias, out_dtype=torch.float32)
    ref = torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.float32) + bias
    assert_close(y, ref, atol=1e-5, rtol=1e-5)
    exact = (xq.double() @ wq.double().t()) * xs.double()[:, None] * ws.double() + bias.double()
    assert_close(y, exact, atol=1e-5, rtol=1e-5)
    y16 = l3k.fp8_rowwise_mm(xq, xs, wq, ws)
    assert y16.dtype == torch.bfloat16
    # one bf16 rounding of the fp32 result; that result's own error (fp32 sums of K products) is absolute, relative
    # to Σ|products|, and exceeds half a bf16 ulp where the products cancel to near zero (seed 193: -9.8e-7)
    nobias = exact - bias.double()
    absdot = (xq.double().abs() @ wq.double().abs().t()) * xs.double()[:, None] * ws.double()
    spacing = torch.clamp(nobias.abs(), min=2.0**-120).log2().floor().exp2() * 2.0**-7
    err = (y16.double() - nobias).abs()
    assert not torch.isnan(y16).any() and bool((err <= 0.5 * spacing + k * 2.0**-24 * absdot).all())


def test_fp8_mm_batched_and_opcheck(gen):
    xq, xs, wq, ws = make_fp8_operands(gen, 6, 32, 48)
    y = l3k.fp8_rowwise_mm(xq.view(2, 3, 48), xs.view(2, 3), wq, ws, out_dtype=torch.float32)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y.view(6, 32), l3k.fp8_rowwise_mm(xq, xs, wq, ws, out_dtype=torch.float32))
    # opcheck's schema test multiplies inputs, which CPU float8 does not support; run the others
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fp8_rowwise_mm_fwd, (xq, xs, wq, ws, None, torch.bfloat16), test_utils=utils)


@pytest.mark.parametrize(
    "mutate,exc,name",
    [
        (lambda a: a.update(xq=a["xq"].float()), TypeError, "xq"),
        (lambda a: a.update(wq=a["wq"][:, :40].contiguous()), ValueError, "xq"),
        (lambda a: a.update(xq=a["xq"][:, :40].contiguous(), wq=a["wq"][:, :40].contiguous()), ValueError, "wq"),
        (lambda a: a.update(x_scale=a["x_scale"][:3]), ValueError, "x_scale"),
        (lambda a: a.update(w_scale=a["w_scale"].half()), TypeError, "w_scale"),
        (lambda a: a.update(bias=torch.ones(31)), ValueError, "bias"),
        (lambda a: a.update(out_dtype=torch.int32), TypeError, "out_dtype"),
        (lambda a: a.update(xq=a["xq"].t().contiguous().t()), ValueError, "xq"),
    ],
)
def test_fp8_mm_bad_inputs(gen, mutate, exc, name):
    xq, xs, wq, ws = make_fp8_operands(gen, 8, 32, 48)
    args = dict(xq=xq, x_scale=xs, wq=wq, w_scale=ws)
    mutate(args)
    with pytest.raises(exc, match=rf"^{name}:"):
        l3k.fp8_rowwise_mm(**args)


# ------------------------------------------------------------------------------------------ attention
def sdpa_reference(q, k, v, causal, scale=None):
    """[B, S, H, D] through F.scaled_dot_product_attention in fp64 with an explicit bottom-right mask."""
    sq, sk, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    qt, kt, vt = (t.double().transpose(1, 2) for t in (q, k, v))
    kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    mask = None
    if causal:
        mask = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("b,s,sk,hq,hkv,d", [(2, 37, 37, 4, 2, 64), (1, 1, 1, 9, 3, 64), (3, 19, 45, 8, 8, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_matches_sdpa(gen, b, s, sk, hq, hkv, d, causal):
    q, k, v = randn(gen, b, s, hq, d), randn(gen, b, sk, hkv, d), randn(gen, b, sk, hkv, d)
    out, lse = l3k.flash_attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, hq, s)
    assert_close(out, sdpa_reference(q, k, v, causal), atol=1e-5, rtol=1e-5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(hq // hkv, 2)) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(torch.arange(sk)[None, :] > torch.arange(s)[:, None] + sk - s, float("-inf"))
    assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


def test_flash_attention_varlen_is_per_document(gen):
    lens = [5, 1, 0, 37, 12]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t = sum(lens)
    q, k, v = randn(gen, t, 6, 64), randn(gen, t, 2, 64), randn(gen, t, 2, 64)
    out, lse = l3k.flash_attention(q, k, v, cu_seqlens=cu, return_lse=True)
    assert lse.shape == (6, t)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > a:
            want = sdpa_reference(q[None, a:e], k[None, a:e], v[None, a:e], True)[0]
            assert_close(out[a:e], want, atol=1e-5, rtol=1e-5)


def test_flash_attention_separate_key_offsets(gen):
    # each query segment sees a longer key segment that ends with it (context-parallel chunks)
    q, k, v = randn(gen, 7, 4, 64), randn(gen, 20, 2, 64), randn(gen, 20, 2, 64)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 8, 20], dtype=torch.int32)
    out = l3k.flash_attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    assert_close(out[:3], sdpa_reference(q[None, :3], k[None, :8], v[None, :8], True)[0], atol=1e-5, rtol=1e-5)
    assert_close(out[3:], sdpa_reference(q[None, 3:], k[None, 8:], v[None, 8:], True)[0], atol=1e-5, rtol=1e-5)


def test_flash_attention_fully_masked_rows_are_zero(gen):
    q, k = randn(gen, 1, 5, 2, 64), randn(gen, 1, 3, 2, 64)  # Sq > Sk: the first two queries see nothing
    out, lse = l3k.flash_attention(q, k, k, return_lse=True)
    assert (out[0, :2] == 0).all() and torch.isinf(lse[0, :, :2]).all() and not torch.isnan(out).any()


@pytest.mark.parametrize("varlen", [False, True])
def test_flash_attention_grad(gen, varlen):
    q, k, v = randn(gen, 2, 13, 4, 64), randn(gen, 2, 13, 2, 64), randn(gen, 2, 13, 2, 64)
    dout = randn(gen, 2, 13, 4, 64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if varlen:
        cu = torch.tensor([0, 13, 26], dtype=torch.int32)
        out = l3k.flash_attention(*(t.flatten(0, 1) for t in leaves), cu_seqlens=cu).view(2, 13, 4, 64)
    else:
        out = l3k.flash_attention(*leaves)
    (out * dout).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    (sdpa_reference(*ref_leaves, True) * dout.double()).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_flash_attention_opcheck(gen):
    q, k, v = randn(gen, 2, 9, 4, 64), randn(gen, 2, 9, 2, 64), randn(gen, 2, 9, 2, 64)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(flash_attn_fwd, (*leaves, None, None, 9, 9, True, 0.125))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    flat = [t.detach()[0] for t in (q, k, v)]
    torch.library.opcheck(flash_attn_fwd, (*flat, cu, None, 5, 5, True, 0.125))
    out, lse = flash_attn_fwd(*flat, cu, None, 5, 5, True, 0.125)
    torch.library.opcheck(flash_attn_bwd, (torch.ones_like(out), *flat, out, lse, cu, None, 5, 5, True, 0.125, False))


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(q=torch.ones(1, 4, 3, 64)), ValueError, "k"),  # 3 query heads over 2 KV heads
        (dict(q=torch.ones(1, 4, 4, 60), k=torch.ones(1, 4, 2, 60), v=torch.ones(1, 4, 2, 60)), ValueError, "q"),
        (dict(k=torch.ones(1, 4, 2, 64).half()), TypeError, "k"),
        (dict(v=torch.ones(1, 5, 2, 64)), ValueError, "k, v"),
        (dict(q=torch.ones(4, 4, 64)), ValueError, "q"),
        (dict(q=torch.ones(1, 4, 4, 64, dtype=torch.int32)), TypeError, "q"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(causal=1), TypeError, "causal"),
        (dict(q=torch.ones(2, 4, 4, 64)), ValueError, "k"),
    ],
)
def test_flash_attention_bad_inputs(kwargs, exc, name):
    args = dict(q=torch.ones(1, 4, 4, 64), k=torch.ones(1, 4, 2, 64), v=torch.ones(1, 4, 2, 64))
    args.update(kwargs)
    with pytest.raises(exc, match=rf"^{name}:"):
        l3k.flash_attention(**args)


@pytest.mark.parametrize(
    "cu,name",
    [
        (torch.tensor([0, 3, 8], dtype=torch.int64), "cu_seqlens"),
        (torch.tensor([0, 5, 3, 8], dtype=torch.int32), "cu_seqlens"),
        (torch.tensor([0, 3, 7], dtype=torch.int32), "cu_seqlens"),
        (torch.tensor([[0, 8]], dtype=torch.int32), "cu_seqlens"),
    ],
)
def test_flash_attention_bad_cu_seqlens(cu, name):
    q = torch.ones(8, 4, 64)
    with pytest.raises((TypeError, ValueError), match=rf"^{name}:"):
        l3k.flash_attention(q, q[:, :2], q[:, :2], cu_seqlens=cu)


def test_flash_attention_packed_k_must_match_q_with_shared_offsets():
    """One set of offsets for queries and keys (cu_seqlens_k omitted or the same tensor): k has q's token count."""
    q, k = torch.ones(8, 4, 64), torch.ones(6, 2, 64)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    for extra in ({}, {"cu_seqlens_k": cu, "max_seqlen_k": 5}):
        with pytest.raises(ValueError, match=r"^k:"):
            l3k.flash_attention(q, k, k, cu_seqlens=cu, max_seqlen=5, **extra)


def test_flash_attention_empty():
    q = torch.empty(0, 5, 4, 64)
    assert l3k.flash_attention(q, q[:, :, :2], q[:, :, :2]).shape == q.shape


# --------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("sq", [1, 3])
def test_decode_attention_matches_sdpa(gen, sq):
    b, length, hq, hkv, d = 3, 40, 8, 2, 64
    q, kc, vc = randn(gen, b, sq, hq, d), randn(gen, b, length, hkv, d), randn(gen, b, length, hkv, d)
    lens = torch.tensor([sq, 17, 40], dtype=torch.int32)
    out = l3k.decode_attention(q, kc, vc, lens)
    for i, n in enumerate(lens.tolist()):
        want = sdpa_reference(q[i : i + 1], kc[i : i + 1, :n], vc[i : i + 1, :n], True)
        assert_close(out[i : i + 1], want, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(decode_attn, (q, kc, vc, lens, 0.125))


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(cache_seqlens=torch.tensor([5, 5], dtype=torch.int64)), TypeError, "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([5], dtype=torch.int32)), ValueError, "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([5, 41], dtype=torch.int32)), ValueError, "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([0, 4], dtype=torch.int32)), ValueError, "cache_seqlens"),
        (dict(k_cache=torch.ones(2, 40, 3, 64), v_cache=torch.ones(2, 40, 3, 64)), ValueError, "k_cache"),
        (dict(v_cache=torch.ones(2, 39, 2, 64)), ValueError, "k_cache, v_cache"),
        (dict(q=torch.ones(2, 1, 8, 64).half()), TypeError, "k_cache"),
    ],
)
def test_decode_attention_bad_inputs(kwargs, exc, name):
    args = dict(
        q=torch.ones(2, 1, 8, 64),
        k_cache=torch.ones(2, 40, 2, 64),
        v_cache=torch.ones(2, 40, 2, 64),
        cache_seqlens=torch.tensor([5, 5], dtype=torch.int32),
    )
    args.update(kwargs)
    with pytest.raises(exc, match=rf"^{name}:"):
        l3k.decode_attention(**args)


@pytest.mark.parametrize(
    "args,want",
    [
        ((1, 4, 8, 4096, 132, 16), (16, True)),  # the 1B's batch-1 step: 33 splits capped at one 16-CTA cluster
        ((1, 4, 8, 4096, 132, 1), (33, False)),  # no cluster (L3K_DECODE_CLUSTER=0, or none fits): combine kernel
        ((1, 4, 8, 131072, 132, 16), (33, False)),  # capped, a split would stream 128 tiles: combine kernel
        ((1, 4, 8, 16384, 132, 16), (16, True)),  # 256 tiles: 16 a split, the most a capped split takes
        ((1, 4, 8, 16448, 132, 16), (33, False)),  # 257 tiles: one more
        ((16, 4, 8, 8192, 132, 16), (3, True)),  # the batch fills the GPU: 3 splits, one cluster each
        ((1, 4, 8, 64, 132, 16), (1, False)),  # one tile: nothing to split
        ((2, 100, 2, 1000, 132, 8), (16, False)),  # rows-split tile, 8 CTAs: capped at 8 splits, 64 would idle SMs
        ((8, 100, 2, 1000, 132, 8), (8, True)),  # 32 CTAs: 9 splits capped at 8, 256 CTAs of 2 tiles
        ((1, 3, 3, 4096, 132, 16), (64, False)),  # 3 KV heads (SmolLM2): capped, 48 CTAs would idle most SMs
    ],
)
def test_decode_splits(args, want):
    assert _decode_splits(*args) == want


# --------------------------------------------------------------------------------------- rope + cache
def rope_case(gen, b=2, s=3, hq=4, hkv=2, d=8, bmax=3, length=10, dtype=torch.float32):
    qkv = randn(gen, b, s, (hq + 2 * hkv) * d, dtype=dtype)
    angles = randn(gen, b, s, d // 2, dtype=torch.float64) * 3
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    positions = torch.stack([torch.randperm(length, generator=gen)[:s] for _ in range(b)])
    caches = [torch.full((bmax, length, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
    return qkv, rot, positions, caches, angles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_cache_matches_real_arithmetic(gen, dtype):
    b, s, hq, hkv, d = 2, 3, 4, 2, 8
    qkv, rot, positions, (kc, vc), angles = rope_case(gen, b, s, hq, hkv, d, dtype=dtype)
    q = l3k.rope_kv_cache(qkv, rot, positions, kc, vc, hq)
    # independent: rotate each interleaved pair (x0, x1) by its angle with real fp64 arithmetic
    x = qkv.double().view(b, s, hq + 2 * hkv, d // 2, 2)
    c, sn = angles.cos()[:, :, None], angles.sin()[:, :, None]
    rotated = torch.stack([x[..., 0] * c - x[..., 1] * sn, x[..., 0] * sn + x[..., 1] * c], -1).flatten(-2)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-6, rtol=2**-8)
    assert q.shape == (b, s, hq, d) and q.is_contiguous() and q.dtype == dtype
    assert_close(q, rotated[:, :, :hq], **tol)
    written = torch.zeros(kc.shape[:2], dtype=torch.bool)
    for i in range(b):
        for j in range(s):
            p = int(positions[i, j])
            written[i, p] = True
            assert_close(kc[i, p], rotated[i, j, hq : hq + hkv], **tol)
            assert torch.equal(vc[i, p], qkv[i, j].view(hq + 2 * hkv, d)[hq + hkv :])
    assert torch.isnan(kc[~written]).all() and torch.isnan(vc[~written]).all()  # nothing else touched


def test_rope_kv_cache_opcheck(gen):
    qkv, rot, positions, (kc, vc), _ = rope_case(gen)
    kc.zero_(), vc.zero_()  # opcheck compares runs: no NaN
    torch.library.opcheck(rope_kv_cache_op, (qkv, torch.view_as_real(rot), positions, kc, vc, 4))


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(qkv=torch.ones(2, 3, 63)), ValueError, "qkv"),
        (dict(qkv=torch.ones(2, 3, 64, dtype=torch.float16)), TypeError, "k_cache"),
        (dict(rot=torch.ones(2, 3, 4)), TypeError, "rot"),
        (dict(rot=torch.ones(2, 3, 5, dtype=torch.complex64)), ValueError, "rot"),
        (dict(positions=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "positions"),
        (dict(positions=torch.tensor([[0, 1, 10], [0, 1, 2]])), ValueError, "positions"),
        (dict(positions=torch.tensor([[0, 1, -1], [0, 1, 2]])), ValueError, "positions"),
        (dict(k_cache=torch.ones(1, 10, 2, 8), v_cache=torch.ones(1, 10, 2, 8)), ValueError, "k_cache"),
        (dict(v_cache=torch.ones(3, 9, 2, 8)), ValueError, "v_cache"),
        (dict(n_heads=0), ValueError, "n_heads"),
    ],
)
def test_rope_kv_cache_bad_inputs(kwargs, exc, name):
    args = dict(
        qkv=torch.ones(2, 3, 64),
        rot=torch.ones(2, 3, 4, dtype=torch.complex64),
        positions=torch.zeros(2, 3, dtype=torch.int64),
        k_cache=torch.ones(3, 10, 2, 8),
        v_cache=torch.ones(3, 10, 2, 8),
        n_heads=4,
    )
    args.update(kwargs)
    with pytest.raises(exc, match=rf"^{name}:"):
        l3k.rope_kv_cache(**args)


# ------------------------------------------------------------------------------------ decode linears
def _norm_then_linear(x, g, eps, w, residual=None):
    """Independent formula: h = x + residual (rounded), rms-normalize in fp32, round, then the product."""
    h = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    hd = h.double()
    a = (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * g.double()).to(x.dtype)
    return (a.double() @ w.double().t()), h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 5])  # 5: more rows than the GEMV takes, the unfused ops
def test_decode_linears_match_the_composition(dtype, rows, gen):
    k, n, f = 48, 20, 40
    x, h = torch.randn(rows, 1, k, generator=gen).to(dtype), torch.randn(rows, 1, k, generator=gen).to(dtype)
    g, w = (1 + torch.randn(k, generator=gen)).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    w2, gate_up = torch.randn(n, f, generator=gen).to(dtype), (2 * torch.randn(rows, 1, 2 * f, generator=gen)).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)  # bf16: a's rounding
    assert_close(l3k.decode_linear(x, w).double(), x.double() @ w.double().t(), **tol)
    y, h_new = l3k.rms_norm_linear(x, g, 1e-5, w, residual=h)
    y_ref, h_ref = _norm_then_linear(x, g, 1e-5, w, h)
    assert_close(y.double(), y_ref, **tol)
    assert torch.equal(h_new, h_ref) and h_new.shape == x.shape
    y, same = l3k.rms_norm_linear(x, g, 1e-5, w)
    assert_close(y.double(), _norm_then_linear(x, g, 1e-5, w)[0], **tol)
    assert same is x
    a = (F.silu(gate_up[..., :f].double()) * gate_up[..., f:].double()).to(dtype)
    assert_close(l3k.swiglu_linear(gate_up, w2).double(), a.double() @ w2.double().t(), **tol)


def test_decode_linears_with_gradients_take_the_differentiable_ops(gen):
    x, g, w = torch.randn(2, 16, generator=gen), torch.randn(16, generator=gen), torch.randn(8, 16, generator=gen)
    for t in (x, g, w):
        t.requires_grad_(True)
    y, _ = l3k.rms_norm_linear(x, g, 1e-5, w)
    dx, dg, dw = torch.autograd.grad(y.sum(), (x, g, w))
    xr, gr, wr = (t.detach().double().requires_grad_(True) for t in (x, g, w))
    yr = F.linear(xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5) * gr, wr)
    for got, want in zip((dx, dg, dw), torch.autograd.grad(yr.sum(), (xr, gr, wr))):
        assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no gradient needed: the fused op (its CPU reference)
        assert_close(l3k.rms_norm_linear(x, g, 1e-5, w)[0], y.detach(), atol=1e-6, rtol=1e-6)


def test_decode_gemv_opcheck(gen):
    x, w, r = torch.randn(3, 24, generator=gen), torch.randn(5, 24, generator=gen), torch.randn(3, 24, generator=gen)
    g = torch.randn(24, generator=gen)
    torch.library.opcheck(decode_gemv, (x, w, None, None, 0.0, 0))
    torch.library.opcheck(decode_gemv, (x, w, r, g, 1e-5, 1))
    torch.library.opcheck(decode_gemv, (torch.randn(3, 48, generator=gen), w, None, None, 0.0, 2))


def qkv_case(gen, b, s, dtype, hq=4, hkv=2, d=8, k=24):
    """rms_norm_qkv_rope_cache's inputs: x, norm weight, wqkv, residual, and rope_case's rot, positions, caches."""
    x, r = randn(gen, b, s, k, dtype=dtype), randn(gen, b, s, k, dtype=dtype)
    g, w = randn(gen, k, dtype=dtype), randn(gen, (hq + 2 * hkv) * d, k, dtype=dtype) * 0.2
    _, rot, positions, caches, _ = rope_case(gen, b, s, hq, hkv, d, bmax=b + 1, dtype=dtype)
    return x, g, w, r, rot, positions, caches


@pytest.mark.parametrize("b,s", [(1, 1), (2, 2), (1, 4), (2, 3)])  # 2 x 3: past the GEMV's 4 rows, the ops path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_qkv_rope_cache_is_its_two_ops(gen, b, s, dtype, with_residual):
    """Exactly rms_norm_linear then rope_kv_cache: the same q, h and cache writes, nothing else touched."""
    x, g, w, r, rot, positions, (kc, vc) = qkv_case(gen, b, s, dtype)
    r = r if with_residual else None
    kc2, vc2 = kc.clone(), vc.clone()
    q, h = l3k.rms_norm_qkv_rope_cache(x, g, 1e-5, w, rot, positions, kc, vc, 4, residual=r)
    qkv, h2 = l3k.rms_norm_linear(x, g, 1e-5, w, residual=r)
    q2 = l3k.rope_kv_cache(qkv, rot, positions, kc2, vc2, 4)
    assert q.shape == (b, s, 4, 8) and h.shape == x.shape
    assert torch.equal(q, q2) and torch.equal(h, h2)
    for mine, theirs in ((kc, kc2), (vc, vc2)):  # NaN-poisoned: the same slots written, the same values
        assert torch.equal(mine.isnan(), theirs.isnan()) and torch.equal(mine.nan_to_num(7), theirs.nan_to_num(7))
    assert (~kc.isnan()).all(-1).all(-1).sum() == b * s
    # and against independent math: fp64 norm and product, then the rotation of each pair by its angle
    want_qkv = _norm_then_linear(x, g, 1e-5, w, r)[0].double()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_close(q.double(), reference.rope_kv_cache(want_qkv, rot, positions, kc2.double(), vc2.double(), 4), **tol)


_F = 16 * 1024  # a fake, aligned, nonzero address: the launcher rejects each call below before any CUDA call
_QKV_LAUNCH = dict(x=_F, x_stride=256, residual=0, norm_w=_F, h_out=0, eps=1e-5, w=_F, m=2, k=256, rot=_F,
                   positions=_F, q_out=_F, k_cache=_F, v_cache=_F, S=1, hq=4, hkv=2, d=64, L=16, k_stride_b=2048,
                   k_stride_l=128, v_stride_b=2048, v_stride_l=128, dtype=2, num_sms=8, stream=0)  # fmt: skip


@pytest.mark.skipif(not has_kernel("decode_gemv_rope_cache"), reason="_C without decode_gemv_rope_cache")
@pytest.mark.parametrize(
    "change,arg",
    [
        (dict(d=63), "d"), (dict(hkv=0), "hkv"), (dict(S=3), "S"), (dict(L=0), "L"), (dict(q_out=0), "q_out"),
        (dict(positions=0), "positions"), (dict(rot=_F + 4), "rot"), (dict(m=5), "M"), (dict(k=12), "K"),
        (dict(norm_w=0), "norm_w"), (dict(dtype=0), "dtype"), (dict(x=0), "x"), (dict(x_stride=100), "x_stride"),
        (dict(hq=2**31 - 1, hkv=2**30 + 1, d=2), "hq"),  # (hq + 2 hkv) d overflows an int: rejected, not wrapped
    ],
)  # fmt: skip
def test_decode_gemv_rope_cache_launcher_rejects_bad_arguments(change, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        kernel("decode_gemv_rope_cache")(**{**_QKV_LAUNCH, **change})


@pytest.mark.parametrize(
    "change,name",
    [
        (dict(w=torch.ones(40, 24)), "w"),  # too few rows for the caches' heads: the kernel would read past w
        (dict(positions=torch.zeros(3, 1, dtype=torch.int64)), "positions"),  # more tokens than x has rows
        (dict(rot_pairs=torch.ones(2, 1, 3, 2)), "rot_pairs"),
        (dict(v_cache=torch.zeros(3, 10, 2, 4)), "k_cache"),
    ],
)
def test_decode_qkv_rope_cache_op_checks_its_shapes(gen, change, name):
    """Called directly (not through rms_norm_qkv_rope_cache), the custom op still refuses mismatched shapes."""
    x, g, w, r, rot, positions, (kc, vc) = qkv_case(gen, 2, 1, torch.float32)
    args = dict(x=x.view(2, -1), w=w, residual=None, norm_weight=g, eps=1e-5, rot_pairs=torch.view_as_real(rot),
                positions=positions, k_cache=kc, v_cache=vc, n_heads=4)  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=f"^{name}:"):
        decode_qkv_rope_cache(**args)


def test_decode_qkv_rope_cache_opcheck(gen):
    x, g, w, r, rot, positions, (kc, vc) = qkv_case(gen, 2, 1, torch.float32)
    kc.zero_(), vc.zero_()  # opcheck compares runs: no NaN
    args = (x.view(2, -1), w, r.view(2, -1), g, 1e-5, torch.view_as_real(rot), positions, kc, vc, 4)
    torch.library.opcheck(decode_qkv_rope_cache, args)
    torch.library.opcheck(decode_qkv_rope_cache, (x.view(2, -1), w, None, *args[3:]))


@pytest.mark.parametrize(
    "change,exc,name",
    [
        (dict(wqkv=torch.ones(63, 24)), ValueError, "wqkv"),  # not (n_heads + 2 Hkv) D rows
        (dict(x=torch.ones(2, 24)), ValueError, "x"),  # not [B, S, K]
        (dict(norm_weight=torch.ones(23)), ValueError, "norm_weight"),
        (dict(residual=torch.ones(2, 2, 24)), ValueError, "residual"),
        (dict(positions=torch.zeros(2, 2, dtype=torch.int64)), ValueError, "positions"),
        (dict(positions=torch.full((2, 1), 10)), ValueError, "positions"),  # past the cache
        (dict(rot=torch.ones(2, 1, 4)), TypeError, "rot"),
        (dict(k_cache=torch.ones(3, 10, 2, 8, dtype=torch.float64)), TypeError, "k_cache"),
        (dict(n_heads=3), ValueError, "wqkv"),
    ],
)
def test_rms_norm_qkv_rope_cache_bad_inputs(gen, change, exc, name):
    x, g, w, r, rot, positions, (kc, vc) = qkv_case(gen, 2, 1, torch.float32)
    args = dict(x=x, norm_weight=g, eps=1e-5, wqkv=w, rot=rot, positions=positions, k_cache=kc, v_cache=vc,
                n_heads=4, residual=r)  # fmt: skip
    args.update(change)
    with pytest.raises(exc, match=rf"^{name}:"):
        l3k.rms_norm_qkv_rope_cache(**args)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda x, w: l3k.decode_linear(x[:, :10], w), "x"),
        (lambda x, w: l3k.decode_linear(x[:5, :10], w), "x"),  # more rows than the GEMV takes: still named
        (lambda x, w: l3k.decode_linear(x, w[0]), "weight"),
        (lambda x, w: l3k.decode_linear(x.long(), w), "x"),
        (lambda x, w: l3k.decode_linear(x, w.half()), "weight"),
        (lambda x, w: l3k.rms_norm_linear(x, torch.ones(7), 1e-5, w), "norm_weight"),
        (lambda x, w: l3k.rms_norm_linear(x, torch.ones(16, device="meta"), 1e-5, w), "norm_weight"),
        (lambda x, w: l3k.rms_norm_linear(x, torch.ones(16), 1e-5, w, residual=x[:1]), "residual"),
        (lambda x, w: l3k.swiglu_linear(x, w), "gate_up"),
    ],
)
def test_decode_linear_bad_inputs(call, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}:"):
        call(torch.ones(6, 16), torch.ones(4, 16))


# ----------------------------------------------------------------------------------------------- info
def test_info_is_honest():
    report = l3k.info()
    assert set(report["cuda_ops"]) == {
        "rms_norm", "rms_norm_fp8", "swiglu", "swiglu_fp8", "quantize_fp8_rowwise", "fp8_rowwise_mm",
        "flash_attention", "decode_attention", "rope_kv_cache", "decode_linear", "rms_norm_linear", "swiglu_linear",
        "cross_entropy", "rope", "rms_norm_qkv_rope_cache",
    }  # fmt: skip
    if not torch.cuda.is_available():
        assert all(path.startswith("reference") for path in report["cuda_ops"].values())
    from llama3_kernels.ops._common import _C

    assert (report["extension"] is not None and isinstance(report["extension"], dict)) == (_C is not None)


# ------------------------------------------------------------------------------------ property tests
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 9), f=st.integers(1, 200), fused=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_swiglu_property(rows, f, fused, seed):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(rows, f, generator=g) * 4, torch.randn(rows, f, generator=g)
    strided = torch.cat([torch.zeros(rows, 3), gate], -1)[:, 3:]  # row stride f + 3: not contiguous
    y = l3k.swiglu(torch.cat([gate, up], -1)) if fused else l3k.swiglu(strided, up)
    assert y.shape == (rows, f)
    assert_close(y, F.silu(gate.double()) * up.double(), atol=1e-6, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    n=st.integers(1, 300),
    log_scale=st.floats(-12, 6),
    ub=st.sampled_from([1200.0, 1.0, float("inf")]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_property(rows, n, log_scale, ub, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 10.0**log_scale
    q, s = l3k.quantize_fp8_rowwise(x, amax_ub=ub)
    amax = x.abs().amax(-1)
    want = torch.clamp(torch.minimum(amax, torch.tensor(ub)) / 448, min=1 / (448 * 512))
    assert_close(s, want, atol=0, rtol=1e-6)
    assert not torch.isnan(q.float()).any() and q.float().abs().max() <= 448
    unclipped = amax <= min(ub, 448 * s.max().item() * 2)  # rows whose values all fit: error is rounding only
    err = (reference.dequantize_fp8_rowwise(q, s) - x).abs()[unclipped]
    assert (err <= x.abs()[unclipped] * 2**-4 + s[unclipped, None] * 2**-10 + 1e-30).all()


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.integers(0, 20), min_size=1, max_size=5),
    group=st.sampled_from([1, 2, 3]),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_flash_attention_varlen_property(lens, group, causal, seed):
    g = torch.Generator().manual_seed(seed)
    t, hkv = sum(lens), 2
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (
        torch.randn(t, hkv * group, 64, generator=g),
        torch.randn(t, hkv, 64, generator=g),
        torch.randn(t, hkv, 64, generator=g),
    )
    out = l3k.flash_attention(q, k, v, causal=causal, cu_seqlens=cu)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > a:
            want = sdpa_reference(q[None, a:e], k[None, a:e], v[None, a:e], causal)[0]
            assert_close(out[a:e], want, atol=1e-5, rtol=1e-5)


def test_flash_attention_lse_is_not_differentiable(gen):
    q = randn(gen, 1, 5, 2, 64).requires_grad_()
    out, lse = l3k.flash_attention(q, q, q, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


# ----------------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(gen, reduction, dtype):
    """Values and gradients of F.cross_entropy on fp64 copies of the same logits, ignored positions included."""
    x = randn(gen, 3, 37, 1003, dtype=dtype, scale=4)
    t = torch.randint(0, 1003, (3, 37), generator=gen)
    t[0, :5] = -100
    t[2, 7] = 17  # any ignore_index works
    x.requires_grad_()
    got = l3k.cross_entropy(x, t, reduction=reduction)
    x64 = x.detach().double().requires_grad_()
    want = F.cross_entropy(x64.flatten(0, 1), t.flatten(), reduction=reduction)
    want = want.view(3, 37) if reduction == "none" else want
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, atol=1e-5 * (1 if reduction != "sum" else 37 * 3), rtol=1e-6)
    g = randn(gen, *got.shape) if got.dim() else torch.tensor(1.7)
    (got * g).sum().backward()
    (want * g.double()).sum().backward()
    assert x.grad.dtype == dtype
    # fp32: fp32 noise; bf16: one rounding of the fp32 gradient (rtol 2^-8) above the fp32 noise
    assert_close(x.grad, x64.grad, atol=1e-7, rtol=1e-5 if dtype == torch.float32 else 2.0**-8)


def test_cross_entropy_ignore_index_and_edges(gen):
    x = randn(gen, 4, 50, scale=3).requires_grad_()
    t = torch.tensor([3, 7, 7, 49])
    loss = l3k.cross_entropy(x, t, ignore_index=7, reduction="none")
    assert loss[1] == 0 and loss[2] == 0 and loss[0] > 0
    loss.sum().backward()
    assert torch.all(x.grad[1:3] == 0) and torch.all(x.grad[0] != 0)
    assert math.isnan(l3k.cross_entropy(x, torch.full((4,), -100)).item())  # every position ignored: 0 / 0
    x = torch.full((2, 5), -math.inf)
    x[:, 2] = 0.0  # masked vocabulary: -inf logits take no probability and never make NaN
    loss = l3k.cross_entropy(x.requires_grad_(), torch.tensor([2, 2]), reduction="none")
    assert torch.equal(loss, torch.zeros(2))
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros(2, 5))


def test_cross_entropy_reference_marks_bad_targets_nan():
    """What the kernels do with a target outside [0, V) (the public op raises on CPU before getting there)."""
    x = torch.zeros(3, 5)
    loss, lse = reference.cross_entropy(x, torch.tensor([1, 5, -3]), -100)
    assert (
        loss[0] == pytest.approx(math.log(5))
        and loss[1:].isnan().all()
        and torch.allclose(lse, torch.full((3,), math.log(5)))
    )
    d = reference.cross_entropy_backward(torch.ones(3), x, torch.tensor([1, 5, -100]), lse, -100)
    assert d[0, 1] == pytest.approx(0.2 - 1) and d[1].isnan().all() and torch.equal(d[2], torch.zeros(5))


def test_cross_entropy_opcheck(gen):
    x, t = randn(gen, 7, 40), torch.randint(0, 40, (7,), generator=gen)
    t[3] = -100
    torch.library.opcheck(cross_entropy_fwd, (x.requires_grad_(), t, -100))
    loss, lse = cross_entropy_fwd(x.detach(), t, -100)
    torch.library.opcheck(cross_entropy_bwd, (randn(gen, 7), x.detach(), t, lse, -100))


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: l3k.cross_entropy(torch.ones(4, 7), torch.ones(4)), TypeError, "targets"),
        (lambda: l3k.cross_entropy(torch.ones(4, 7), torch.ones(4, dtype=torch.bool)), TypeError, "targets"),
        (lambda: l3k.cross_entropy(torch.ones(4, 7), torch.zeros(5, dtype=torch.long)), ValueError, "targets"),
        (lambda: l3k.cross_entropy(torch.ones(4, 7), torch.tensor([0, 1, 7, 2])), ValueError, "targets"),
        (
            lambda: l3k.cross_entropy(torch.ones(4, 7, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
            TypeError,
            "logits",
        ),  # fmt: skip
        (lambda: l3k.cross_entropy(torch.ones(4, 0), torch.zeros(4, dtype=torch.long)), ValueError, "logits"),
        (
            lambda: l3k.cross_entropy(torch.ones(4, 7), torch.zeros(4, dtype=torch.long), reduction="avg"),
            ValueError,
            "reduction",
        ),  # fmt: skip
    ],
)
def test_cross_entropy_bad_inputs(call, exc, name):
    with pytest.raises(exc, match=rf"^{name}:"):
        call()


# ---------------------------------------------------------------------------------------------- rope
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_shape", ["per_batch", "shared"])
def test_rope_matches_real_arithmetic(gen, dtype, rot_shape):
    """Values against fp64 real arithmetic on the interleaved pairs; gradient = the inverse rotation of dy."""
    b, s, h, d = 2, 5, 3, 8
    x = randn(gen, b, s, h, d, dtype=dtype).requires_grad_()
    angles = randn(gen, *((b, s) if rot_shape == "per_batch" else (s,)), d // 2, dtype=torch.float64) * 3
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    y = l3k.rope(x, rot)
    pairs = x.detach().double().view(b, s, h, d // 2, 2)
    c, sn = angles.cos().expand(b, s, d // 2)[:, :, None], angles.sin().expand(b, s, d // 2)[:, :, None]
    want = torch.stack([pairs[..., 0] * c - pairs[..., 1] * sn, pairs[..., 0] * sn + pairs[..., 1] * c], -1)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-6, rtol=2**-8)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, want.flatten(-2), **tol)
    dy = randn(gen, b, s, h, d, dtype=dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    g = dy.double().view(b, s, h, d // 2, 2)
    inverse = torch.stack([g[..., 0] * c + g[..., 1] * sn, -g[..., 0] * sn + g[..., 1] * c], -1)
    assert_close(dx, inverse.flatten(-2), **tol)


def test_rope_takes_strided_heads_views(gen):
    """The fused projection's q and k heads: a view with token stride (Hq + 2 Hkv) D, against fp64 real arithmetic."""
    qkv = randn(gen, 2, 5, 4 + 2 * 2, 8)
    angles = randn(gen, 5, 4, dtype=torch.float64)
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    view = qkv[:, :, :6]
    pairs = view.double().unflatten(-1, (4, 2))
    c, sn = angles.cos()[:, None], angles.sin()[:, None]  # [5, 1, 4] against [2, 5, 6, 4]
    want = torch.stack([pairs[..., 0] * c - pairs[..., 1] * sn, pairs[..., 0] * sn + pairs[..., 1] * c], -1)
    assert_close(l3k.rope(view, rot), want.flatten(-2), atol=1e-6, rtol=1e-5)


def test_rope_opcheck(gen):
    x = randn(gen, 7, 3, 8)
    rot_pairs = torch.view_as_real(torch.polar(torch.ones(7, 4), randn(gen, 7, 4)))
    torch.library.opcheck(rope_rotate_op, (x.requires_grad_(), rot_pairs, False))
    torch.library.opcheck(rope_rotate_op, (x.detach(), rot_pairs, True))


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: l3k.rope(torch.ones(2, 3, 4, 7), torch.ones(3, 3, dtype=torch.complex64)), ValueError, "x"),
        (lambda: l3k.rope(torch.ones(2, 3, 4, 8), torch.ones(3, 4)), TypeError, "rot"),
        (lambda: l3k.rope(torch.ones(2, 3, 4, 8), torch.ones(5, 4, dtype=torch.complex64)), ValueError, "rot"),
        (lambda: l3k.rope(torch.ones(2, 3, 4, 8, dtype=torch.long), torch.ones(3, 4)), TypeError, "x"),
        (
            lambda: l3k.rope(torch.ones(2, 3, 4, 8), torch.ones(3, 4, dtype=torch.complex64, requires_grad=True)),
            ValueError,
            "rot",
        ),
    ],
)
def test_rope_bad_inputs(call, exc, name):
    with pytest.raises(exc, match=rf"^{name}:"):
        call()
