"""GPU tests of the attention kernels (csrc/attention/) against the fp32 references, on odd shapes.

Tolerance follows FlashAttention's tests: the kernel's max error against the fp32 reference may be at most
twice the error of a plain PyTorch low-precision computation (same inputs, math in bf16/fp16) against that
reference, plus a small floor (one ulp of 1.0 in the dtype). Skipped without a GPU or without the kernels.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from llama3_kernels import reference
from llama3_kernels.ops import attention as attn
from llama3_kernels.ops._common import DTYPE_CODES, has_kernel, kernel, ptr, sm_count, stream
from llama3_kernels.ops.rope import rope_kv_cache

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = (torch.bfloat16, torch.float16)


def _need(name: str) -> None:
    if not has_kernel(name):
        pytest.skip(f"_C.{name} was not built")


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)


# --------------------------------------------------------------------------------- low-precision baseline
def _attend_lowp(q, k, v, scale, causal):
    """One sequence computed entirely in q.dtype (PyTorch's own math path): q [Sq,Hq,D], k/v [Sk,Hkv,D]."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    if sq == 0:
        return q.new_zeros(q.shape)
    kr = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, Sk, D]
    vr = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    s = (q.transpose(0, 1) * scale) @ kr.transpose(1, 2)  # [Hq, Sq, Sk]
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    visible = (j <= i + sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    s = s.masked_fill(~visible, torch.finfo(s.dtype).min)  # finite: fully masked rows stay NaN-free
    p = torch.softmax(s, dim=-1) * visible.any(-1, keepdim=True).to(s.dtype)  # rows with no key: 0
    return (p @ vr).transpose(0, 1)


def _flash_lowp(q, k, v, scale, causal, cu=None, cu_k=None):
    if cu is None:
        return torch.stack([_attend_lowp(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])
    cu_k = cu if cu_k is None else cu_k
    bq, bk = cu.tolist(), cu_k.tolist()
    parts = [
        _attend_lowp(q[bq[i] : bq[i + 1]], k[bk[i] : bk[i + 1]], v[bk[i] : bk[i + 1]], scale, causal)
        for i in range(len(bq) - 1)
    ]
    return torch.cat(parts)


def _assert_within(name: str, got: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor, seed: int) -> None:
    """max|got - ref| <= 2 max|lowp - ref| + eps(dtype)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values (seed {seed})"
    err = (got.float() - ref.float()).abs().max().item() if got.numel() else 0.0
    base = (lowp.float() - ref.float()).abs().max().item() if got.numel() else 0.0
    floor = torch.finfo(got.dtype).eps
    assert err <= 2 * base + floor, f"{name}: max error {err:.3e} > 2 x {base:.3e} + {floor:.1e} (seed {seed})"


def _fp32_grads(q, k, v, dout, causal, scale, cu=None, cu_k=None):
    with torch.enable_grad():
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        out, _ = reference.flash_attention(qf, kf, vf, causal, scale, cu, cu_k)
        return torch.autograd.grad(out, (qf, kf, vf), dout.float())


def _lowp_grads(q, k, v, dout, causal, scale, cu=None, cu_k=None):
    with torch.enable_grad():
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = _flash_lowp(ql, kl, vl, scale, causal, cu, cu_k)
        return torch.autograd.grad(out, (ql, kl, vl), dout)


def _doc_offsets(lengths: list[int], device: str = "cuda") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _random_docs(gen: torch.Generator, n: int, longest: int) -> list[int]:
    """Random document lengths that always include empty and one-token documents."""
    lengths = torch.randint(2, longest + 1, (n,), generator=gen).tolist() + [0, 1, 1, 0]
    return [lengths[i] for i in torch.randperm(len(lengths), generator=gen).tolist()]


# ------------------------------------------------------------------------------------------- forward
PADDED_SHAPES = [  # (B, Sq, Sk, Hq, Hkv, D)
    (2, 1, 1, 4, 4, 64),
    (1, 37, 37, 9, 3, 128),
    (2, 199, 199, 32, 8, 128),
    (1, 1000, 1000, 9, 3, 64),
    (2, 37, 199, 4, 4, 128),  # Sk > Sq: causal aligned bottom-right
    (1, 199, 37, 8, 8, 64),  # Sq > Sk: the first causal rows see no key (out 0, lse -inf)
    (1, 1, 1000, 32, 8, 128),
]


@pytest.mark.parametrize("shape", PADDED_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_fwd_padded(gen, shape, causal, dtype):
    _need("flash_attn_fwd")
    b, sq, sk, hq, hkv, d = shape
    q, k = _randn(gen, b, sq, hq, d, dtype=dtype), _randn(gen, b, sk, hkv, d, dtype=dtype)
    v = _randn(gen, b, sk, hkv, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    out, lse = attn.flash_attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = reference.flash_attention(q.float(), k.float(), v.float(), causal, scale)
    _assert_within("out", out, ref, _flash_lowp(q, k, v, scale, causal), gen.initial_seed())
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    torch.testing.assert_close(
        lse, ref_lse, atol=1e-3, rtol=1e-4, msg=lambda m: f"lse (seed {gen.initial_seed()}): {m}"
    )


@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64), (4, 4, 128)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("separate_k", [False, True])
def test_flash_fwd_varlen(gen, heads, causal, dtype, separate_k):
    _need("flash_attn_fwd")
    hq, hkv, d = heads
    q_lens = _random_docs(gen, 5, 300)
    k_lens = [n + int(torch.randint(0, 90, (), generator=gen)) for n in q_lens] if separate_k else q_lens
    cu, cu_k = _doc_offsets(q_lens), _doc_offsets(k_lens)
    q = _randn(gen, sum(q_lens), hq, d, dtype=dtype)
    k, v = _randn(gen, sum(k_lens), hkv, d, dtype=dtype), _randn(gen, sum(k_lens), hkv, d, dtype=dtype)
    kw = {"cu_seqlens_k": cu_k} if separate_k else {}
    out, lse = attn.flash_attention(q, k, v, causal=causal, cu_seqlens=cu, return_lse=True, **kw)
    scale = 1.0 / math.sqrt(d)
    ref, ref_lse = reference.flash_attention(q.float(), k.float(), v.float(), causal, scale, cu, cu_k)
    _assert_within("out", out, ref, _flash_lowp(q, k, v, scale, causal, cu, cu_k), gen.initial_seed())
    assert lse.shape == (hq, sum(q_lens))
    torch.testing.assert_close(
        lse, ref_lse, atol=1e-3, rtol=1e-4, msg=lambda m: f"lse (seed {gen.initial_seed()}): {m}"
    )


def test_flash_fwd_writes_every_output(gen):
    """The launcher itself, into NaN-filled out/lse: every element is written (empty docs, rows with no key)."""
    _need("flash_attn_fwd")
    hq, hkv, d, dtype = 8, 2, 128, torch.bfloat16
    q_lens, k_lens = [0, 1, 70, 3, 0, 130], [5, 0, 70, 1, 0, 200]
    cu, cu_k = _doc_offsets(q_lens), _doc_offsets(k_lens)
    tq, tk = sum(q_lens), sum(k_lens)
    q = _randn(gen, tq, hq, d, dtype=dtype)
    k, v = _randn(gen, tk, hkv, d, dtype=dtype), _randn(gen, tk, hkv, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((hq, tq), float("nan"), device="cuda")
    scale = 1.0 / math.sqrt(d)
    kernel("flash_attn_fwd")(
        ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(cu), ptr(cu_k), len(q_lens), max(q_lens), max(k_lens), tq,
        hq, hkv, d, True, scale, DTYPE_CODES[dtype], sm_count(0), stream(q),
    )  # fmt: skip
    ref, ref_lse = reference.flash_attention(q.float(), k.float(), v.float(), True, scale, cu, cu_k)
    assert not out.isnan().any() and not lse.isnan().any()
    _assert_within("out", out, ref, _flash_lowp(q, k, v, scale, True, cu, cu_k), gen.initial_seed())
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


def test_flash_fwd_opcheck(gen):
    _need("flash_attn_fwd")
    q = _randn(gen, 1, 37, 4, 64, dtype=torch.bfloat16)
    k, v = _randn(gen, 1, 37, 2, 64, dtype=torch.bfloat16), _randn(gen, 1, 37, 2, 64, dtype=torch.bfloat16)
    torch.library.opcheck(attn.flash_attn_fwd, (q, k, v, None, None, 37, 37, True, 0.125))


# ------------------------------------------------------------------- Hopper TMA + wgmma forward (opt-in)
SM90_SHAPES = [(1, 1, 4, 1), (2, 17, 32, 8), (1, 129, 32, 8), (2, 1000, 8, 2), (1, 4097, 32, 8)]  # (B, S, Hq, Hkv)


def _sm90_gate(*kinds: str) -> None:
    """bench/device_check.sh keeps a Hopper kernel that failed its standalone check (dev/attention) out of the GPU
    tests of that run (L3K_SM90_GATE=fwd,bwd): a pipeline hang would otherwise stall the whole test process."""
    failed = set(os.environ.get("L3K_SM90_GATE", "").split(",")) & set(kinds)
    if failed:
        pytest.skip(f"sm90 {', '.join(sorted(failed))} kernel failed its standalone check in this run (sm90gate.log)")


@pytest.fixture
def sm90_fwd(monkeypatch):
    """flash_attn_fwd runs csrc/attention/flash_fwd_sm90.cuh for the shapes it covers (read at every call)."""
    _sm90_gate("fwd")
    monkeypatch.setenv("L3K_FLASH_FWD_SM90", "1")


def _cuda_kernels(fn) -> set[str]:
    """Names of the CUDA kernels that fn launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


def _ran_sm90(fn) -> bool:
    return any("flash_fwd_sm90_kernel" in name for name in _cuda_kernels(fn))


@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("shape", SM90_SHAPES)
def test_flash_fwd_sm90(gen, sm90_fwd, shape, d):
    _need("flash_attn_fwd")
    b, s, hq, hkv = shape
    q, k = _randn(gen, b, s, hq, d, dtype=torch.bfloat16), _randn(gen, b, s, hkv, d, dtype=torch.bfloat16)
    v = _randn(gen, b, s, hkv, d, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    result = {}
    assert _ran_sm90(lambda: result.update(zip(("out", "lse"), attn.flash_attention(q, k, v, True, return_lse=True))))
    ref, ref_lse = reference.flash_attention(q.float(), k.float(), v.float(), True, scale)
    _assert_within("out", result["out"], ref, _flash_lowp(q, k, v, scale, True), gen.initial_seed())
    torch.testing.assert_close(result["lse"], ref_lse, atol=1e-3, rtol=1e-4)


def test_flash_fwd_sm90_dispatch(gen, monkeypatch):
    """Enabled, it takes exactly the shapes it covers; disabled, none."""
    _need("flash_attn_fwd")
    _sm90_gate("fwd")

    def runs_sm90(s=64, sk=64, d=128, dtype=torch.bfloat16, causal=True):
        q, k = _randn(gen, 1, s, 4, d, dtype=dtype), _randn(gen, 1, sk, 2, d, dtype=dtype)
        return _ran_sm90(lambda: attn.flash_attention(q, k, k, causal))

    monkeypatch.setenv("L3K_FLASH_FWD_SM90", "1")
    assert runs_sm90() and runs_sm90(d=64)
    assert not runs_sm90(causal=False) and not runs_sm90(dtype=torch.float16)
    assert not runs_sm90(sk=65)
    cu = _doc_offsets([30, 34])
    q, k = _randn(gen, 64, 4, 128, dtype=torch.bfloat16), _randn(gen, 64, 2, 128, dtype=torch.bfloat16)
    assert _ran_sm90(lambda: attn.flash_attention(q, k, k, True, cu_seqlens=cu, max_seqlen=34))
    # separate key offsets (context parallelism's longer key segments): not covered
    assert not _ran_sm90(lambda: attn.flash_attention(q, k, k, True, cu_seqlens=cu, cu_seqlens_k=cu.clone()))
    monkeypatch.setenv("L3K_FLASH_FWD_SM90", "0")
    assert not runs_sm90()


@pytest.mark.parametrize("d", [128, 64])
def test_flash_fwd_sm90_varlen(gen, sm90_fwd, d):
    """Packed documents (empty, one-token, short and multi-tile ones) into NaN-poisoned out/lse via the launcher;
    40 trailing rows belong to no document and must stay untouched (a store past a document would land there)."""
    _need("flash_attn_fwd")
    hq, hkv, dtype, tail = 32, 8, torch.bfloat16, 40
    lengths = _random_docs(gen, 5, 700) + [129, 128, 127]
    cu, used = _doc_offsets(lengths), sum(lengths)
    total = used + tail
    q = _randn(gen, total, hq, d, dtype=dtype)
    k, v = _randn(gen, total, hkv, d, dtype=dtype), _randn(gen, total, hkv, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((hq, total), float("nan"), device="cuda")
    scale = 1.0 / math.sqrt(d)
    launch = kernel("flash_attn_fwd")
    assert _ran_sm90(
        lambda: launch(
            ptr(q),
            ptr(k),
            ptr(v),
            ptr(out),
            ptr(lse),
            ptr(cu),
            ptr(cu),
            len(lengths),
            max(lengths),
            max(lengths),
            total,
            hq,
            hkv,
            d,
            True,
            scale,
            DTYPE_CODES[dtype],
            sm_count(0),
            stream(q),
        )  # fmt: skip
    )
    assert out[used:].isnan().all() and lse[:, used:].isnan().all()
    out, lse, q, k, v = out[:used], lse[:, :used], q[:used], k[:used], v[:used]
    ref, ref_lse = reference.flash_attention(q.float(), k.float(), v.float(), True, scale, cu, cu)
    assert not out.isnan().any() and not lse.isnan().any()
    _assert_within("out", out, ref, _flash_lowp(q, k, v, scale, True, cu, cu), gen.initial_seed())
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


def test_flash_bwd_after_sm90_varlen_fwd(gen, sm90_fwd, monkeypatch):
    """The (mma.sync) backward consumes the sm90 forward's packed out and [Hq, T] lse."""
    monkeypatch.setenv("L3K_FLASH_BWD_SM90", "0")
    _need("flash_attn_fwd")
    _need("flash_attn_bwd")
    lengths = _random_docs(gen, 4, 300)
    cu, total = _doc_offsets(lengths), sum(lengths)
    q, k = _randn(gen, total, 8, 128, dtype=torch.bfloat16), _randn(gen, total, 2, 128, dtype=torch.bfloat16)
    v, dout = _randn(gen, total, 2, 128, dtype=torch.bfloat16), _randn(gen, total, 8, 128, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(128)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    assert _ran_sm90(lambda: attn.flash_attention(qg, kg, vg, True, cu_seqlens=cu).backward(dout))
    refs = _fp32_grads(q, k, v, dout, True, scale, cu)
    lows = _lowp_grads(q, k, v, dout, True, scale, cu)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), refs, lows):
        _assert_within(name, got, ref, low, gen.initial_seed())


@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("shape", [(2, 37, 32, 8), (1, 1000, 4, 4)])
def test_flash_bwd_after_sm90_fwd(gen, sm90_fwd, monkeypatch, shape, d):
    """The (mma.sync) backward consumes the sm90 forward's out and lse."""
    monkeypatch.setenv("L3K_FLASH_BWD_SM90", "0")
    _need("flash_attn_fwd")
    _need("flash_attn_bwd")
    b, s, hq, hkv = shape
    q, k = _randn(gen, b, s, hq, d, dtype=torch.bfloat16), _randn(gen, b, s, hkv, d, dtype=torch.bfloat16)
    v, dout = _randn(gen, b, s, hkv, d, dtype=torch.bfloat16), _randn(gen, b, s, hq, d, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    assert _ran_sm90(lambda: attn.flash_attention(qg, kg, vg, causal=True).backward(dout))
    refs = _fp32_grads(q, k, v, dout, True, scale)
    lows = _lowp_grads(q, k, v, dout, True, scale)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), refs, lows):
        _assert_within(name, got, ref, low, gen.initial_seed())


# ------------------------------------------------------------------ Hopper TMA + wgmma backward (opt-in)
def _ran(fn, name: str) -> bool:
    return any(name in k for k in _cuda_kernels(fn))


@pytest.mark.parametrize("shape", [(1, 1, 4, 1), (2, 17, 32, 8), (1, 129, 8, 8), (2, 1000, 32, 8), (1, 2049, 8, 2)])
@pytest.mark.parametrize(("sm90_forward", "d"), [(False, 128), (True, 128), (False, 64), (True, 64)])
def test_flash_bwd_sm90(gen, monkeypatch, shape, sm90_forward, d):
    """dq, dk, dv (dk/dv summed over each KV group) against fp32 autograd, within twice bf16 math's error."""
    _need("flash_attn_fwd")
    _need("flash_attn_bwd")
    _sm90_gate("bwd", *(["fwd"] if sm90_forward else []))
    monkeypatch.setenv("L3K_FLASH_BWD_SM90", "1")
    monkeypatch.setenv("L3K_FLASH_FWD_SM90", "1" if sm90_forward else "0")
    b, s, hq, hkv = shape
    q, k = _randn(gen, b, s, hq, d, dtype=torch.bfloat16), _randn(gen, b, s, hkv, d, dtype=torch.bfloat16)
    v, dout = _randn(gen, b, s, hkv, d, dtype=torch.bfloat16), _randn(gen, b, s, hq, d, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = attn.flash_attention(qg, kg, vg, causal=True)
    assert _ran(lambda: out.backward(dout), "dq_sm90_kernel")
    refs = _fp32_grads(q, k, v, dout, True, scale)
    lows = _lowp_grads(q, k, v, dout, True, scale)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), refs, lows):
        _assert_within(name, got, ref, low, gen.initial_seed())


@pytest.mark.parametrize("d", [128, 64])
def test_flash_bwd_sm90_varlen(gen, monkeypatch, d):
    """Packed documents (empty, one-token, multi-tile) through the sm90 forward and backward."""
    _need("flash_attn_fwd")
    _need("flash_attn_bwd")
    _sm90_gate("fwd", "bwd")
    monkeypatch.setenv("L3K_FLASH_FWD_SM90", "1")
    monkeypatch.setenv("L3K_FLASH_BWD_SM90", "1")
    lengths = _random_docs(gen, 4, 400) + [128, 129]  # the last tile reaches past T
    cu, total = _doc_offsets(lengths), sum(lengths)
    q, k = _randn(gen, total, 32, d, dtype=torch.bfloat16), _randn(gen, total, 8, d, dtype=torch.bfloat16)
    v, dout = _randn(gen, total, 8, d, dtype=torch.bfloat16), _randn(gen, total, 32, d, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = attn.flash_attention(qg, kg, vg, True, cu_seqlens=cu)
    assert _ran(lambda: out.backward(dout), "dkdv_sm90_kernel")
    refs = _fp32_grads(q, k, v, dout, True, scale, cu)
    lows = _lowp_grads(q, k, v, dout, True, scale, cu)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), refs, lows):
        _assert_within(name, got, ref, low, gen.initial_seed())


def test_flash_bwd_sm90_deterministic_and_dispatch(gen, monkeypatch):
    """Identical gradients twice; only causal bf16 D = 64/128 self-attention takes it (packed documents only with one
    set of offsets), and only when enabled."""
    _need("flash_attn_bwd")
    _sm90_gate("bwd")
    monkeypatch.setenv("L3K_FLASH_BWD_SM90", "1")

    def grads(s=300, d=128, dtype=torch.bfloat16, causal=True, varlen=False, separate_k=False):
        g = torch.Generator().manual_seed(7)
        q, k, v = (_randn(g, 2, s, h, d, dtype=dtype).requires_grad_() for h in (8, 2, 2))
        if varlen:
            cu = _doc_offsets([s, s])
            flat = [t.flatten(0, 1) for t in (q, k, v)]
            extra = {"cu_seqlens_k": cu.clone(), "max_seqlen_k": s} if separate_k else {}
            out = attn.flash_attention(*flat, causal, cu_seqlens=cu, max_seqlen=s, **extra)
        else:
            out = attn.flash_attention(q, k, v, causal)
        result = {}
        ran = _ran(lambda: result.update(zip("qkv", torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))),
                   "dq_sm90_kernel")  # fmt: skip
        return ran, result

    ran, first = grads()
    assert ran
    _, second = grads()
    assert all(torch.equal(first[n], second[n]) for n in "qkv")
    assert grads(d=64)[0] and not grads(dtype=torch.float16)[0] and not grads(causal=False)[0]
    assert grads(varlen=True)[0] and not grads(varlen=True, separate_k=True)[0]
    monkeypatch.setenv("L3K_FLASH_BWD_SM90", "0")
    assert not grads()[0]


# ------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize(
    "shape", [(2, 37, 37, 9, 3, 128), (1, 199, 199, 32, 8, 64), (1, 37, 199, 4, 4, 128), (1, 1000, 1000, 4, 4, 128)]
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_bwd_padded(gen, shape, causal, dtype):
    _need("flash_attn_fwd")
    _need("flash_attn_bwd")
    b, sq, sk, hq, hkv, d = shape
    q, k = _randn(gen, b, sq, hq, d, dtype=dtype), _randn(gen, b, sk, hkv, d, dtype=dtype)
    v, dout = _randn(gen, b, sk, hkv, d, dtype=dtype), _randn(gen, b, sq, hq, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    attn.flash_attention(qg, kg, vg, causal=causal).backward(dout)
    refs = _fp32_grads(q, k, v, dout, causal, scale)
    lows = _lowp_grads(q, k, v, dout, causal, scale)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), refs, lows):
        _assert_within(name, got, ref, low, gen.initial_seed())


@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("separate_k", [False, True])
def test_flash_bwd_varlen(gen, heads, causal, separate_k):
    _need("flash_attn_fwd")
    _need("flash_attn_bwd")
    hq, hkv, d = heads
    dtype = torch.bfloat16
    q_lens = _random_docs(gen, 4, 250)
    k_lens = [n + int(torch.randint(1, 70, (), generator=gen)) for n in q_lens] if separate_k else q_lens
    cu, cu_k = _doc_offsets(q_lens), _doc_offsets(k_lens)
    q, dout = _randn(gen, sum(q_lens), hq, d, dtype=dtype), _randn(gen, sum(q_lens), hq, d, dtype=dtype)
    k, v = _randn(gen, sum(k_lens), hkv, d, dtype=dtype), _randn(gen, sum(k_lens), hkv, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    kw = {"cu_seqlens_k": cu_k} if separate_k else {}
    attn.flash_attention(qg, kg, vg, causal=causal, cu_seqlens=cu, **kw).backward(dout)
    refs = _fp32_grads(q, k, v, dout, causal, scale, cu, cu_k)
    lows = _lowp_grads(q, k, v, dout, causal, scale, cu, cu_k)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), refs, lows):
        _assert_within(name, got, ref, low, gen.initial_seed())


def test_flash_bwd_deterministic_and_writes_every_output(gen):
    """Two runs into NaN-filled gradients give identical, fully written results."""
    _need("flash_attn_bwd")
    hq, hkv, d, dtype = 8, 2, 64, torch.float16
    q_lens, k_lens = [0, 1, 90, 3, 0], [4, 0, 130, 3, 0]
    cu, cu_k = _doc_offsets(q_lens), _doc_offsets(k_lens)
    tq, tk = sum(q_lens), sum(k_lens)
    q, dout = _randn(gen, tq, hq, d, dtype=dtype), _randn(gen, tq, hq, d, dtype=dtype)
    k, v = _randn(gen, tk, hkv, d, dtype=dtype), _randn(gen, tk, hkv, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    ref_out, ref_lse = reference.flash_attention(q.float(), k.float(), v.float(), True, scale, cu, cu_k)
    out = ref_out.to(dtype)
    runs = []
    for _ in range(2):
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        dsum = torch.full_like(ref_lse, float("nan"))
        kernel("flash_attn_bwd")(
            ptr(dout), ptr(q), ptr(k), ptr(v), ptr(out), ptr(ref_lse), ptr(dsum), ptr(dq), ptr(dk), ptr(dv),
            ptr(cu), ptr(cu_k), len(q_lens), max(q_lens), max(k_lens), tq, tk, hq, hkv, d, True, scale, True,
            DTYPE_CODES[dtype], sm_count(0), stream(q),
        )  # fmt: skip
        runs.append((dq, dk, dv))
    for name, a, b in zip(("dq", "dk", "dv"), *runs):
        assert not a.isnan().any(), f"{name}: unwritten elements"
        assert torch.equal(a, b), f"{name}: differs between two runs"
    refs = _fp32_grads(q, k, v, dout, True, scale, cu, cu_k)
    lows = _lowp_grads(q, k, v, dout, True, scale, cu, cu_k)
    for name, got, ref, low in zip(("dq", "dk", "dv"), runs[0], refs, lows):
        _assert_within(name, got, ref, low, gen.initial_seed())


def test_flash_bwd_no_queries_zeroes_dk_dv(gen):
    """Padded q with S = 0 against Sk = 37 keys: dk and dv (NaN-filled before) come back all zero."""
    _need("flash_attn_bwd")
    b, sk, hq, hkv, d, dtype = 2, 37, 4, 2, 64, torch.bfloat16
    q = dout = out = torch.empty(b, 0, hq, d, dtype=dtype, device="cuda")
    k, v = _randn(gen, b, sk, hkv, d, dtype=dtype), _randn(gen, b, sk, hkv, d, dtype=dtype)
    lse = dsum = torch.empty(b, hq, 0, device="cuda")
    dq, dk, dv = torch.empty_like(q), torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    kernel("flash_attn_bwd")(
        ptr(dout), ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(dsum), ptr(dq), ptr(dk), ptr(dv), 0, 0, b, 0, sk,
        0, sk, hq, hkv, d, True, 0.125, False, DTYPE_CODES[dtype], sm_count(0), stream(k),
    )  # fmt: skip
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


# ------------------------------------------------------------------------------------------- decode
# Rows a KV head = Sq x group: <= 16 takes the warps-split-keys tile (4, 12, 1, and 16 at its edge), more the
# rows-split tile (20, 2 row blocks of 64 for 100).
DECODE_SHAPES = [(3, 1, 32, 8, 128, 1000), (2, 4, 9, 3, 64, 777), (1, 1, 4, 4, 128, 8192), (2, 2, 32, 4, 128, 129),
                 (2, 5, 16, 4, 64, 300), (1, 25, 8, 2, 128, 555)]  # fmt: skip


@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided_cache", [False, True])
def test_decode(gen, shape, dtype, strided_cache):
    _need("decode_attn")
    b, sq, hq, hkv, d, cache_len = shape
    extra = 40 if strided_cache else 0  # a cache that is a view of a longer buffer
    k_buf = _randn(gen, b, cache_len + extra, hkv, d, dtype=dtype)
    v_buf = _randn(gen, b, cache_len + extra, hkv, d, dtype=dtype)
    k_cache, v_cache = k_buf[:, :cache_len], v_buf[:, :cache_len]
    q = _randn(gen, b, sq, hq, d, dtype=dtype)
    lens = torch.randint(sq, cache_len + 1, (b,), generator=gen)
    lens[0] = cache_len  # one full cache
    if b > 1:
        lens[1] = sq  # one cache holding only the new tokens
    cache_seqlens = lens.to(device="cuda", dtype=torch.int32)
    out = attn.decode_attention(q, k_cache, v_cache, cache_seqlens)
    scale = 1.0 / math.sqrt(d)
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), cache_seqlens, scale)
    n = lens.tolist()
    lowp = torch.stack([_attend_lowp(q[i], k_cache[i, : n[i]], v_cache[i, : n[i]], scale, True) for i in range(b)])
    _assert_within("out", out, ref, lowp, gen.initial_seed())


def test_decode_head_major_cache(gen):
    """A head-major cache [B, Hkv, L, D] viewed as [B, L, Hkv, D] (KV heads not D apart) still attends correctly."""
    _need("decode_attn")
    b, sq, hq, hkv, d, cache_len = 2, 1, 8, 2, 64, 300
    k_cache = _randn(gen, b, hkv, cache_len, d, dtype=torch.bfloat16).transpose(1, 2)
    v_cache = _randn(gen, b, hkv, cache_len, d, dtype=torch.bfloat16).transpose(1, 2)
    q = _randn(gen, b, sq, hq, d, dtype=torch.bfloat16)
    cache_seqlens = torch.tensor([cache_len, 77], dtype=torch.int32, device="cuda")
    out = attn.decode_attention(q, k_cache, v_cache, cache_seqlens)
    scale = 1.0 / math.sqrt(d)
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), cache_seqlens, scale)
    n = cache_seqlens.tolist()
    lowp = torch.stack([_attend_lowp(q[i], k_cache[i, : n[i]], v_cache[i, : n[i]], scale, True) for i in range(b)])
    _assert_within("out", out, ref, lowp, gen.initial_seed())


def test_decode_no_new_tokens():
    """Sq = 0 (and so empty split-KV workspaces with null pointers) returns an empty output."""
    _need("decode_attn")
    q = torch.empty(2, 0, 8, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.zeros(2, 300, 2, 64, dtype=torch.bfloat16, device="cuda")
    assert attn.decode_attention(q, k, k, torch.tensor([300, 17], dtype=torch.int32, device="cuda")).shape == q.shape


def test_decode_opcheck(gen):
    _need("decode_attn")
    q = _randn(gen, 2, 1, 8, 64, dtype=torch.bfloat16)
    k, v = _randn(gen, 2, 300, 2, 64, dtype=torch.bfloat16), _randn(gen, 2, 300, 2, 64, dtype=torch.bfloat16)
    lens = torch.tensor([300, 17], dtype=torch.int32, device="cuda")
    torch.library.opcheck(attn.decode_attn, (q, k, v, lens, 0.125))


# ---------------------------------------------------------------------------------------- rope + KV cache
@pytest.mark.parametrize("shape", [(1, 1, 32, 8, 64, 4096), (3, 5, 12, 4, 128, 77), (2, 1, 4, 4, 8, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded_qkv", [False, True])
def test_rope_kv_cache(gen, shape, dtype, padded_qkv):
    """The kernel against the fp32-math reference: q, and every cache slot written or left alone (NaN-poisoned
    caches). One rounding of the fp32 product apart at most: |diff| <= one ulp of the dtype at the value."""
    _need("rope_kv_cache")
    b, s, hq, hkv, d, length = shape
    n = (hq + 2 * hkv) * d
    big = _randn(gen, b, s, n + (8 if padded_qkv else 0), dtype=dtype)
    qkv = big[..., :n]  # padded: token rows 8 elements apart from the projection's width
    angles = torch.rand(b, s, d // 2, generator=gen).to("cuda") * 100.0
    rot = torch.polar(torch.ones_like(angles), angles)
    positions = torch.stack([torch.randperm(length, generator=gen)[:s] for _ in range(b)]).to("cuda")
    caches = [torch.full((b + 1, length, hkv, d), float("nan"), device="cuda", dtype=dtype) for _ in range(4)]
    q = rope_kv_cache(qkv, rot, positions, caches[0], caches[1], hq)
    q_ref = reference.rope_kv_cache(qkv, rot, positions, caches[2], caches[3], hq)
    ulp = torch.finfo(dtype).eps
    assert not torch.isnan(q).any()
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=ulp, atol=ulp)
    for mine, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(torch.isnan(mine), torch.isnan(ref))  # the same slots written, the rest untouched
        torch.testing.assert_close(mine.float().nan_to_num(7.0), ref.float().nan_to_num(7.0), rtol=ulp, atol=ulp)
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))  # v is copied, bit for bit


def test_rope_kv_cache_out_of_range_position_poisons_q_and_writes_nothing(gen):
    """Positions live on the GPU (graph replays): a bad one cannot raise, so its q is NaN and no slot is written."""
    _need("rope_kv_cache")
    hq, hkv, d, length = 4, 2, 64, 16
    qkv = _randn(gen, 2, 1, (hq + 2 * hkv) * d, dtype=torch.bfloat16)
    rot = torch.polar(torch.ones(2, 1, d // 2, device="cuda"), torch.rand(2, 1, d // 2, device="cuda"))
    positions = torch.tensor([[3], [length]], device="cuda")  # row 1 is one past the cache
    kc, vc = (torch.zeros(2, length, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = rope_kv_cache(qkv, rot, positions, kc, vc, hq)
    assert torch.isnan(q[1]).all() and not torch.isnan(q[0]).any()
    assert kc[1].abs().sum() == 0 and vc[1].abs().sum() == 0 and kc[0, 3].abs().sum() > 0
