"""The kernels' own code run on this machine's CPU by the emulator (csrc/emu): no GPU needed.

The emulator executes each CUDA thread as a fiber, with ldmatrix, mma.sync and the shuffles computed from all 32
lanes' operands in the PTX fragment layouts; shared memory, cp.async destinations until their wait, and the outputs
the ops allocate read as NaN until written; deadlocks, divergent collectives, stray shared addresses and shared
memory above a kernel's opt-in are errors (csrc/emu/emu.h). It checks a kernel's logic (indexing, masking, split
and merge arithmetic, pipeline bookkeeping, what is written where), not its timing, races or global-memory bounds:
the H100 still has the last word (tests/*_cuda.py, bench/device_check.sh). The prefill attention and norm kernels passed on an H200 in
session 2: their rows here check the emulator itself against the references; the decode GEMV, the q/k/v RoPE + cache
epilogue, the cluster merge, the 3-stage decode ring and the cross-entropy kernels have not met a GPU yet.

Tolerances: outputs are 16-bit, so |kernel - fp32 reference| is judged against 2^-8 relative (one bf16 rounding)
plus the 16-bit rounding of the intermediates the kernels feed to the tensor cores (P, dS: a few 2^-8 relative
terms). The emulator's arithmetic is more exact than the GPU's (mma sums exactly and rounds once; host exp2f is
correctly rounded), so a bound that holds here is not proof it holds there: the GPU tests keep their own.
"""

from __future__ import annotations

import importlib

import emu
import pytest
import torch
from test_attention_cuda import _assert_within, _doc_offsets, _fp32_grads, _lowp_grads

from llama3_kernels import reference
from llama3_kernels.ops import attention, linear, loss, norm, quant
from llama3_kernels.ops._common import DTYPE_CODES, kernel, ptr

rope = importlib.import_module("llama3_kernels.ops.rope")  # the package's `rope` and `swiglu` are the functions
swiglu = importlib.import_module("llama3_kernels.ops.swiglu")

pytestmark = pytest.mark.skipif(emu.available() is not None, reason=f"emulator: {emu.available()}")


@pytest.fixture(scope="module", autouse=True)
def _emu_module(one_thread):
    emu.module()  # build once (cached under build/emu/)


def _randn(gen, *shape, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _pair_norm(x):
    """|(x[2i], x[2i+1])| at both elements of each pair: what a rotation keeps, so the scale of its rounding."""
    return x.float().unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, -1)


def _close_rotated(name, got, want, x):
    """A RoPE result against torch's: both round fp32 rotations to 16 bits, so they may differ by an output ulp
    (2^-8 relative) plus the fp32 rounding of terms as large as the pair's norm (a cancelling pair ends small)."""
    got, want = got.float(), want.float()
    assert not got.isnan().any(), f"{name}: NaN in the kernel's output"
    bound = 2**-8 * want.abs() + 2**-8 * _pair_norm(x) + 1e-6
    worst = ((got - want).abs() / bound).max().item()
    assert worst <= 1.0, f"{name}: {worst:.2f}x the bound"


def _close(name, got, want, atol, rtol):
    got, want = got.float(), want.float()
    assert not got.isnan().any(), f"{name}: NaN in the kernel's output (an unwritten element)"
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name}: max error {err.max().item():.3g}, {worst:.2f}x the bound"


# ------------------------------------------------------------------------------------- prefill attention
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])  # the dq kernel, or dQ fused into dkdv (atomics)
def test_flash_fwd_bwd(gen, d, causal, deterministic):
    b, s, sk, hq, hkv = 2, 77, 77, 4, 2
    q, k, v = _randn(gen, b, s, hq, d), _randn(gen, b, sk, hkv, d), _randn(gen, b, sk, hkv, d)
    scale = d**-0.5
    out, lse = emu.run(attention._flash_attn_fwd_cuda, q, k, v, None, None, s, sk, causal, scale)
    ro, rl = reference.flash_attention(q.float(), k.float(), v.float(), causal, scale, None, None)
    _close("out", out, ro, atol=4e-3, rtol=2e-2)
    _close("lse", lse, rl, atol=1e-4, rtol=0)
    dout = _randn(gen, b, s, hq, d)
    dq, dk, dv = emu.run(attention._flash_attn_bwd_cuda, dout, q, k, v, out, lse, None, None, s, sk, causal, scale,
                         deterministic)  # fmt: skip
    grads = reference.flash_attention_backward(dout.float(), q.float(), k.float(), v.float(), causal, scale, None, None)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        _close(name, got, want, atol=2e-2 * want.abs().max().item(), rtol=3e-2)


FUSED_TILINGS = ["1", "0"]  # L3K_BWD_TWO_MTILES: the D = 64 fused dQ with two key m-tiles a warp, or one


def _assert_bwd_within(gen, dout, q, k, v, out, lse, cu, cu_k, mq, mk, causal, scale, paths=(True, False)):
    """The emulated backward (the dq-kernel path, the fused-dQ path, or both) against the fp32 reference, within twice
    the error of the same math in the inputs' precision (as tests/test_attention_cuda.py judges the GPU's)."""
    refs = _fp32_grads(q, k, v, dout, causal, scale, cu, cu_k)
    lows = _lowp_grads(q, k, v, dout, causal, scale, cu, cu_k)
    for deterministic in paths:
        got = emu.run(attention._flash_attn_bwd_cuda, dout, q, k, v, out, lse, cu, cu_k, mq, mk, causal, scale,
                      deterministic)  # fmt: skip
        for name, g, ref, low in zip(("dq", "dk", "dv"), got, refs, lows):
            _assert_within(f"{name} (deterministic={deterministic})", g, ref, low, gen.initial_seed())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "sq,sk,causal",
    [(65, 65, False), (77, 150, True), (150, 77, True), (1, 65, False), (31, 184, True), (17, 300, False),
     (300, 129, True), (2, 1, False)],
)  # fmt: skip
@pytest.mark.parametrize("two_mtiles", FUSED_TILINGS)
def test_flash_bwd_partial_tiles(gen, dtype, sq, sk, causal, two_mtiles, monkeypatch):
    """Query and key lengths apart (bottom-right causal), partial last key tiles, short query tiles, and a query row
    with a very low lse (q against a nearly constant K): P = exp2(-lse) at the zero-filled key rows past the end
    would overflow fp16 if stored."""
    monkeypatch.setenv("L3K_BWD_TWO_MTILES", two_mtiles)
    hq, hkv, d = 2, 1, 64
    k = (1 + 0.1 * torch.randn(1, sk, hkv, d, generator=gen)).to(dtype)
    q, v, dout = _randn(gen, 1, sq, hq, d, dtype=dtype), _randn(gen, 1, sk, hkv, d, dtype=dtype), None
    q[0, 0] = -2.0
    dout = _randn(gen, 1, sq, hq, d, dtype=dtype)
    out, lse = emu.run(attention._flash_attn_fwd_cuda, q, k, v, None, None, sq, sk, causal, d**-0.5)
    # K nearly constant makes dQ = Σ dS K cancel: hence the low-precision yardstick, not a fixed tolerance
    _assert_bwd_within(gen, dout, q, k, v, out, lse, None, None, sq, sk, causal, d**-0.5)


@pytest.mark.parametrize("two_mtiles", FUSED_TILINGS)
def test_flash_bwd_varlen_empty_documents(gen, two_mtiles, monkeypatch):
    """Packed documents with their own key offsets: empty ones, one with queries and no keys, keys past queries."""
    monkeypatch.setenv("L3K_BWD_TWO_MTILES", two_mtiles)
    q_lens, k_lens = [0, 3, 90, 5, 0, 40], [4, 0, 130, 5, 0, 71]
    cu, cu_k = _doc_offsets(q_lens, "cpu"), _doc_offsets(k_lens, "cpu")
    hq, hkv, d = 8, 2, 64
    q, dout = _randn(gen, sum(q_lens), hq, d), _randn(gen, sum(q_lens), hq, d)
    k, v = _randn(gen, sum(k_lens), hkv, d), _randn(gen, sum(k_lens), hkv, d)
    mq, mk = max(q_lens), max(k_lens)
    out, lse = emu.run(attention._flash_attn_fwd_cuda, q, k, v, cu, cu_k, mq, mk, True, 0.125)
    _assert_bwd_within(gen, dout, q, k, v, out, lse, cu, cu_k, mq, mk, True, 0.125)


def test_flash_varlen(gen):
    lens = [5, 64, 1, 130]
    cu = _doc_offsets(lens, "cpu")
    t, hq, hkv, d = sum(lens), 4, 1, 64
    q, k, v = _randn(gen, t, hq, d), _randn(gen, t, hkv, d), _randn(gen, t, hkv, d)
    out, lse = emu.run(attention._flash_attn_fwd_cuda, q, k, v, cu, cu, max(lens), max(lens), True, 0.125)
    ro, rl = reference.flash_attention(q.float(), k.float(), v.float(), True, 0.125, cu, cu)
    _close("out", out, ro, atol=4e-3, rtol=2e-2)
    _close("lse", lse, rl, atol=1e-4, rtol=0)
    dout = _randn(gen, t, hq, d)
    grads = reference.flash_attention_backward(dout.float(), q.float(), k.float(), v.float(), True, 0.125, cu, cu)
    for deterministic in (True, False):
        got = emu.run(attention._flash_attn_bwd_cuda, dout, q, k, v, out, lse, cu, cu, max(lens), max(lens), True,
                      0.125, deterministic)  # fmt: skip
        for name, g, want in zip(("dq", "dk", "dv"), got, grads):
            _close(f"{name} (deterministic={deterministic})", g, want, atol=2e-2 * want.abs().max().item(), rtol=3e-2)


# ------------------------------------------------------------------------------------- decode attention
def _decode_case(gen, b, sq, hq, hkv, d, length):
    q, kc, vc = _randn(gen, b, sq, hq, d), _randn(gen, b, length, hkv, d), _randn(gen, b, length, hkv, d)
    lens = torch.randint(sq, length + 1, (b,), generator=gen)
    lens[0] = length
    if b > 1:
        lens[1] = sq + 2  # most of its splits see no key
    return q, kc, vc, lens.to(torch.int32)


def _decode_launch(q, kc, vc, lens, splits, cluster):
    b, sq, hq, d = q.shape
    hkv, length = kc.shape[2], kc.shape[1]
    out = torch.full_like(q, float("nan"))
    o_acc = torch.full((splits, b, sq, hq, d), float("nan"))
    lse_acc = torch.full((splits, b, sq, hq), float("nan"))
    with emu.emulated():
        kernel("decode_attn")(
            ptr(q), ptr(kc), ptr(vc), ptr(lens), ptr(out), ptr(o_acc), ptr(lse_acc), splits, cluster, b, sq, hq, hkv,
            d, length, kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), d**-0.5, DTYPE_CODES[q.dtype],
            emu.NUM_SMS, 0,
        )  # fmt: skip
    return out


# (b, sq, hq, hkv, d, length, splits): one token of a 4-head group (the few-row tile, 3-stage ring), five tokens of a
# 4-head group (20 rows: the many-row tile), the 1B decode shape's heads at D = 64, splits past the tiles
# (the full sequence's keys reach every split; the second sequence's splits are mostly empty)
DECODE_CASES = [
    (2, 1, 8, 2, 128, 300, 5),
    (2, 5, 8, 2, 64, 250, 4),
    (1, 1, 32, 8, 64, 520, 9),
    (1, 2, 4, 1, 128, 100, 2),
    (1, 1, 4, 4, 64, 1000, 16),
    (1, 1, 8, 2, 64, 1000, 2),  # 8 tiles a split: the decode ring wraps
    (2, 1, 4, 1, 128, 777, 3),
    (1, 3, 8, 2, 64, 500, 1),  # one split: no merge
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_attention_cluster_equals_combine(gen, case):
    """The cluster merge gives the combine kernel's bits, and both the reference's values."""
    b, sq, hq, hkv, d, length, splits = case
    q, kc, vc, lens = _decode_case(gen, b, sq, hq, hkv, d, length)
    combined = _decode_launch(q, kc, vc, lens, splits, False)
    clustered = _decode_launch(q, kc, vc, lens, splits, True)
    want = reference.decode_attention(q.float(), kc.float(), vc.float(), lens, d**-0.5)
    _close("combine path", combined, want, atol=4e-3, rtol=2e-2)
    assert torch.equal(clustered, combined), "the cluster merge differs from the combine kernel"


@pytest.mark.parametrize("cluster_switch", ["1", "0"])
def test_decode_attention_op(gen, cluster_switch, monkeypatch):
    """The op's own split choice, with the cluster merge allowed or switched off."""
    monkeypatch.setenv("L3K_DECODE_CLUSTER", cluster_switch)
    q, kc, vc, lens = _decode_case(gen, 2, 1, 8, 2, 64, 333)
    out = emu.run(attention._decode_attn_cuda, q, kc, vc, lens, 0.125)
    want = reference.decode_attention(q.float(), kc.float(), vc.float(), lens, 0.125)
    _close("out", out, want, atol=4e-3, rtol=2e-2)


# ------------------------------------------------------------------------------------- decode GEMV
def _gemv_ref(x, w, res, g, prologue, k):
    if prologue == linear.RMS_NORM:
        a, h, _ = reference.rms_norm(x, g, 1e-5, res)
    elif prologue == linear.SWIGLU:
        a, h = reference.swiglu(x[:, :k], x[:, k : 2 * k]), None
    else:
        a, h = x, None
    return a.double() @ w.double().T, a, h


@pytest.mark.parametrize("prologue", [linear.NONE, linear.RMS_NORM, linear.SWIGLU])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_decode_gemv(gen, prologue, m):
    n, k = 200, 264  # K not a multiple of the 256-element stride a warp covers
    x = _randn(gen, m, 2 * k if prologue == linear.SWIGLU else k, scale=2.0)
    w = _randn(gen, n, k, scale=0.05)
    res = _randn(gen, m, k) if prologue == linear.RMS_NORM else None
    g = (1 + _randn(gen, k, scale=0.5)) if prologue == linear.RMS_NORM else None
    y, h = emu.run(linear._decode_gemv_cuda, x, w, res, g, 1e-5, prologue)
    want, a, h_ref = _gemv_ref(x, w, res, g, prologue, k)
    mag = (a.double().abs() @ w.double().abs().T).float()  # Σ|a w|: covers one-ulp flips of a and the fp32 sums
    err = (y.double() - want).abs()
    assert not y.isnan().any()
    assert (err <= 2**-8 * want.abs() + 2**-10 * mag.double()).all(), f"y: max error {err.max().item():.3g}"
    if h_ref is not None:
        assert torch.equal(h, h_ref), "h (x + residual) differs from the reference's rounding"


def _rot_pairs(gen, pos, d):
    """RoPE tables as the kernels take them: [..., d/2, 2] fp32 (cos, sin) at random frequencies for `pos`."""
    angles = pos[..., None].double() * torch.rand(d // 2, generator=gen, dtype=torch.float64)
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).float().contiguous()


@pytest.mark.parametrize("b,s,hq,hkv,d", [(1, 1, 32, 8, 64), (2, 2, 4, 2, 128), (3, 1, 6, 3, 64)])
def test_decode_qkv_rope_cache_equals_unfused(gen, b, s, hq, hkv, d):
    """The q/k/v GEMV's RoPE + cache epilogue gives the bits of the GEMV followed by rope_kv_cache."""
    m, k, length = b * s, 96, 40
    n = (hq + 2 * hkv) * d
    x, w, res = _randn(gen, m, k), _randn(gen, n, k, scale=0.1), _randn(gen, m, k)
    g = 1 + _randn(gen, k, scale=0.5)
    pos = torch.randint(0, length - s, (b, 1), generator=gen) + torch.arange(s)
    rot = _rot_pairs(gen, pos, d)
    kc1, vc1 = (torch.full((b, length, hkv, d), float("nan"), dtype=torch.bfloat16) for _ in range(2))
    kc2, vc2 = kc1.clone(), vc1.clone()
    q1, h1 = emu.run(linear._decode_qkv_rope_cache_cuda, x, w, res, g, 1e-5, rot, pos, kc1, vc1, hq)
    y, h2 = emu.run(linear._decode_gemv_cuda, x, w, res, g, 1e-5, linear.RMS_NORM)
    q2 = emu.run(rope._rope_kv_cache_cuda, y.view(b, s, n), rot, pos, kc2, vc2, hq)
    assert not q1.isnan().any()
    assert torch.equal(q1, q2) and torch.equal(h1, h2)
    kc3, vc3 = kc1.clone(), vc1.clone()
    q3 = rope._reference(y.view(b, s, n), rot, pos, kc3, vc3, hq)  # torch's RoPE on the same GEMV output
    qkv = y.view(b, s, hq + 2 * hkv, d)
    _close_rotated("q", q1, q3, qkv[:, :, :hq])
    rows = torch.arange(b)[:, None]
    _close_rotated("k_cache", kc1[rows, pos], kc3[rows, pos], qkv[:, :, hq : hq + hkv])
    assert torch.equal(vc1.view(torch.int16), vc3.view(torch.int16)), "v_cache: v is copied, not rounded again"
    for name, got, want in (("k_cache", kc1, kc2), ("v_cache", vc1, vc2)):  # bits: the unwritten rows stay NaN
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name}: the writes differ"
        written = ~got.isnan().all(-1).all(-1)
        assert written.sum() == s * b, f"{name}: expected {b * s} token rows written, got {written.sum()}"


# ------------------------------------------------------------------------------------- norms, loss
def test_rms_norm_fwd_bwd(gen):
    x, res, w = _randn(gen, 37, 520), _randn(gen, 37, 520), 1 + _randn(gen, 520, scale=0.3)
    y, h, rstd = emu.run(norm._rms_norm_fwd_cuda, x, w, res, 1e-5)
    ry, rh, rr = reference.rms_norm(x, w, 1e-5, res)
    assert torch.equal(h, rh)
    _close("y", y, ry, atol=1e-2, rtol=2**-7)
    _close("rstd", rstd, rr, atol=0, rtol=1e-5)


def test_cross_entropy(gen):
    m, v = 9, 1000
    logits = _randn(gen, m, v, scale=3.0)
    targets = torch.randint(0, v, (m,), generator=gen)
    targets[2] = -100
    got_loss, got_lse = emu.run(loss._cross_entropy_fwd_cuda, logits, targets, -100)
    want_loss, want_lse = reference.cross_entropy(logits, targets, -100)
    _close("lse", got_lse, want_lse, atol=1e-4, rtol=1e-5)
    _close("loss", got_loss, want_loss, atol=1e-4, rtol=1e-5)
    grad = torch.rand(m, generator=gen)
    dlogits = emu.run(loss._cross_entropy_bwd_cuda, grad, logits, targets, got_lse, -100)
    want = (torch.softmax(logits.float(), -1) - torch.nn.functional.one_hot(targets.clamp(min=0), v)) * grad[:, None]
    want[2] = 0
    _close("dlogits", dlogits, want, atol=1e-6, rtol=2**-7)


def test_rms_norm_bwd(gen):
    dy, h, w = _randn(gen, 21, 776), _randn(gen, 21, 776), 1 + _randn(gen, 776, scale=0.3)
    dh = _randn(gen, 21, 776)
    _, _, rstd = reference.rms_norm(h, w, 1e-5, None)
    dx, dw = emu.run(norm._rms_norm_bwd_cuda, dy, h, w, rstd, dh)
    rdx, rdw = reference.rms_norm_backward(dy, h, w, rstd, dh)
    _close("dx", dx, rdx, atol=1e-2, rtol=2**-7)
    _close("dw", dw, rdw, atol=1e-2, rtol=2**-7)


def test_swiglu_fwd_bwd(gen):
    gate, up, dy = _randn(gen, 13, 1000, scale=3.0), _randn(gen, 13, 1000), _randn(gen, 13, 1000)
    _close("y", emu.run(swiglu._swiglu_fwd_cuda, gate, up), reference.swiglu(gate, up), atol=1e-5, rtol=2**-7)
    dgate, dup = emu.run(swiglu._swiglu_bwd_cuda, dy, gate, up)
    rdg, rdu = reference.swiglu_backward(dy, gate, up)
    _close("dgate", dgate, rdg, atol=1e-5, rtol=2**-7)
    _close("dup", dup, rdu, atol=1e-5, rtol=2**-7)


def _fp8_close(name, q, scale, want_q, want_scale):
    """e4m3 codes may sit one step from the reference's where the fp32 math differs in the last bit."""
    _close(f"{name} scale", scale, want_scale, atol=0, rtol=1e-6)
    _close(f"{name} q", q.float(), want_q.float(), atol=2**-9, rtol=2**-3)


def test_fp8_quantize_family(gen):
    x, res, w = _randn(gen, 11, 528, scale=200.0), _randn(gen, 11, 528), 1 + _randn(gen, 528, scale=0.3)
    x[3, 7] = 5000.0  # above the amax bound: clamps to 448
    q, scale = emu.run(quant._quantize_cuda, x, 1200.0)
    _fp8_close("quantize", q, scale, *reference.quantize_fp8_rowwise(x, 1200.0))
    q, scale, h = emu.run(norm._rms_norm_fp8_cuda, x, w, res, 1e-5, 1200.0)
    want_q, want_scale, want_h = reference.rms_norm_fp8(x, w, 1e-5, res, 1200.0)
    _fp8_close("rms_norm_fp8", q, scale, want_q, want_scale)
    assert torch.equal(h, want_h)
    q, scale = emu.run(swiglu._swiglu_fp8_cuda, x, res, 1200.0)
    _fp8_close("swiglu_fp8", q, scale, *reference.swiglu_fp8(x, res, 1200.0))


@pytest.mark.parametrize("m", [1, 4])
def test_fp8_gemv(gen, m):
    """fp8_rowwise_mm's GEMV path (M <= 4): exact products of e4m3 codes, fp32 sums, one output rounding."""
    n, k = 96, 528
    xq, x_scale = reference.quantize_fp8_rowwise(_randn(gen, m, k))
    wq, w_scale = reference.quantize_fp8_rowwise(_randn(gen, n, k))
    bias = torch.randn(n, generator=gen)
    y = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    with emu.emulated():
        kernel("fp8_rowwise_mm")(
            ptr(xq), ptr(x_scale), ptr(wq), ptr(w_scale), ptr(bias), DTYPE_CODES[torch.float32], ptr(y), m, n, k,
            DTYPE_CODES[torch.bfloat16], 0,
        )  # fmt: skip
    want = reference.fp8_rowwise_mm(xq, x_scale, wq, w_scale, bias, torch.float32)
    _close("y", y, want, atol=1e-5 * want.abs().max().item(), rtol=2**-8)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_rotate(gen, inverse):
    x = _randn(gen, 9, 6, 64)
    angles = torch.rand(9, 32, generator=gen, dtype=torch.float64) * 100
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    got = emu.run(rope._rope_rotate_cuda, x, torch.view_as_real(rot).contiguous(), inverse)
    _close_rotated("x", got, reference.rope_rotate(x, rot, inverse), x)


# ------------------------------------------------------------------------------------- the model's decode step
def test_model_decode_step(gen):
    """The debug model (D = 64, GQA 4/2) with fused projections: prefill then greedy decode steps on the kernels (each
    decode layer: norm + q/k/v + RoPE + cache, attention, o, norm + w1/w3, SwiGLU + w2; the LM head's GEMV with the
    final norm) against the same model on the references: the same tokens and close logits."""
    from llama3_kernels.model import Transformer, get_config

    torch.manual_seed(gen.initial_seed())
    model = Transformer(get_config("debug")).to(torch.bfloat16)
    model.init_weights(std=0.08)  # large enough that the logits tell tokens apart
    model.fuse_projections().eval()
    prompt = torch.randint(0, 256, (2, 7), generator=gen)
    prompt[1, 5:] = 0  # row 1: a 5-token prompt (right-padded)
    lengths = torch.tensor([7, 5])

    def run(feed=None):
        """Logits of the prefill and 4 decode steps; the tokens fed are the argmax, or `feed` (teacher forcing:
        both runs then see the same inputs, and one near tie cannot send them apart)."""
        model.setup_cache(2, 32)
        tokens, seen = [], []
        with torch.inference_mode():
            logits = model(prompt, last_index=lengths - 1)[:, 0]
            pos = lengths.clone()
            for step in range(4):
                seen.append(logits.float())
                nxt = logits.float().argmax(-1) if feed is None else feed[:, step]
                tokens.append(nxt)
                logits = model(nxt[:, None], pos[:, None], cache_seqlens=(pos + 1).to(torch.int32))[:, 0]
                pos += 1
        return torch.stack(tokens, 1), torch.stack(seen, 1)

    want_tokens, want_logits = run()
    before = emu.module().emu_launches()
    with emu.emulated(route_ops=True):
        _, got_logits = run(feed=want_tokens)
    assert emu.module().emu_launches() - before >= 4 * 2 * 5, "the decode steps did not run the kernels"
    assert not got_logits.isnan().any()
    scale = want_logits.abs().max().item()
    err = (got_logits - want_logits).abs().max().item()
    assert err <= 0.03 * scale, f"logits: max error {err:.3g} against a largest logit of {scale:.3g}"
    # the greedy token agrees wherever the reference's top two are further apart than twice the error
    top2 = want_logits.topk(2, -1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * err
    assert clear.any() and torch.equal(got_logits.argmax(-1)[clear], want_tokens[clear])


# ------------------------------------------------------------------------------------- the 1B decode step's shapes
def test_llama32_1b_decode_shapes(gen):
    """The kernels of one 1B decode layer at their real sizes (dim 2048, 32/8 heads of 64, FFN 8192, a 4096-token
    cache): the norm + q/k/v + RoPE + cache GEMV, attention over the full cache (the op's own split and cluster
    choice, at the H100's 132 SMs), and the SwiGLU + w2 GEMV, each against the reference."""
    dim, hq, hkv, d, ffn, length = 2048, 32, 8, 64, 8192, 4096
    x, res = _randn(gen, 1, 1, dim), _randn(gen, 1, 1, dim)
    g = 1 + _randn(gen, dim, scale=0.3)
    wqkv = _randn(gen, (hq + 2 * hkv) * d, dim, scale=0.03)
    pos = torch.tensor([[length - 1]])
    rot = _rot_pairs(gen, pos, d)
    kc, vc = _randn(gen, 1, length, hkv, d), _randn(gen, 1, length, hkv, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q, h = emu.run(linear._decode_qkv_rope_cache_cuda, x.view(1, dim), wqkv, res.view(1, dim), g, 1e-5, rot, pos, kc,
                   vc, hq)  # fmt: skip
    a, h_ref, _ = reference.rms_norm(x.view(1, dim), g, 1e-5, res.view(1, dim))
    qkv = (a.double() @ wqkv.double().T).to(torch.bfloat16).view(1, 1, -1)
    q_ref = rope._reference(qkv, rot, pos, kc_ref, vc_ref, hq)
    assert torch.equal(h, h_ref)
    _close_rotated("q", q, q_ref, qkv.view(1, 1, -1, d)[:, :, :hq])
    _close_rotated("k_cache", kc[:, -1], kc_ref[:, -1], qkv.view(1, 1, -1, d)[:, 0, hq : hq + hkv])
    lens = torch.tensor([length], dtype=torch.int32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(emu, "NUM_SMS", 132)
        out = emu.run(attention._decode_attn_cuda, q, kc, vc, lens, d**-0.5)
    want = reference.decode_attention(q.float(), kc.float(), vc.float(), lens, d**-0.5)
    _close("attention", out, want, atol=4e-3, rtol=2e-2)
    gate_up, w2 = _randn(gen, 1, 2 * ffn, scale=2.0), _randn(gen, dim, ffn, scale=0.02)
    y, _ = emu.run(linear._decode_gemv_cuda, gate_up, w2, None, None, 0.0, linear.SWIGLU)
    want_y, a2, _ = _gemv_ref(gate_up, w2, None, None, linear.SWIGLU, ffn)
    mag = a2.double().abs() @ w2.double().abs().T
    assert ((y.double() - want_y).abs() <= 2**-8 * want_y.abs() + 2**-10 * mag).all()


def test_llama32_1b_attention_heads_fwd_bwd(gen):
    """The 1B training step's attention heads (32 query / 8 KV heads of 64, causal, bf16) on a 300-token sequence:
    the forward and the default (fused dQ, two key m-tiles a warp) backward against the fp32 reference."""
    s, hq, hkv, d = 300, 32, 8, 64
    q, dout = _randn(gen, 1, s, hq, d), _randn(gen, 1, s, hq, d)
    k, v = _randn(gen, 1, s, hkv, d), _randn(gen, 1, s, hkv, d)
    out, lse = emu.run(attention._flash_attn_fwd_cuda, q, k, v, None, None, s, s, True, d**-0.5)
    ro, _ = reference.flash_attention(q.float(), k.float(), v.float(), True, d**-0.5, None, None)
    _close("out", out, ro, atol=4e-3, rtol=2e-2)
    _assert_bwd_within(gen, dout, q, k, v, out, lse, None, None, s, s, True, d**-0.5, paths=(False,))


# ------------------------------------------------------------------------------------- the emulator's own checks
@pytest.mark.parametrize(
    "name,message",
    [("deadlock", "deadlock"), ("divergent", "different collectives"), ("exited_peer", "has exited"),
     ("smem_without_opt_in", "opt-in")],
)  # fmt: skip
def test_emulator_reports_rule_breaking_kernels(name, message):
    """csrc/emu/selftest.cpp's kernels each break one rule a GPU would hang, fault or misbehave on."""
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match=message):
        emu.module().emu_selftest(name, out.data_ptr())


def test_emulator_poisons_unwritten_and_in_flight_shared_memory():
    out = torch.zeros(32)
    emu.module().emu_selftest("uninit_shared", out.data_ptr())
    assert out.isnan().all()  # shared memory no thread wrote
    src = torch.arange(4, dtype=torch.float32)
    out = torch.zeros(8)
    emu.module().emu_selftest("cp_async", out.data_ptr(), src.data_ptr())
    assert out[:4].isnan().all(), "a cp.async destination read before its wait"
    assert torch.equal(out[4:], src), "after cp.async.wait_group the data has landed"
