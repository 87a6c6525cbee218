"""FP8 row-wise GEMM kernel (csrc/gemm/fp8_rowwise.cu) against reference.fp8_rowwise_mm, on an H100.

Tolerance, per element: |y - ref| <= rtol·|ref| + 2^-11·(|xq|·|wq|ᵀ)·x_scale·w_scale, ref the unrounded fp32
reference. e4m3 × e4m3 products are exact in fp32, so the kernel differs from the reference only by
(1) the final rounding to the output type, at most half an ulp: rtol = 2^-8 for bf16, 2^-11 for fp16; and
(2) how the products are summed. Hopper's FP8 wgmma accumulator keeps ~14 bits (DeepSeek-V3 §3.3.2 measured
≤ 2% relative error over a whole K = 4096 without promotion); CUTLASS promotes it into fp32 every 128-long k-tile,
which scales that error down by the much smaller partial sums, to ~1e-4 of Σ|products| at most, fp32 sums
adding less still: 2^-11 (4.9e-4) of Σ|products| keeps a margin over that. Failures this still catches: a
dropped or repeated k-tile (an error of ~sqrt(128) products: over the bound on most elements), a swapped
or misindexed scale (scales spread over 16×), a missing bias, and unwritten tiles (outputs are NaN-poisoned).
"""

import pytest
import torch

from llama3_kernels import reference
from llama3_kernels.ops import fp8_rowwise_mm
from llama3_kernels.ops._common import has_kernel, kernel
from llama3_kernels.ops.gemm import fp8_rowwise_mm_fwd

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        torch.cuda.is_available() and not has_kernel("fp8_rowwise_mm"),
        reason="llama3_kernels._C was built without fp8_rowwise_mm",
    ),
]

# (N, K) of the bench: Llama 3 8B qkv, o, w13 (w1|w3 fused), w2; 70B w13, w2; 405B w13, w2.
SHAPES_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
SHAPES_70B = [(57344, 8192), (8192, 28672)]
SHAPES_405B = [(106496, 16384), (16384, 53248)]
MS = [1, 3, 16, 37, 128, 1000, 1024]
RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ACC_TOL = 2.0**-11
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """The reference must run true fp32 matmuls on the GPU, not TF32."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _quantized(rows: int, k: int, std: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 data whose scales spread over 16× (a swapped or misindexed scale cannot pass)."""
    spread = torch.exp2(torch.randint(-2, 3, (rows, 1), generator=g, device="cuda").float())
    x = torch.randn(rows, k, generator=g, device="cuda") * std * spread
    return reference.quantize_fp8_rowwise(x)


def _problem(m: int, n: int, k: int, with_bias: bool, gen: torch.Generator):
    g = torch.Generator(device="cuda").manual_seed(gen.initial_seed())
    xq, x_scale = _quantized(m, k, 1.0, g)
    wq, w_scale = _quantized(n, k, 0.02, g)
    bias = torch.randn(n, generator=g, device="cuda") if with_bias else None
    return xq, x_scale, wq, w_scale, bias


def _launch(xq, x_scale, wq, w_scale, bias, out_dtype):
    """The raw launcher into a NaN-poisoned output: every element the kernel forgets stays NaN."""
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
    kernel("fp8_rowwise_mm")(
        xq.data_ptr(), x_scale.data_ptr(), wq.data_ptr(), w_scale.data_ptr(),
        0 if bias is None else bias.data_ptr(), -1 if bias is None else DTYPE_CODE[bias.dtype],
        y.data_ptr(), m, n, k, DTYPE_CODE[out_dtype], torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    return y


def _assert_close(y, xq, x_scale, wq, w_scale, bias, seed):
    ref = reference.fp8_rowwise_mm(xq, x_scale, wq, w_scale, bias, torch.float32)
    absdot = (xq.float().abs() @ wq.float().abs().t()) * x_scale[:, None] * w_scale[None, :]
    err = (y.float() - ref).abs()
    bound = RTOL[y.dtype] * ref.abs() + ACC_TOL * absdot
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        pytest.fail(
            f"seed {seed}: {int(bad.sum())} of {bad.numel()} elements off, first y[{i}, {j}] = {y[i, j].item()} "
            f"vs ref {ref[i, j].item()} (bound {bound[i, j].item():.3g}); max err/bound "
            f"{(err / bound).nan_to_num(float('inf')).max().item():.3g}"
        )


def _check(m, n, k, out_dtype, with_bias, gen):
    xq, x_scale, wq, w_scale, bias = _problem(m, n, k, with_bias, gen)
    y = _launch(xq, x_scale, wq, w_scale, bias, out_dtype)
    torch.cuda.synchronize()
    _assert_close(y, xq, x_scale, wq, w_scale, bias, gen.initial_seed())


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES_8B)
def test_8b_shapes(n, k, m, out_dtype, with_bias, gen):
    _check(m, n, k, out_dtype, with_bias, gen)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 37, 1024])
@pytest.mark.parametrize("n,k", SHAPES_70B)
def test_70b_shapes(n, k, m, with_bias, gen):
    _check(m, n, k, torch.bfloat16, with_bias, gen)


@pytest.mark.parametrize("m", [1, 300])
@pytest.mark.parametrize("n,k", SHAPES_405B)
def test_405b_shapes(n, k, m, gen):
    """Full-size 405B weights (1.7 G elements for w13): ~40 GB of fp32 temporaries in data and reference."""
    _check(m, n, k, torch.bfloat16, m == 1, gen)
    torch.cuda.empty_cache()


@pytest.mark.parametrize("m", [1, 16, 17, 64, 65, 199, 256, 257, 2048 + 7])
@pytest.mark.parametrize("n,k", [(16, 16), (1136, 208), (48, 4112), (4096 + 16, 4096 + 48)])
def test_odd_shapes(n, k, m, gen):
    """N, K multiples of 16 but not of the tiles (TMA fills and clips the residues), M across every threshold."""
    _check(m, n, k, torch.bfloat16, m % 2 == 1, gen)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n,k", [(16, 16), (48, 4112), (2048, 8192 + 16), (4096 + 16, 14336)])
def test_decode_gemv_every_m(n, k, m, gen):
    """The decode GEMV (M <= 4; 5 is the first CUTLASS size): K tails past the 512-byte warp step, one CTA's
    16 rows and partial last CTAs, with and without bias, both output dtypes."""
    _check(m, n, k, torch.bfloat16 if m % 2 else torch.float16, m >= 3, gen)


@pytest.mark.parametrize("swizzle,raster", [("1", "heuristic"), ("2", "m"), ("4", "n"), ("8", "m")])
def test_prefill_scheduler_knobs(swizzle, raster, gen, monkeypatch):
    """The tile-order settings bench/sweep_gemm.py tries change which CTA takes which tile, never the values."""
    monkeypatch.setenv("L3K_GEMM_SWIZZLE", swizzle)
    monkeypatch.setenv("L3K_GEMM_RASTER", raster)
    _check(2048 + 7, 4096 + 16, 4096, torch.bfloat16, True, gen)


def test_prefill_pingpong_tiles(gen, monkeypatch):
    """L3K_GEMM_PREFILL_TILE=pingpong (a sweep setting) runs large M on the 64 x 128 ping-pong tiles: same values."""
    monkeypatch.setenv("L3K_GEMM_PREFILL_TILE", "pingpong")
    assert kernel("fp8_rowwise_mm_config")(8192, 4096, 4096).startswith("mid_")
    _check(2048 + 7, 4096 + 16, 4096, torch.bfloat16, True, gen)


@pytest.mark.parametrize(
    "name,value", [("L3K_GEMM_SWIZZLE", "3"), ("L3K_GEMM_RASTER", "diagonal"), ("L3K_GEMM_PREFILL_TILE", "wide")]
)
def test_bad_scheduler_knob_names_it(name, value, gen, monkeypatch):
    monkeypatch.setenv(name, value)
    xq, x_scale, wq, w_scale, bias = _problem(300, 256, 256, False, gen)
    with pytest.raises(ValueError, match=name):
        _launch(xq, x_scale, wq, w_scale, bias, torch.bfloat16)


def test_every_config_is_exercised():
    """The M values above reach every row of the config table."""
    pick = kernel("fp8_rowwise_mm_config")
    names = {pick(m, 4096, 4096) for m in MS}
    assert len(names) == 5, names
    assert {pick(m, 4096, 4096) for m in (4, 5, 16, 17, 64, 65, 256, 257)} == names


def test_public_op_batched_bias_dtypes(gen):
    """Through fp8_rowwise_mm: [..., K] input, a bf16 bias (converted to fp32 for the epilogue), fresh outputs."""
    xq, x_scale, wq, w_scale, _ = _problem(2 * 37, 4096 + 16, 1024, False, gen)
    bias = torch.randn(wq.shape[0], device="cuda").to(torch.bfloat16)
    y = fp8_rowwise_mm(xq.view(2, 37, -1), x_scale.view(2, 37), wq, w_scale, bias, torch.bfloat16)
    assert y.shape == (2, 37, wq.shape[0]) and y.dtype == torch.bfloat16
    _assert_close(y.view(74, -1), xq, x_scale, wq, w_scale, bias, gen.initial_seed())
    empty = fp8_rowwise_mm(xq[:0], x_scale[:0], wq, w_scale)
    assert empty.shape == (0, wq.shape[0])


def test_op_off_16_takes_the_reference(gen):
    """The custom op called directly with N off 16 (the public function refuses it) runs the reference."""
    xq, x_scale, wq, w_scale, bias = _problem(3, 40, 64, True, gen)
    y = fp8_rowwise_mm_fwd(xq, x_scale, wq, w_scale, bias, torch.bfloat16)
    torch.testing.assert_close(y, reference.fp8_rowwise_mm(xq, x_scale, wq, w_scale, bias, torch.bfloat16))


def test_opcheck(gen):
    xq, x_scale, wq, w_scale, bias = _problem(5, 64, 128, True, gen)
    # opcheck's schema test compares inputs with allclose, which float8 does not support (CUDA or CPU)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fp8_rowwise_mm_fwd, (xq, x_scale, wq, w_scale, bias, torch.bfloat16), test_utils=utils)


@pytest.mark.parametrize(
    "change,arg",
    [
        ({"k": 24}, "K"),
        ({"k": 0}, "K"),
        ({"n": 8}, "N"),
        ({"m": -1}, "M"),
        ({"out_dtype": 0}, "out_dtype"),
        ({"out_dtype": 7}, "out_dtype"),
        ({"bias_dtype": 2}, "bias"),
        ({"xq": 1}, "xq"),
        ({"wq": 8}, "wq"),
        ({"x_scale": 4}, "x_scale"),
        ({"w_scale": 4}, "w_scale"),
        ({"y": 2}, "y"),
        ({"bias": 4}, "bias"),
    ],
)
def test_bad_inputs_name_the_argument(change, arg, gen):
    """Misaligned pointers (offset by the byte count given), bad sizes and dtypes raise ValueError naming the arg."""
    m, n, k = 4, 32, 64
    xq, x_scale, wq, w_scale, bias = _problem(m, n, k, True, gen)
    y = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
    args = {
        "xq": xq.data_ptr(), "x_scale": x_scale.data_ptr(), "wq": wq.data_ptr(), "w_scale": w_scale.data_ptr(),
        "bias": bias.data_ptr(), "bias_dtype": 0, "y": y.data_ptr(), "m": m, "n": n, "k": k, "out_dtype": 2,
        "stream": torch.cuda.current_stream().cuda_stream,
    }  # fmt: skip
    for key, value in change.items():
        args[key] = args[key] + value if key in ("xq", "wq", "x_scale", "w_scale", "y", "bias") else value
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        kernel("fp8_rowwise_mm")(**args)


def test_empty_m_launches_nothing():
    kernel("fp8_rowwise_mm")(0, 0, 0, 0, 0, -1, 0, 0, 4096, 4096, 2, 0)
