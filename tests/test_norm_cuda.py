"""The norm family's CUDA kernels (RMSNorm, SwiGLU, FP8 row-wise quantization) against the fp32 CPU references.

Run on an H100: `pytest -q -m cuda tests/test_norm_cuda.py` (the launcher argument checks at the end need only the
built extension, no GPU). Every GPU test checks first that the compiled launcher exists, so a build without
`_C` fails here instead of silently testing the reference fallback.

Tolerances, per output kind:
- 16-bit outputs (y, dx, dgate, ...): kernel and reference round fp32 values that differ only by the order of fp32
  sums (~1e-6 relative), so the kernel is within one unit in the last place of its dtype of the fp32 reference:
  rtol = finfo(dtype).eps bounds one ulp at any magnitude (half for the rounding, the rest for fp32 noise).
  Backward dx subtracts two O(1) terms, so its absolute fp32 noise is relative to the row's scale: atol =
  1e-5 * max|ref| (fp32 noise is ~1e-6; a wrong kernel is off by O(1)).
- h = x + residual is one fp32 add rounded once in both: bit-equal.
- rstd and dW are fp32 sums in another order: rtol 1e-5 (rstd, ~sqrt(32) fp32 ulps of a sum) and, for dW summed
  over M rows, atol = 1e-5 * max|ref| on top of the dtype's rtol.
- FP8 scales: equal to 1e-6 relative (the amax differs only through fp32 noise in rstd or sigmoid);
  quantize_fp8_rowwise does the reference's exact operations, so its scales and bytes are bit-equal.
- FP8 bytes of the fused forms: at most one e4m3 step apart, on at most 0.1% of the elements (a step flips only
  when a value sits within ~1e-6 of a rounding boundary).
"""

import math

import pytest
import torch

import llama3_kernels as l3k
from llama3_kernels import reference
from llama3_kernels.ops import _common
from llama3_kernels.ops.norm import rms_norm_bwd

LAUNCHERS = (
    "rms_norm_fwd", "rms_norm_bwd", "rms_norm_fp8_fwd", "swiglu_fwd", "swiglu_bwd", "swiglu_fp8_fwd",
    "quantize_fp8_rowwise",
)  # fmt: skip
HALF = (torch.bfloat16, torch.float16)
E4M3 = torch.float8_e4m3fn
CUDA = "cuda"
cuda = pytest.mark.cuda

# (M, N): single row, odd counts, the Llama widths, a width with no vector divisor (scalar path, wider than the
# registers hold), and very wide rows that spill past the registers into the re-read path.
NORM_SHAPES = [(1, 760), (37, 1128), (199, 4096), (37, 8192), (4097, 1128), (37, 5001), (199, 16384), (4, 65536)]
SWIGLU_SHAPES = [(1, 760), (37, 1128), (199, 14336), (37, 5001), (4, 28672)]


def need_kernel(name: str) -> None:
    assert _common.has_kernel(name), f"llama3_kernels._C was built without {name}: the CUDA tests would test nothing"
    assert _common.is_sm90(torch.cuda.current_device()), "kernels run on sm_90 only: ops elsewhere take the references"


def randn(gen, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """Fresh random data, generated on the CPU (reproducible from the test's seed) and moved to the GPU."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(CUDA)


def strided(gen, m: int, n: int, dtype, pad: int) -> torch.Tensor:
    """[m, n] view with row stride n + pad (pad 3 leaves no vector width but 1 for 16-bit rows)."""
    x = randn(gen, m, n + pad, dtype=dtype)[:, :n]
    assert x.stride() == (n + pad, 1)
    return x


def assert_16bit_close(out: torch.Tensor, ref32: torch.Tensor, dtype, atol: float = 1e-6, msg: str = "") -> None:
    assert out.dtype == dtype, f"{msg}: dtype {out.dtype}, expected {dtype}"
    out = out.cpu().float()
    assert not out.isnan().any(), f"{msg}: NaN in the output"
    torch.testing.assert_close(out, ref32.float(), rtol=torch.finfo(dtype).eps, atol=atol, msg=msg or None)


def e4m3_steps(q: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes as signed step counts from zero (sign-magnitude → ordinal), so adjacent values differ by 1."""
    b = q.cpu().view(torch.uint8).to(torch.int32)
    mag = b & 0x7F
    return torch.where(b >= 0x80, -mag, mag)


def assert_fp8_close(q, scale, q_ref, scale_ref, exact: bool, msg: str = "") -> None:
    q, scale = q.cpu(), scale.cpu()
    assert q.dtype == E4M3 and scale.dtype == torch.float32, msg
    assert torch.equal(scale.isnan(), scale_ref.isnan()), f"{msg}: NaN scales differ"
    if exact:
        assert torch.equal(scale.nan_to_num(), scale_ref.nan_to_num()), f"{msg}: scales differ"
    else:
        torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0.0, equal_nan=True, msg=msg or None)
    nan, nan_ref = q.float().isnan(), q_ref.float().isnan()
    assert torch.equal(nan, nan_ref), f"{msg}: NaN bytes differ ({int((nan != nan_ref).sum())} elements)"
    steps = (e4m3_steps(q) - e4m3_steps(q_ref))[~nan].abs()
    worst = int(steps.max()) if steps.numel() else 0
    if exact:
        assert worst == 0, f"{msg}: {int((steps != 0).sum())} bytes differ"
    else:
        assert worst <= 1, f"{msg}: bytes up to {worst} e4m3 steps apart"
        assert int((steps != 0).sum()) <= max(2, steps.numel() // 1000), f"{msg}: {int((steps != 0).sum())} differ"


def cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


# ------------------------------------------------------------------------------------------- RMSNorm
@cuda
@pytest.mark.parametrize("m,n", NORM_SHAPES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("w_fp32", [True, False], ids=["w32", "w16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_fwd(gen, m, n, dtype, w_fp32, with_residual):
    need_kernel("rms_norm_fwd")
    x = randn(gen, m, n, dtype=dtype, scale=2.0)
    r = randn(gen, m, n, dtype=dtype) if with_residual else None
    w = randn(gen, n, dtype=torch.float32 if w_fp32 else dtype)
    y_ref, h_ref, rstd_ref = reference.rms_norm(*cpu(x, w), 1e-5, *cpu(r))
    y32 = h_ref.float() if with_residual else x.cpu().float()
    y32 = y32 * rstd_ref[:, None] * w.cpu().float()  # the reference's fp32 y before its rounding
    out = l3k.rms_norm(x, w, 1e-5, residual=r)
    y, h = out if with_residual else (out, None)
    assert_16bit_close(y, y32, dtype, msg="y")
    if with_residual:
        assert torch.equal(h.cpu(), h_ref), "h = x + residual must be bit-equal to the reference"
    _, _, rstd = torch.ops.llama3_kernels.rms_norm_fwd(x, w, r, 1e-5)
    torch.testing.assert_close(rstd.cpu(), rstd_ref, rtol=1e-5, atol=0.0)


@cuda
@pytest.mark.parametrize("pad", [8, 3])
@pytest.mark.parametrize("dtype", HALF)
def test_rms_norm_strided_rows(gen, pad, dtype):
    need_kernel("rms_norm_fwd")
    m, n = 37, 1128
    x, r = strided(gen, m, n, dtype, pad), strided(gen, m, n, dtype, pad + 8)
    w = randn(gen, n, dtype=torch.bfloat16)
    y, h = l3k.rms_norm(x, w, 1e-6, residual=r)
    _, h_ref, rstd_ref = reference.rms_norm(*cpu(x, w), 1e-6, r.cpu())
    assert torch.equal(h.cpu(), h_ref)
    assert_16bit_close(y, h_ref.float() * rstd_ref[:, None] * w.cpu().float(), dtype, msg="y")


@cuda
@pytest.mark.parametrize(
    "m,n", [(1, 760), (37, 1128), (199, 4096), (37, 5001), (199, 16384), (37, 65536), (4097, 5001)]
)  # 4097 rows: more rows than row groups, so dW accumulates over several rows in registers and in the partials
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_dh", [False, True], ids=["plain", "dh"])
def test_rms_norm_bwd(gen, m, n, dtype, w_dtype, with_dh):
    need_kernel("rms_norm_bwd")
    h, dy = randn(gen, m, n, dtype=dtype, scale=2.0), randn(gen, m, n, dtype=dtype)
    dh = randn(gen, m, n, dtype=dtype) if with_dh else None
    w = randn(gen, n, dtype=w_dtype)
    _, _, rstd = reference.rms_norm(h.cpu(), w.cpu(), 1e-5)
    dx, dw = rms_norm_bwd(dy, h, w, rstd.to(CUDA), dh)
    # The reference's fp32 dx and dw before their rounding.
    hf, g = h.cpu().float(), dy.cpu().float() * w.cpu().float()
    xhat = hf * rstd[:, None]
    dx32 = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if with_dh:
        dx32 = dx32 + dh.cpu().float()
    dw32 = (dy.cpu().float() * xhat).sum(0)
    assert_16bit_close(dx, dx32, dtype, atol=1e-5 * float(dx32.abs().max()), msg="dx")
    assert dw.dtype == w_dtype and not dw.isnan().any()
    rtol = 1e-5 if w_dtype == torch.float32 else torch.finfo(w_dtype).eps
    torch.testing.assert_close(dw.cpu().float(), dw32, rtol=rtol, atol=1e-5 * float(dw32.abs().max()))


@cuda
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_autograd(gen, with_residual):
    """Gradients through the public function vs autograd of an fp32 formula on the CPU (same 16-bit inputs)."""
    need_kernel("rms_norm_bwd")
    m, n, dtype = 37, 1128, torch.bfloat16
    x, w = randn(gen, m, n, dtype=dtype), randn(gen, n, dtype=torch.float32)
    r = randn(gen, m, n, dtype=dtype) if with_residual else None
    dy = randn(gen, m, n, dtype=dtype)
    leaves = [t.requires_grad_() for t in (x, w, r) if t is not None]
    out = l3k.rms_norm(x, w, 1e-5, residual=r)
    (out[0] if with_residual else out).backward(dy)

    xc, wc = x.detach().cpu().float().requires_grad_(), w.detach().cpu().requires_grad_()
    rc = r.detach().cpu().float().requires_grad_() if with_residual else None
    hc = xc + rc if with_residual else xc
    yc = hc * torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + 1e-5) * wc
    yc.backward(dy.cpu().float())
    # The CUDA path rounds h to bf16 before normalizing and dx once; fp32 autograd does neither: 2 bf16 ulps.
    scale = float(xc.grad.abs().max())
    torch.testing.assert_close(x.grad.cpu().float(), xc.grad, rtol=2 * 2**-8, atol=2**-8 * scale)
    torch.testing.assert_close(w.grad.cpu(), wc.grad, rtol=2 * 2**-8, atol=2**-8 * float(wc.grad.abs().max()))
    if with_residual:
        torch.testing.assert_close(r.grad, x.grad, rtol=0, atol=0)  # h = x + r: both receive dh
    assert all(t.grad is not None for t in leaves)


@cuda
@pytest.mark.parametrize("m,n", NORM_SHAPES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_fp8(gen, m, n, dtype, with_residual):
    need_kernel("rms_norm_fp8_fwd")
    x = randn(gen, m, n, dtype=dtype, scale=3.0)
    x[m // 2] = 0  # a zero row: scale 1/(448*512), q exactly 0
    r = randn(gen, m, n, dtype=dtype) if with_residual else None
    if r is not None:
        r[m // 2] = 0
    w = randn(gen, n, dtype=torch.float32)
    # amax_ub 1200 leaves every row's amax (~10) unbounded: the scale follows the row; amax_ub 2 bounds every
    # non-zero row: the bounded scale and the ±448 saturation.
    for amax_ub in (1200.0, 2.0):
        q_ref, s_ref, h_ref = reference.rms_norm_fp8(*cpu(x, w), 1e-5, *cpu(r), amax_ub=amax_ub)
        out = l3k.rms_norm_fp8(x, w, 1e-5, residual=r, amax_ub=amax_ub)
        assert_fp8_close(out[0], out[1], q_ref, s_ref, exact=False, msg=f"rms_norm_fp8, amax_ub {amax_ub}")
        assert float(out[1][m // 2]) == float(s_ref[m // 2]) and not out[0][m // 2].float().any(), "zero row"
        if with_residual:
            assert torch.equal(out[2].cpu(), h_ref)


# -------------------------------------------------------------------------------------------- SwiGLU
@cuda
@pytest.mark.parametrize("m,f", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_swiglu_fwd_bwd(gen, m, f, dtype, fused):
    need_kernel("swiglu_fwd")
    need_kernel("swiglu_bwd")
    if fused:
        gu = randn(gen, m, 2 * f, dtype=dtype, scale=2.0).requires_grad_()
        gate, up = gu[:, :f], gu[:, f:]
        y = l3k.swiglu(gu)
    else:
        gate, up = (randn(gen, m, f, dtype=dtype, scale=2.0).requires_grad_() for _ in range(2))
        y = l3k.swiglu(gate, up)
    dy = randn(gen, m, f, dtype=dtype)
    y.backward(dy)
    g32, u32, d32 = gate.detach().cpu().float(), up.detach().cpu().float(), dy.cpu().float()
    s = torch.sigmoid(g32)
    assert_16bit_close(y, g32 * s * u32, dtype, msg="y")
    dgate, dup = (gu.grad[:, :f], gu.grad[:, f:]) if fused else (gate.grad, up.grad)
    dgate32 = d32 * u32 * s * (1.0 + g32 * (1.0 - s))  # 1 + g(1 - s) cancels near g = -1.28: atol
    assert_16bit_close(dgate, dgate32, dtype, atol=1e-5 * float(dgate32.abs().max()), msg="dgate")
    assert_16bit_close(dup, d32 * g32 * s, dtype, msg="dup")


@cuda
@pytest.mark.parametrize("m,f", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_swiglu_fp8(gen, m, f, dtype, fused):
    need_kernel("swiglu_fp8_fwd")
    gu = randn(gen, m, 2 * f, dtype=dtype, scale=3.0)
    gu[m // 2] = 0
    if m > 2:
        gu[0] *= 40  # amax above amax_ub: bounded scale, saturated bytes
    gate, up = gu[:, :f], gu[:, f:]
    q, scale = l3k.swiglu_fp8(gu) if fused else l3k.swiglu_fp8(gate.contiguous(), up.contiguous())
    q_ref, s_ref = reference.swiglu_fp8(*cpu(gate, up), amax_ub=1200.0)
    assert_fp8_close(q, scale, q_ref, s_ref, exact=False, msg="swiglu_fp8")
    assert float(scale[m // 2]) == float(s_ref[m // 2]) and not q[m // 2].float().any(), "zero row"


# ---------------------------------------------------------------------------------------- quantize
@cuda
@pytest.mark.parametrize("m,n", NORM_SHAPES + [(37, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pad", [0, 3], ids=["dense", "strided"])
def test_quantize_fp8_rowwise(gen, m, n, dtype, pad):
    """Same operations as the reference (exact amax, IEEE divisions, one rounding): bit-equal bytes and scales."""
    need_kernel("quantize_fp8_rowwise")
    x = strided(gen, m, n, dtype, pad) if pad else randn(gen, m, n, dtype=dtype)
    x.mul_(100.0)  # in place: a strided view stays strided
    if m > 2:
        x[1] = 0
        x[2] *= 1e-6  # a tiny row: the minimum scale, e4m3 subnormals
        x[0] *= 100.0  # amax far above the bound: saturation at ±448
    q, scale = l3k.quantize_fp8_rowwise(x, amax_ub=1200.0)
    q_ref, s_ref = reference.quantize_fp8_rowwise(x.cpu(), amax_ub=1200.0)
    assert_fp8_close(q, scale, q_ref, s_ref, exact=True, msg="quantize_fp8_rowwise")


# ------------------------------------------------------------------------------------ NaN and holes
@cuda
@pytest.mark.parametrize("op", ["rms_norm", "rms_norm_fp8", "swiglu", "swiglu_fp8", "quantize"])
def test_nan_propagates(gen, op):
    """A NaN input poisons its row (as in the reference) and no other: NaN never becomes a finite value."""
    m, n, dtype = 37, 1152, torch.bfloat16  # n / 2 * 2 bytes is a multiple of 16: the fused halves stay aligned
    x, w = randn(gen, m, n, dtype=dtype), randn(gen, n, dtype=torch.float32)
    x[5, 17] = float("nan")
    if op == "rms_norm":
        need_kernel("rms_norm_fwd")
        y, y_ref = l3k.rms_norm(x, w).cpu(), reference.rms_norm(*cpu(x, w), 1e-5)[0]
    elif op == "rms_norm_fp8":
        need_kernel("rms_norm_fp8_fwd")
        y, s = l3k.rms_norm_fp8(x, w)
        y, y_ref, s_ref = y.cpu().float(), *reference.rms_norm_fp8(*cpu(x, w), 1e-5)[:2]
        y_ref = y_ref.float()
        assert torch.equal(s.cpu().isnan(), s_ref.isnan()) and bool(s_ref[5].isnan())
    elif op == "swiglu":
        need_kernel("swiglu_fwd")
        y, y_ref = l3k.swiglu(x, x.flip(0)).cpu(), reference.swiglu(x.cpu(), x.flip(0).cpu())
    elif op == "swiglu_fp8":
        need_kernel("swiglu_fp8_fwd")
        y, s = l3k.swiglu_fp8(x)
        y, y_ref, s_ref = y.cpu().float(), *reference.swiglu_fp8(*cpu(x[:, : n // 2], x[:, n // 2 :]))
        y_ref = y_ref.float()
        assert torch.equal(s.cpu().isnan(), s_ref.isnan()) and bool(s_ref[5].isnan())
    else:
        need_kernel("quantize_fp8_rowwise")
        y, s = l3k.quantize_fp8_rowwise(x)
        y, y_ref, s_ref = y.cpu().float(), *reference.quantize_fp8_rowwise(x.cpu())
        y_ref = y_ref.float()
        assert torch.equal(s.cpu().isnan(), s_ref.isnan()) and bool(s_ref[5].isnan())
    assert y_ref.isnan().any(), "the reference must propagate the NaN for this test to mean anything"
    assert torch.equal(y.isnan(), y_ref.isnan())


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like t full of NaN (for e4m3: the NaN byte 0x7F)."""
    if t.dtype == E4M3:
        return torch.full(t.shape, 0x7F, dtype=torch.uint8, device=t.device).view(E4M3)
    return torch.full_like(t, float("nan"))


@cuda
@pytest.mark.parametrize("m,n", [(37, 1128), (37, 5001), (9, 65536)])
def test_launchers_write_every_output(gen, m, n):
    """Outputs pre-filled with NaN: after each launcher no NaN is left (every element and every row written)."""
    for name in LAUNCHERS:
        need_kernel(name)
    C, dt, sms, st = _common._C, torch.bfloat16, _common.sm_count(0), torch.cuda.current_stream().cuda_stream
    code = _common.DTYPE_CODES[dt]
    x, r, dy = (randn(gen, m, n, dtype=dt) for _ in range(3))
    w = randn(gen, n, dtype=torch.float32)
    y, h, dx = (_nan_like(x) for _ in range(3))
    rstd, scale = (torch.full((m,), float("nan"), device=CUDA) for _ in range(2))
    q = _nan_like(torch.empty(m, n, dtype=E4M3, device=CUDA))
    dw = _nan_like(w)
    p = _common.ptr

    C.rms_norm_fwd(p(x), n, p(r), n, p(w), 0, p(y), p(h), p(rstd), m, n, 1e-5, code, sms, st)
    for name, t in (("y", y), ("h", h), ("rstd", rstd)):
        assert not t.isnan().any(), f"rms_norm_fwd left {name} unwritten"
    # 4 partial rows: at most 4 row groups, each accumulating dW over several rows, in registers and (N 5001,
    # 65536: columns past the registers) in its partial row.
    partial = torch.full((4, n), float("nan"), device=CUDA)
    C.rms_norm_bwd(p(dy), p(h), p(w), 0, p(rstd), 0, p(dx), p(dw), p(partial), 4, m, n, code, sms, st)
    assert not dx.isnan().any() and not dw.isnan().any(), "rms_norm_bwd left dx or dw unwritten"
    ref_dx, ref_dw = reference.rms_norm_backward(*cpu(dy, h, w, rstd))
    assert_16bit_close(dx, ref_dx.float(), dt, atol=1e-5 * float(ref_dx.float().abs().max()), msg="dx")
    torch.testing.assert_close(dw.cpu(), ref_dw, rtol=1e-5, atol=1e-5 * float(ref_dw.abs().max()))

    C.rms_norm_fp8_fwd(p(x), n, 0, 0, p(w), 0, p(q), p(scale), 0, m, n, 1e-5, 1200.0, code, sms, st)
    assert not q.float().isnan().any() and not scale.isnan().any(), "rms_norm_fp8_fwd left q or scale unwritten"
    q.copy_(_nan_like(q))
    scale.fill_(float("nan"))
    C.quantize_fp8_rowwise(p(x), n, p(q), p(scale), m, n, 1200.0, code, sms, st)
    assert not q.float().isnan().any() and not scale.isnan().any(), "quantize_fp8_rowwise left q or scale unwritten"

    y.fill_(float("nan"))
    C.swiglu_fwd(p(x), n, p(r), n, p(y), m, n, code, sms, st)
    assert not y.isnan().any(), "swiglu_fwd left y unwritten"
    dx.fill_(float("nan"))
    h.fill_(float("nan"))
    C.swiglu_bwd(p(dy), p(x), n, p(r), n, p(dx), p(h), m, n, code, sms, st)
    assert not dx.isnan().any() and not h.isnan().any(), "swiglu_bwd left dgate or dup unwritten"
    q.copy_(_nan_like(q))
    scale.fill_(float("nan"))
    C.swiglu_fp8_fwd(p(x), n, p(r), n, p(q), p(scale), m, n, 1200.0, code, sms, st)
    assert not q.float().isnan().any() and not scale.isnan().any(), "swiglu_fp8_fwd left q or scale unwritten"
    torch.cuda.synchronize()


@cuda
@pytest.mark.parametrize("f", [5001, 764])
def test_swiglu_launchers_on_unaligned_fused_halves(gen, f):
    """The up half of a fused [M, 2F] tensor starts 2F bytes in: for F % 8 != 0 it is not 16-byte aligned, and the
    launchers narrow their vectors (F 764: 4-wide, 5001: 1). Called directly, and through the public op below."""
    for name in ("swiglu_fwd", "swiglu_bwd", "swiglu_fp8_fwd"):
        need_kernel(name)
    C, p, m, dt = _common._C, _common.ptr, 37, torch.bfloat16
    code, sms, st = _common.DTYPE_CODES[dt], _common.sm_count(0), torch.cuda.current_stream().cuda_stream
    gu, dy = randn(gen, m, 2 * f, dtype=dt, scale=2.0), randn(gen, m, f, dtype=dt)
    gate, up = gu[:, :f], gu[:, f:]
    y, dg, du = (_nan_like(dy) for _ in range(3))
    q, scale = _nan_like(torch.empty(m, f, dtype=E4M3, device=CUDA)), torch.full((m,), float("nan"), device=CUDA)
    C.swiglu_fwd(p(gate), 2 * f, p(up), 2 * f, p(y), m, f, code, sms, st)
    C.swiglu_bwd(p(dy), p(gate), 2 * f, p(up), 2 * f, p(dg), p(du), m, f, code, sms, st)
    C.swiglu_fp8_fwd(p(gate), 2 * f, p(up), 2 * f, p(q), p(scale), m, f, 1200.0, code, sms, st)
    g32, u32, d32 = gate.cpu().float(), up.cpu().float(), dy.cpu().float()
    s = torch.sigmoid(g32)
    assert_16bit_close(y, g32 * s * u32, dt, msg="y")
    dgate32 = d32 * u32 * s * (1.0 + g32 * (1.0 - s))
    assert_16bit_close(dg, dgate32, dt, atol=1e-5 * float(dgate32.abs().max()), msg="dgate")
    assert_16bit_close(du, d32 * g32 * s, dt, msg="dup")
    q_ref, s_ref = reference.swiglu_fp8(*cpu(gate, up), amax_ub=1200.0)
    assert_fp8_close(q, scale, q_ref, s_ref, exact=False, msg="swiglu_fp8")
    torch.testing.assert_close(l3k.swiglu(gu), y, atol=0, rtol=0)  # the public op takes this path too


@cuda
def test_ops_copy_what_launchers_cannot_read():
    """An expanded x (row stride 0), a strided weight or rstd and a transposed dy are copied by the ops, never
    misread or refused: results equal the same op on contiguous copies."""
    for name in ("rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "quantize_fp8_rowwise"):
        need_kernel(name)
    m, n, dt = 37, 1128, torch.bfloat16
    x = torch.randn(1, n, dtype=dt, device=CUDA).expand(m, n)
    w = torch.randn(2 * n, device=CUDA)[::2]
    assert x.stride(0) == 0 and w.stride(0) == 2
    assert torch.equal(l3k.rms_norm(x, w), l3k.rms_norm(x.contiguous(), w.contiguous()))
    assert torch.equal(l3k.swiglu(x, x), l3k.swiglu(x.contiguous(), x.contiguous()))
    q, s = l3k.quantize_fp8_rowwise(x)
    q_c, s_c = l3k.quantize_fp8_rowwise(x.contiguous())
    assert torch.equal(q.view(torch.uint8), q_c.view(torch.uint8)) and torch.equal(s, s_c)
    h = torch.randn(m, n, dtype=dt, device=CUDA)
    dy = torch.randn(n, m, dtype=dt, device=CUDA).t()
    rstd = (torch.rand(2 * m, device=CUDA) + 0.5)[::2]
    assert rstd.stride(0) == 2 and dy.stride() == (1, m)
    dx, dw = rms_norm_bwd(dy, h, w, rstd, None)
    dx_c, dw_c = rms_norm_bwd(dy.contiguous(), h, w.contiguous(), rstd.contiguous(), None)
    assert torch.equal(dx, dx_c) and torch.equal(dw, dw_c)


@cuda
def test_rms_norm_bwd_empty():
    need_kernel("rms_norm_bwd")
    w = torch.ones(1128, device=CUDA)
    h = torch.empty(0, 1128, dtype=torch.bfloat16, device=CUDA)
    dx, dw = rms_norm_bwd(h, h, w, torch.empty(0, device=CUDA), None)
    assert dx.shape == (0, 1128) and torch.equal(dw.cpu(), torch.zeros(1128))


# ------------------------------------------------------------------ launcher argument checks (no GPU)
needs_ext = pytest.mark.skipif(not all(_common.has_kernel(n) for n in LAUNCHERS), reason="_C without norm kernels")
_F = 16 * 1024  # a fake, aligned, nonzero address: validation rejects the call before any launch


@needs_ext
@pytest.mark.parametrize(
    "name,args,arg",
    [
        ("rms_norm_fwd", (_F, 64, 0, 0, _F, 0, _F, 0, _F, 4, 64, 1e-5, 0, 8, 0), "dtype"),  # fp32 activations
        ("rms_norm_fwd", (_F, 64, 0, 0, _F, 3, _F, 0, _F, 4, 64, 1e-5, 2, 8, 0), "weight_dtype"),
        ("rms_norm_fwd", (0, 64, 0, 0, _F, 0, _F, 0, _F, 4, 64, 1e-5, 2, 8, 0), "x"),
        ("rms_norm_fwd", (_F, 32, 0, 0, _F, 0, _F, 0, _F, 4, 64, 1e-5, 2, 8, 0), "x_row_stride"),
        ("rms_norm_fwd", (_F, 64, _F, 64, _F, 0, _F, 0, _F, 4, 64, 1e-5, 2, 8, 0), "h_out"),
        ("rms_norm_fwd", (_F, 64, 0, 0, _F, 0, _F, 0, _F, 4, 64, -1.0, 2, 8, 0), "eps"),
        ("rms_norm_fwd", (_F, 64, 0, 0, _F, 0, _F, 0, _F, 4, 0, 1e-5, 2, 8, 0), "N"),
        ("rms_norm_fwd", (_F, 64, 0, 0, _F, 0, _F, 0, _F, 4, 64, 1e-5, 2, 0, 0), "num_sms"),
        ("rms_norm_fp8_fwd", (_F, 64, 0, 0, _F, 0, _F, _F, 0, 4, 64, 1e-5, 0.0, 2, 8, 0), "amax_ub"),
        ("rms_norm_bwd", (_F, _F, _F, 0, _F, 0, _F, _F, _F, 0, 4, 64, 2, 8, 0), "partial_rows"),
        ("rms_norm_bwd", (_F, _F, _F, 0, _F, 0, _F, _F, 0, 8, 4, 64, 2, 8, 0), "dw_partial"),
        ("swiglu_fwd", (_F, 64, _F, 64, _F, -1, 64, 2, 8, 0), "M"),
        ("swiglu_fwd", (_F, 64, 0, 64, _F, 4, 64, 2, 8, 0), "up"),
        ("swiglu_bwd", (_F, _F, 32, _F, 64, _F, _F, 4, 64, 2, 8, 0), "gate_row_stride"),
        ("swiglu_fp8_fwd", (_F, 64, _F, 64, _F, _F, 4, 64, 1200.0, 5, 8, 0), "dtype"),
        ("quantize_fp8_rowwise", (_F, 64, _F, _F, 4, 64, 1200.0, 3, 8, 0), "dtype"),
        ("quantize_fp8_rowwise", (_F, 64, _F, 0, 4, 64, 1200.0, 2, 8, 0), "scale"),
    ],
)
def test_launcher_rejects_bad_arguments(name, args, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        getattr(_common._C, name)(*args)


def test_tolerance_helpers_catch_errors():
    """The fp8 comparison counts e4m3 steps: one step apart passes (rarely), two steps never do."""
    a = torch.tensor([1.0, 2.0, -3.0, 448.0]).to(E4M3)
    one = torch.tensor([1.125, 2.0, -3.0, 448.0]).to(E4M3)  # 1.0 → 1.125 is one e4m3 step
    two = torch.tensor([1.25, 2.0, -3.0, 448.0]).to(E4M3)
    s = torch.ones(1)
    assert int((e4m3_steps(one) - e4m3_steps(a)).abs().max()) == 1
    with pytest.raises(AssertionError):
        assert_fp8_close(two, s, a, s, exact=False)
    with pytest.raises(AssertionError):
        assert_fp8_close(one, s, a, s, exact=True)
    assert math.isclose(float(e4m3_steps(torch.tensor([-0.0]).to(E4M3))), 0.0)
