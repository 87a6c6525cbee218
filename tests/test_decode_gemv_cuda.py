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
