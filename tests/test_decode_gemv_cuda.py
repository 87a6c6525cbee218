"""The decode GEMV (csrc/gemm/decode_gemv.cu) with its three prologues against fp64 math, on an H100.

Tolerance, per element: |y - ref| <= 2^-8·|ref| + 2^-12·Σ_k |a_k·w_nk| + 2^-7·max_k |a_k·w_nk|, ref in fp64 from
the reference's `a` (the norm or SwiGLU output rounded to the dtype, as the unfused ops hand it to the GEMM).
2^-8·|ref| covers the output's rounding (half a bf16 ulp, 2^-9); the other two terms cover elements of `a` that
round to the neighbouring value where the kernel's fp32 rstd or fast exp differs from the reference in the last
bit (a few per row, each moving its product by one ulp of a, 2^-8 relative) and the fp32 sums (K·2^-24·Σ|a w|
at most). A CPU simulation of these inputs found the bound catches a dropped or repeated 8-element chunk and a
1% scale error at every K tested, while allowing 16 one-ulp flips a row; it cannot see eps. Also caught: a wrong
row or token, and unwritten outputs (NaN-poisoned by a direct launch).
"""

import pytest
import torch

from llama3_kernels import reference
from llama3_kernels.ops import linear
from llama3_kernels.ops._common import DTYPE_CODES, has_kernel, kernel, ptr, sm_count, stream
from llama3_kernels.ops.rope import rope_kv_cache

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _need() -> None:
    if not has_kernel("decode_gemv"):
        pytest.skip("_C.decode_gemv was not built")


def _inputs(m, n, k, prologue, dtype, gen, residual=True):
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device="cuda", dtype=dtype)

    x = randn(m, 2 * k if prologue == linear.SWIGLU else k, scale=2.0)
    w = randn(n, k, scale=0.05)
    res = randn(m, k) if prologue == linear.RMS_NORM and residual else None
    g = (1 + randn(k, scale=0.5)) if prologue == linear.RMS_NORM else None
    return x, w, res, g


def _a(x, k, res, g, prologue):
    """The GEMM input `a` as the unfused ops produce it (rounded to the dtype), and h."""
    if prologue == linear.RMS_NORM:
        a, h, _ = reference.rms_norm(x, g, 1e-5, res)
        return a, h
    if prologue == linear.SWIGLU:
        return reference.swiglu(x[:, :k], x[:, k : 2 * k]), None
    return x, None


def _launch(x, w, res, g, prologue):
    """The raw launcher into NaN-poisoned y and h."""
    m, (n, k) = x.shape[0], w.shape
    y = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
    h = torch.full((m, k), float("nan"), dtype=x.dtype, device="cuda") if res is not None else None
    kernel("decode_gemv")(
        ptr(x), x.stride(0), ptr(res), ptr(g), ptr(h), 1e-5, prologue, ptr(w), ptr(y), m, n, k,
        DTYPE_CODES[x.dtype], sm_count(0), stream(x),
    )  # fmt: skip
    torch.cuda.synchronize()
    return y, h


def _assert_close(y, a, w, seed):
    ref = a.double() @ w.double().t()
    products = a.double().abs()[:, None, :] * w.double().abs()[None, :, :]  # [M, N, K]
    bound = 2.0**-8 * ref.abs() + 2.0**-12 * products.sum(-1) + 2.0**-7 * products.amax(-1)
    err = (y.double() - ref).abs()
    assert not y.isnan().any(), f"unwritten or NaN outputs (seed {seed})"
    assert (err <= bound).all(), f"max error / bound {(err / bound).max().item():.3g} (seed {seed})"


@pytest.mark.parametrize("prologue", [linear.NONE, linear.RMS_NORM, "rms_norm without residual", linear.SWIGLU])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(37, 760), (3072, 2048), (2048, 8192), (16, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_gemv(prologue, m, n, k, dtype, gen):
    """Odd N (a last warp with one live row), K not a multiple of the 32-lane step, M·K·2 of exactly 48 KB (M = 3,
    K = 8192: the shared-memory opt-in) and past it; rms_norm without a residual is the first layer's path."""
    _need()
    residual = prologue != "rms_norm without residual"
    prologue = linear.RMS_NORM if not residual else prologue
    x, w, res, g = _inputs(m, n, k, prologue, dtype, gen, residual)
    y, h = _launch(x, w, res, g, prologue)
    a, h_ref = _a(x, k, res, g, prologue)
    _assert_close(y, a, w, gen.initial_seed())
    if h_ref is not None:
        assert torch.equal(h, h_ref)


@pytest.mark.parametrize("n,k", [(128256, 2048), (16384, 2048)])
def test_decode_gemv_llama_shapes(n, k, gen):
    """The 1B model's LM head (the largest decode GEMV) and fused w1|w3, with the norm prologue."""
    _need()
    x, w, res, g = _inputs(1, n, k, linear.RMS_NORM, torch.bfloat16, gen)
    y, h = _launch(x, w, res, g, linear.RMS_NORM)
    a, h_ref = _a(x, k, res, g, linear.RMS_NORM)
    _assert_close(y, a, w, gen.initial_seed())
    assert torch.equal(h, h_ref)


def test_public_ops_run_the_kernel_on_strided_rows(gen):
    """A [B, 1, K] decode activation and a gate-up view with row stride > 2F reach the kernel (profiler)."""
    _need()
    x, w, res, g = _inputs(2, 64, 256, linear.RMS_NORM, torch.bfloat16, gen)
    wide = torch.randn(2, 3 * 256, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y, h = linear.rms_norm_linear(x.view(2, 1, 256), g, 1e-5, w, residual=res.view(2, 1, 256))
        y2 = linear.swiglu_linear(wide[:, : 2 * 256], w)  # row stride 768: the first 512 columns
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if "decode_gemv_kernel" in e.key)
    assert launches == 2
    a, h_ref = _a(x, 256, res, g, linear.RMS_NORM)
    _assert_close(y.view(2, 64), a, w, gen.initial_seed())
    assert torch.equal(h.view(2, 256), h_ref)
    a2, _ = _a(wide[:, : 2 * 256], 256, None, None, linear.SWIGLU)
    _assert_close(y2, a2, w, gen.initial_seed())


# ------------------------------------------------------------------ the q/k/v GEMV with RoPE + KV cache epilogue
def _need_qkv() -> None:
    _need()
    if not has_kernel("decode_gemv_rope_cache"):
        pytest.skip("_C.decode_gemv_rope_cache was not built")


def _qkv_case(b, s, hq, hkv, d, k, length, dtype, gen, residual=True, bad_row=None):
    """Inputs of rms_norm_qkv_rope_cache; positions are distinct slots per row (row `bad_row` one past the cache)."""
    m = b * s
    x, w, res, g = _inputs(m, (hq + 2 * hkv) * d, k, linear.RMS_NORM, dtype, gen, residual)
    angles = torch.rand(b, s, d // 2, generator=gen) * 600
    rot = torch.polar(torch.ones_like(angles), angles).to("cuda")
    positions = torch.stack([torch.randperm(length, generator=gen)[:s] for _ in range(b)])
    if bad_row is not None:
        positions[bad_row] = length
    return x, w, res, g, rot, positions.to("cuda")


def _qkv_fused(x, w, res, g, rot, positions, hq, length, hkv, d):
    """The fused launcher into NaN-poisoned q, h and caches [B + 1, L, Hkv, D]."""
    (b, s), (m, k) = positions.shape, x.shape
    q = torch.full((b, s, hq, d), float("nan"), dtype=x.dtype, device="cuda")
    h = torch.full((m, k), float("nan"), dtype=x.dtype, device="cuda") if res is not None else None
    kc, vc = (torch.full((b + 1, length, hkv, d), float("nan"), dtype=x.dtype, device="cuda") for _ in range(2))
    kernel("decode_gemv_rope_cache")(
        ptr(x), x.stride(0), ptr(res), ptr(g), ptr(h), 1e-5, ptr(w), m, k, ptr(torch.view_as_real(rot)),
        ptr(positions), ptr(q), ptr(kc), ptr(vc), s, hq, hkv, d, length, kc.stride(0), kc.stride(1), vc.stride(0),
        vc.stride(1), DTYPE_CODES[x.dtype], sm_count(0), stream(x),
    )  # fmt: skip
    torch.cuda.synchronize()
    return q, h, kc, vc


def _qkv_unfused(x, w, res, g, rot, positions, hq, length, hkv, d):
    """The two kernels it fuses: the decode GEMV (rms_norm prologue), then rope_kv_cache, into NaN-poisoned caches."""
    b, s = positions.shape
    y, h = _launch(x, w, res, g, linear.RMS_NORM)
    kc, vc = (torch.full((b + 1, length, hkv, d), float("nan"), dtype=x.dtype, device="cuda") for _ in range(2))
    q = rope_kv_cache(y.view(b, s, -1), rot, positions, kc, vc, hq)
    torch.cuda.synchronize()
    return q, h, kc, vc


def _same_bits(a, b):
    return (
        a is None and b is None or (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(7), b.nan_to_num(7)))
    )


@pytest.mark.parametrize(
    "b,s,hq,hkv,d,k,length",
    [(1, 1, 32, 8, 64, 2048, 4096), (1, 1, 32, 8, 128, 4096, 300), (2, 2, 4, 2, 8, 760, 19), (1, 3, 12, 4, 128, 256, 77),
     (4, 1, 8, 1, 64, 512, 33), (3, 1, 9, 3, 64, 576, 50)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [True, False])
def test_qkv_rope_cache_epilogue_equals_the_two_kernels(b, s, hq, hkv, d, k, length, dtype, residual, gen):
    """Bit for bit what decode_gemv + rope_kv_cache write (each checked against fp64 / the reference in its own
    tests): q, h, and every cache slot, written or (NaN-poisoned) left alone. Shapes: the 1B and 8B layers, D = 8
    (a warp's pair spans a whole head's quarter), M = 4 tokens as 2 x 2, 1 x 3 and 4 x 1, SmolLM2's 9/3 heads."""
    _need_qkv()
    args = _qkv_case(b, s, hq, hkv, d, k, length, dtype, gen, residual)
    fused = _qkv_fused(*args, hq, length, hkv, d)
    unfused = _qkv_unfused(*args, hq, length, hkv, d)
    assert not fused[0].isnan().any(), "unwritten q"
    for name, mine, theirs in zip(("q", "h", "k_cache", "v_cache"), fused, unfused):
        assert _same_bits(mine, theirs), f"{name} differs from the unfused kernels (seed {gen.initial_seed()})"
    written = (~fused[2].isnan()).all(-1).all(-1).sum().item()
    assert written == b * s  # one slot per token, nothing else


def test_qkv_rope_cache_out_of_range_position(gen):
    """A position past the cache: that token's q is NaN and its row writes nothing, as rope_kv_cache does."""
    _need_qkv()
    b, s, hq, hkv, d, k, length = 2, 2, 4, 2, 64, 256, 16
    args = _qkv_case(b, s, hq, hkv, d, k, length, torch.bfloat16, gen, bad_row=1)
    fused = _qkv_fused(*args, hq, length, hkv, d)
    q, _, kc, vc = fused
    assert q[1].isnan().all() and not q[0].isnan().any()
    assert kc[1].isnan().all() and vc[1].isnan().all() and not kc[0, args[-1][0]].isnan().any()
    assert all(_same_bits(a, b) for a, b in zip(fused, _qkv_unfused(*args, hq, length, hkv, d)))


def test_qkv_rope_cache_op_is_one_kernel(gen, monkeypatch):
    """The public op runs the fused kernel alone (no rope_kv_cache launch); L3K_DECODE_GEMV=0 runs the unfused
    ops instead, with the same values."""
    _need_qkv()
    b, s, hq, hkv, d, k, length = 1, 1, 32, 8, 64, 2048, 64
    x, w, res, g, rot, positions = _qkv_case(b, s, hq, hkv, d, k, length, torch.bfloat16, gen)
    x3, r3 = x.view(b, s, k), res.view(b, s, k)
    runs = []
    for switch in ("1", "0"):
        monkeypatch.setenv("L3K_DECODE_GEMV", switch)
        kc, vc = (torch.zeros(b, length, hkv, d, dtype=x.dtype, device="cuda") for _ in range(2))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            q, h = linear.rms_norm_qkv_rope_cache(x3, g, 1e-5, w, rot, positions, kc, vc, hq, residual=r3)
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages()]
        runs.append((q, h, kc, vc, names))
    (q1, h1, kc1, vc1, names1), (q0, h0, kc0, vc0, names0) = runs
    assert any("decode_gemv_kernel" in n for n in names1) and not any("rope_kv_cache" in n for n in names1)
    assert not any("decode_gemv_kernel" in n for n in names0)
    assert torch.equal(h1, h0)
    eps = torch.finfo(torch.bfloat16).eps  # the unfused path's GEMM is cuBLAS: the sums may round differently
    for mine, theirs in ((q1, q0), (kc1, kc0), (vc1, vc0)):
        torch.testing.assert_close(mine.float(), theirs.float(), atol=4 * eps * float(theirs.abs().max()), rtol=0)


def test_switched_off_runs_the_unfused_ops(gen, monkeypatch):
    """L3K_DECODE_GEMV=0 (what bench/device_check.sh sets when this kernel fails its gate): same values, no kernel."""
    _need()
    monkeypatch.setenv("L3K_DECODE_GEMV", "0")
    x, w, res, g = _inputs(1, 64, 256, linear.RMS_NORM, torch.bfloat16, gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y, _ = linear.rms_norm_linear(x, g, 1e-5, w, residual=res)
        torch.cuda.synchronize()
    assert not any("decode_gemv_kernel" in e.key for e in prof.key_averages())
    _assert_close(y, _a(x, 256, res, g, linear.RMS_NORM)[0], w, gen.initial_seed())


def test_fallbacks(gen):
    """More than 4 rows, fp32, or K past the shared-memory limit: the unfused ops, same values."""
    _need()
    x, w, _, g = _inputs(5, 64, 256, linear.RMS_NORM, torch.bfloat16, gen)
    y, _ = linear.rms_norm_linear(x, g, 1e-5, w)
    _assert_close(y, _a(x, 256, None, g, linear.RMS_NORM)[0], w, gen.initial_seed())
    xf, wf = x[:1].float(), w.float()
    torch.testing.assert_close(linear.decode_linear(xf, wf), xf @ wf.t())
    big_k = 4 * 28672  # M·K·2 = 229 KB > 160 KB
    xb = torch.randn(1, big_k, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(16, big_k, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    _assert_close(linear.decode_linear(xb, wb), xb, wb, gen.initial_seed())


@pytest.mark.parametrize(
    "change,arg",
    [
        (dict(k=12), "K"),
        (dict(m=5), "M"),
        (dict(prologue=3), "prologue"),
        (dict(x_stride=100), "x_stride"),
        (dict(norm_w=0, prologue=1), "norm_w"),
        (dict(dtype=0), "dtype"),
        (dict(num_sms=0), "num_sms"),
    ],
)
def test_bad_arguments_name_it(change, arg, gen):
    _need()
    x, w, _, _ = _inputs(1, 16, 256, linear.NONE, torch.bfloat16, gen)
    y = torch.empty(1, 16, dtype=torch.bfloat16, device="cuda")
    args = dict(x=ptr(x), x_stride=256, residual=0, norm_w=0, h_out=0, eps=1e-5, prologue=0, w=ptr(w), y=ptr(y),
                m=1, n=16, k=256, dtype=DTYPE_CODES[torch.bfloat16], num_sms=sm_count(0), stream=stream(x))  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        kernel("decode_gemv")(**args)
