"""The attention backward's fused dQ (csrc/attention/flash_bwd.cu, not deterministic): the dK/dV kernel adds each
tile's dS K into an fp32 workspace with atomics instead of a separate dQ kernel recomputing P and dP, on an H100.

Its own file so that bench/device_check.sh gates it on its own (dqgate: a failure sets L3K_BWD_FUSED_DQ=0 for the
rest of the run, and the default backward takes the dQ kernel). The main file's backward tests run the default
path too; these pin both paths against the fp32 reference on the shapes that stress the fused one: partial key
tiles (warps with no keys still own query rows), GQA groups, packed documents with empty ones, the 1B shape.
Tolerance as in tests/test_attention_cuda.py: twice the error of the same math in the inputs' precision.
"""

import math

import pytest
import torch
from test_attention_cuda import _assert_within, _doc_offsets, _fp32_grads, _lowp_grads, _need, _randn

from llama3_kernels.ops import attention as attn
from llama3_kernels.ops._common import DTYPE_CODES, kernel, ptr, sm_count, stream

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("shape", [(2, 77, 9, 3, 128), (1, 1000, 32, 8, 64), (2, 130, 4, 4, 64)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_dq_padded(gen, shape, causal, dtype):
    _need("flash_attn_bwd")
    b, s, hq, hkv, d = shape
    q, dout = _randn(gen, b, s, hq, d, dtype=dtype), _randn(gen, b, s, hq, d, dtype=dtype)
    k, v = _randn(gen, b, s, hkv, d, dtype=dtype), _randn(gen, b, s, hkv, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    out, lse = attn.flash_attn_fwd(q, k, v, None, None, s, s, causal, scale)
    refs = _fp32_grads(q, k, v, dout, causal, scale)
    lows = _lowp_grads(q, k, v, dout, causal, scale)
    for det in (False, True):
        got = attn.flash_attn_bwd(dout, q, k, v, out, lse, None, None, s, s, causal, scale, det)
        for name, g, ref, low in zip(("dq", "dk", "dv"), got, refs, lows):
            _assert_within(f"{name} (deterministic={det})", g, ref, low, gen.initial_seed())


@pytest.mark.parametrize("sq,sk,causal", [(65, 65, False), (77, 150, True), (150, 77, True), (37, 199, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("two_mtiles", ["1", "0"])  # D = 64: two 16-key m-tiles a warp (the default), or one
def test_fused_dq_partial_tiles(gen, sq, sk, causal, dtype, two_mtiles, monkeypatch):
    """Query and key lengths apart (bottom-right causal), partial key tiles, and a row with a very low lse: P at the
    zero-filled key rows past the end would overflow fp16 in dS if those keys were not masked."""
    _need("flash_attn_bwd")
    monkeypatch.setenv("L3K_BWD_TWO_MTILES", two_mtiles)
    hq, hkv, d = 4, 2, 64
    k = (1 + 0.1 * torch.randn(1, sk, hkv, d, generator=gen)).to(device="cuda", dtype=dtype)
    q, dout = _randn(gen, 1, sq, hq, d, dtype=dtype), _randn(gen, 1, sq, hq, d, dtype=dtype)
    v = _randn(gen, 1, sk, hkv, d, dtype=dtype)
    q[0, 0] = -2.0
    scale = 1.0 / math.sqrt(d)
    out, lse = attn.flash_attn_fwd(q, k, v, None, None, sq, sk, causal, scale)
    refs = _fp32_grads(q, k, v, dout, causal, scale)
    lows = _lowp_grads(q, k, v, dout, causal, scale)
    got = attn.flash_attn_bwd(dout, q, k, v, out, lse, None, None, sq, sk, causal, scale, False)
    for name, g, ref, low in zip(("dq", "dk", "dv"), got, refs, lows):
        _assert_within(name, g, ref, low, gen.initial_seed())


def test_fused_dq_varlen_writes_every_output(gen):
    """Packed documents (empty ones too) into NaN-filled gradients through the raw launcher."""
    _need("flash_attn_bwd")
    hq, hkv, d, dtype = 8, 2, 64, torch.bfloat16
    lens = [0, 1, 90, 3, 200, 0]
    cu = _doc_offsets(lens)
    t = sum(lens)
    q, dout = _randn(gen, t, hq, d, dtype=dtype), _randn(gen, t, hq, d, dtype=dtype)
    k, v = _randn(gen, t, hkv, d, dtype=dtype), _randn(gen, t, hkv, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    out, lse = attn.flash_attn_fwd(q, k, v, cu, cu, max(lens), max(lens), True, scale)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    dsum = torch.full_like(lse, float("nan"))
    acc = torch.full((t, hq, d), float("nan"), device="cuda")  # the launcher zeroes it
    kernel("flash_attn_bwd")(
        ptr(dout), ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(dsum), ptr(dq), ptr(dk), ptr(dv), ptr(cu),
        ptr(cu), len(lens), max(lens), max(lens), t, t, hq, hkv, d, True, scale, False, DTYPE_CODES[dtype],
        sm_count(0), stream(q), dq_accum=ptr(acc),
    )  # fmt: skip
    refs = _fp32_grads(q, k, v, dout, True, scale, cu, cu)
    lows = _lowp_grads(q, k, v, dout, True, scale, cu, cu)
    for name, g, ref, low in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, lows):
        _assert_within(name, g, ref, low, gen.initial_seed())


def test_fused_dq_refuses_deterministic():
    _need("flash_attn_bwd")
    x = torch.zeros(1, 8, 1, 64, dtype=torch.bfloat16, device="cuda")
    lse = torch.zeros(1, 1, 8, device="cuda")
    acc = torch.zeros(1, 8, 1, 64, device="cuda")
    with pytest.raises(ValueError, match="dq_accum"):
        kernel("flash_attn_bwd")(
            ptr(x), ptr(x), ptr(x), ptr(x), ptr(x), ptr(lse), ptr(lse.clone()), ptr(x.clone()), ptr(x.clone()),
            ptr(x.clone()), 0, 0, 1, 8, 8, 8, 8, 1, 1, 64, True, 0.125, True, DTYPE_CODES[torch.bfloat16], sm_count(0),
            stream(x), dq_accum=ptr(acc),
        )  # fmt: skip
