"""The training RoPE kernel (rope_rotate in csrc/attention/rope_cache.cu) against the fp32 reference, on an H100.

Run: `pytest -q tests/test_rope_cuda.py` (the launcher argument checks at the end need only the built extension).
Tolerance: the kernel and the reference round the same fp32 rotation once to the 16-bit dtype; the kernel's
fused multiply-adds can move the fp32 value by an fp32 ulp, which flips a rounding at a boundary: one ulp of the
dtype (rtol = atol = eps), as for rope_kv_cache. A wrong pair, sign or angle is off by O(1).
"""

import math

import pytest
import torch

import llama3_kernels as l3k
from llama3_kernels import reference
from llama3_kernels.ops import _common

CUDA = "cuda"
cuda = pytest.mark.cuda
HALF = (torch.bfloat16, torch.float16)


def need_kernel() -> None:
    assert _common.has_kernel("rope_rotate"), "llama3_kernels._C was built without rope_rotate: nothing to test"
    assert _common.is_sm90(torch.cuda.current_device()), "kernels run on sm_90 only: ops elsewhere take the references"


def rotation(gen, tokens: int, d: int) -> torch.Tensor:
    """complex64 [tokens, D/2]: angles up to 600 rad, as long contexts give the fast pairs."""
    angles = torch.rand(tokens, d // 2, generator=gen) * 600
    return torch.polar(torch.ones_like(angles), angles).to(CUDA)


@cuda
@pytest.mark.parametrize("shape", [(1, 32, 64), (37, 8, 128), (15, 4, 8), (8192, 32, 64), (4097, 8, 64)])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("inverse", [False, True])
def test_launcher_matches_reference(gen, shape, dtype, inverse):
    """Into a NaN-poisoned output: every element written, each within one rounding of the reference."""
    need_kernel()
    t, h, d = shape
    x = torch.randn(t, h, d, generator=gen).to(CUDA, dtype)
    rot = rotation(gen, t, d)
    out = torch.full_like(x, math.nan)
    _common.kernel("rope_rotate")(
        x.data_ptr(), x.stride(0), torch.view_as_real(rot).data_ptr(), out.data_ptr(), t, h, d, inverse,
        _common.DTYPE_CODES[dtype], _common.sm_count(0), _common.stream(x),
    )  # fmt: skip
    ref = reference.rope_rotate(x, rot, inverse)
    eps = torch.finfo(dtype).eps
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=eps)


@cuda
@pytest.mark.parametrize("dtype", HALF)
def test_op_on_fused_qkv_heads_and_its_gradient(gen, dtype):
    """Through the op as the model calls it: the q and k heads of a fused projection (a strided view), rot shared by
    the batch; the gradient is the inverse rotation of dy."""
    need_kernel()
    b, s, hq, hkv, d = 2, 300, 8, 2, 64
    qkv = torch.randn(b, s, hq + 2 * hkv, d, generator=gen).to(CUDA, dtype).requires_grad_()
    rot = rotation(gen, s, d)
    qk = qkv[:, :, : hq + hkv]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = l3k.rope(qk, rot)
        torch.cuda.synchronize()
    assert any("rope_rotate" in e.key for e in prof.key_averages()), "the strided view fell back to the reference"
    ref = reference.rope_rotate(qk.detach(), rot.expand(b, s, d // 2), False)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), rtol=eps, atol=eps)
    dy = torch.randn(y.shape, generator=gen).to(CUDA, dtype)
    (grad,) = torch.autograd.grad(y, qkv, dy)
    want = reference.rope_rotate(dy, rot.expand(b, s, d // 2), True)
    torch.testing.assert_close(grad[:, :, : hq + hkv].float(), want.float(), rtol=eps, atol=eps)
    assert torch.all(grad[:, :, hq + hkv :] == 0)


@cuda
def test_switched_off_runs_the_reference(gen, monkeypatch):
    """L3K_ROPE=0 (what bench/device_check.sh sets when these tests fail in its gate): no kernel, the same values."""
    need_kernel()
    monkeypatch.setenv("L3K_ROPE", "0")
    x = torch.randn(37, 8, 64, generator=gen).to(CUDA, torch.bfloat16)
    rot = rotation(gen, 37, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = l3k.rope(x, rot)
        torch.cuda.synchronize()
    assert not any("rope_rotate" in e.key for e in prof.key_averages())
    assert torch.equal(y, reference.rope_rotate(x, rot, False))


# ------------------------------------------------------------------ launcher argument checks (no GPU)
_F = 16 * 1024  # a fake, aligned, nonzero address: validation rejects the call before any launch


@pytest.mark.skipif(not _common.has_kernel("rope_rotate"), reason="_C without rope_rotate")
@pytest.mark.parametrize(
    "args,arg",
    [
        ((_F, 256, _F, _F, 4, 4, 64, False, 0, 8, 0), "dtype"),
        ((_F, 256, _F, _F, 4, 4, 60, False, 2, 8, 0), "d"),
        ((_F, 256, _F, _F, 4, 0, 64, False, 2, 8, 0), "heads"),
        ((_F, 255, _F, _F, 4, 4, 64, False, 2, 8, 0), "x_row_stride"),
        ((_F, 128, _F, _F, 4, 4, 64, False, 2, 8, 0), "x_row_stride"),
        ((_F, 256, _F, _F, -1, 4, 64, False, 2, 8, 0), "tokens"),
        ((_F + 8, 256, _F, _F, 4, 4, 64, False, 2, 8, 0), "x"),
        ((_F, 256, 0, _F, 4, 4, 64, False, 2, 8, 0), "rot"),
        ((_F, 256, _F, 0, 4, 4, 64, False, 2, 8, 0), "out"),
        ((_F, 256, _F, _F, 4, 4, 64, False, 2, 0, 0), "num_sms"),
    ],
)
def test_launcher_rejects_bad_arguments(args, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        _common._C.rope_rotate(*args)
