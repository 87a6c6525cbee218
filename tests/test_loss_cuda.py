"""The cross-entropy kernels (csrc/norm/cross_entropy.cu) against the fp32 reference, on an H100.

Run: `pytest -q tests/test_loss_cuda.py` (the launcher argument checks at the end need only the built extension).

Tolerances:
- loss and lse are fp32 in both, from the same 16-bit logits; they differ by the order of the fp32 sums and by the
  kernel's __expf (a few ulps times |logit - max|, ~3e-6 relative for logits of N(0, 4²)), so |Δ| <= 1e-4 against
  values of ~12-25. Dropping one 4096-wide tile of a 128256 vocabulary moves the lse by ~0.03.
- dlogits are the same fp32 values rounded once to the logits' dtype: one ulp (rtol = eps) where a value sits on a
  rounding boundary; atol 1e-7 · max|grad| for the fp32 noise of values near 0.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import llama3_kernels as l3k
from llama3_kernels import reference
from llama3_kernels.ops import _common

CUDA = "cuda"
cuda = pytest.mark.cuda
LAUNCHERS = ("cross_entropy_fwd", "cross_entropy_bwd")
# (M, V): Llama 3's vocabulary, SmolLM2's, odd widths (scalar loads), many short rows, 4-wide vectors
SHAPES = [(1, 128256), (37, 49152), (199, 259), (4097, 1003), (5, 4100), (64, 128256)]


def _ran_kernels(fn) -> set[str]:
    """Which of this file's kernels fn launched (the op may fall back to the reference without saying so)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {name for name in LAUNCHERS for e in prof.key_averages() if name in e.key}


def need_kernels() -> None:
    for name in LAUNCHERS:
        assert _common.has_kernel(name), f"llama3_kernels._C was built without {name}: the test would test nothing"
    assert _common.is_sm90(torch.cuda.current_device()), "kernels run on sm_90 only: ops elsewhere take the references"


def inputs(gen, m, v, dtype, pad=0):
    """Logits N(0, 4²) in `dtype` (row stride v + pad), targets with every 7th row ignored (-100)."""
    x = (torch.randn(m, v + pad, generator=gen) * 4).to(dtype).to(CUDA)[:, :v]
    t = torch.randint(0, v, (m,), generator=gen)
    t[::7] = -100
    return x, t.to(CUDA)


def launch(x, t, ignore_index=-100, loss=None, lse=None):
    m, v = x.shape
    loss = torch.full((m,), math.nan, device=CUDA) if loss is None else loss
    lse = torch.full((m,), math.nan, device=CUDA) if lse is None else lse
    _common.kernel("cross_entropy_fwd")(
        x.data_ptr(), x.stride(0), t.data_ptr(), loss.data_ptr(), lse.data_ptr(), m, v, ignore_index,
        _common.DTYPE_CODES[x.dtype], _common.sm_count(0), _common.stream(x),
    )  # fmt: skip
    return loss, lse


def launch_bwd(g, x, t, lse, ignore_index=-100):
    m, v = x.shape
    d = torch.full((m, v), math.nan, dtype=x.dtype, device=CUDA)  # poisoned: every element must be written
    _common.kernel("cross_entropy_bwd")(
        g.data_ptr(), x.data_ptr(), x.stride(0), t.data_ptr(), lse.data_ptr(), d.data_ptr(), m, v, ignore_index,
        _common.DTYPE_CODES[x.dtype], _common.sm_count(0), _common.stream(x),
    )  # fmt: skip
    return d


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(gen, shape, dtype):
    need_kernels()
    m, v = shape
    x, t = inputs(gen, m, v, dtype, pad=3 if m == 37 else 0)  # 37 rows: strided, no vector width but 1
    loss, lse = launch(x, t)
    ref_loss, ref_lse = reference.cross_entropy(x.cpu(), t.cpu(), -100)
    assert not loss.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-4, rtol=0)
    assert torch.all(loss.cpu()[::7] == 0)
    g = torch.randn(m, generator=gen).to(CUDA)
    d = launch_bwd(g, x, t, lse)
    ref = reference.cross_entropy_backward(g.cpu(), x.cpu(), t.cpu(), ref_lse, -100).float()
    assert not d.isnan().any()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(d.cpu().float(), ref, rtol=eps, atol=1e-7 * float(g.abs().max()))
    assert torch.all(d.cpu()[::7] == 0)


@cuda
@pytest.mark.parametrize("v", [128256, 4100, 1003])  # 8-, 4-wide and scalar loads
def test_row_max_at_either_end_counts(v):
    """A dominant logit in the first or the last column (the edges of the vector and tile loops) sets the lse."""
    need_kernels()
    x = torch.zeros(2, v, dtype=torch.bfloat16, device=CUDA)
    x[0, 0], x[1, v - 1] = 30.0, 30.0
    loss, lse = launch(x, torch.tensor([0, 1], device=CUDA))
    want = 30.0 + math.log1p((v - 1) * math.exp(-30.0))
    assert lse.cpu().tolist() == pytest.approx([want, want], abs=1e-5)
    assert loss[0].item() == pytest.approx(want - 30.0, abs=1e-5) and loss[1].item() == pytest.approx(want, abs=1e-5)


@cuda
def test_bad_targets_give_nan_and_masked_logits_do_not():
    need_kernels()
    x = torch.zeros(4, 4096, dtype=torch.bfloat16, device=CUDA)
    x[2, 100:] = -math.inf  # a masked vocabulary: only 100 classes left
    t = torch.tensor([1, 4096, 99, -5], device=CUDA)
    loss, lse = launch(x, t)
    assert loss[0].item() == pytest.approx(math.log(4096), abs=1e-4)
    assert loss[2].item() == pytest.approx(math.log(100), abs=1e-4)
    assert loss[1].isnan() and loss[3].isnan()
    d = launch_bwd(torch.ones(4, device=CUDA), x, t, lse)
    assert d[1].isnan().all() and d[3].isnan().all()
    assert torch.all(d[2, 100:] == 0) and not d[2].isnan().any()


@cuda
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_op_matches_torch(gen, reduction):
    """Through the op and autograd, as the trainer calls it, against F.cross_entropy on fp32 logits."""
    need_kernels()
    x, t = inputs(gen, 2 * 300, 128256, torch.bfloat16)
    x = x.view(2, 300, -1).requires_grad_()
    t = t.view(2, 300)
    assert _ran_kernels(lambda: l3k.cross_entropy(x, t, reduction=reduction).sum().backward()) == set(LAUNCHERS)
    x.grad = None
    got = l3k.cross_entropy(x, t, reduction=reduction)
    xf = x.detach().float().requires_grad_()
    want = F.cross_entropy(xf.flatten(0, 1), t.flatten(), reduction=reduction)
    want = want.view(2, 300) if reduction == "none" else want
    torch.testing.assert_close(got, want, atol=1e-4 * (600 if reduction == "sum" else 1), rtol=1e-6)
    got.sum().backward()
    want.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), xf.grad, rtol=2.0**-7, atol=1e-8)


# ------------------------------------------------------------------ launcher argument checks (no GPU)
needs_ext = pytest.mark.skipif(not all(_common.has_kernel(n) for n in LAUNCHERS), reason="_C without cross_entropy")
_F = 16 * 1024  # a fake, aligned, nonzero address: validation rejects the call before any launch


@needs_ext
@pytest.mark.parametrize(
    "name,args,arg",
    [
        ("cross_entropy_fwd", (_F, 64, _F, _F, _F, 4, 64, -100, 0, 8, 0), "dtype"),  # fp32 logits
        ("cross_entropy_fwd", (_F, 32, _F, _F, _F, 4, 64, -100, 2, 8, 0), "row_stride"),
        ("cross_entropy_fwd", (_F, 64, _F, _F, _F, 4, 0, -100, 2, 8, 0), "V"),
        ("cross_entropy_fwd", (_F, 64, _F, _F, _F, -1, 64, -100, 2, 8, 0), "M"),
        ("cross_entropy_fwd", (0, 64, _F, _F, _F, 4, 64, -100, 2, 8, 0), "logits"),
        ("cross_entropy_fwd", (_F, 64, 0, _F, _F, 4, 64, -100, 2, 8, 0), "targets"),
        ("cross_entropy_fwd", (_F, 64, _F, 0, _F, 4, 64, -100, 2, 8, 0), "loss"),
        ("cross_entropy_fwd", (_F, 64, _F, _F, _F, 4, 64, -100, 2, 0, 0), "num_sms"),
        ("cross_entropy_bwd", (_F, _F, 64, _F, 0, _F, 4, 64, -100, 2, 8, 0), "lse"),
        ("cross_entropy_bwd", (0, _F, 64, _F, _F, _F, 4, 64, -100, 2, 8, 0), "grad"),
        ("cross_entropy_bwd", (_F, _F, 64, _F, _F, 0, 4, 64, -100, 2, 8, 0), "dlogits"),
    ],
)
def test_launcher_rejects_bad_arguments(name, args, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        getattr(_common._C, name)(*args)


@cuda
def test_switched_off_runs_the_reference(gen, monkeypatch):
    """L3K_CROSS_ENTROPY=0 (what bench/device_check.sh sets when these tests fail in its gate): no kernel, same loss."""
    need_kernels()
    monkeypatch.setenv("L3K_CROSS_ENTROPY", "0")
    x, t = inputs(gen, 37, 1003, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        loss = l3k.cross_entropy(x, t, reduction="none")
        torch.cuda.synchronize()
    assert not any("cross_entropy" in e.key for e in prof.key_averages())
    torch.testing.assert_close(loss.cpu(), reference.cross_entropy(x.cpu(), t.cpu(), -100)[0])
