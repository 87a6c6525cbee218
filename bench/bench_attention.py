"""Causal GQA attention (fwd, bwd) and document-masked attention vs SDPA backends, FlexAttention, flash-attn.

FLOPs (H = query heads): forward 4·B·H·S²·D halved for causal; with a document mask 4·H·D·Σ L·(L+1)/2 over
the documents (the exact unmasked pairs); backward 2.5× forward. MFU against 989 TFLOP/s (bf16).
The backward is timed alone (the forward ran once before timing, its graph retained).
"""

from __future__ import annotations

import os
import random

import torch
import torch.nn.functional as F

from llama3_kernels import ops
from llama3_kernels.bench.harness import OURS, PEAK_TFLOPS, Case, Context, Impl, compiled, env_set
from llama3_kernels.ops._common import switched_off

FAMILY = "attention"
DOC_SEED = 1234  # the document layout is fixed so rows stay comparable across runs


def doc_lengths(seq: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """Random document lengths in [lo, hi] filling `seq` exactly (the last one takes the remainder)."""
    out: list[int] = []
    while sum(out) < seq:
        out.append(min(rng.randint(lo, hi), seq - sum(out)))
    return out


def sdpa(backend_name: str, causal: bool = True):
    """A make() for one SDPA backend on [B, H, S, D] inputs ("qt", "kt", "vt"; "dense_mask" replaces the
    causal mask when present); K/V heads are repeated for a backend that lacks GQA, and the row says so."""

    def make(i):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        q, k, v, mask = i["qt"], i["kt"], i["vt"], i.get("dense_mask")
        causal_ = causal and mask is None

        def call(k=k, v=v, gqa=True):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal_, enable_gqa=gqa)

        note = ""
        try:
            call()
        except RuntimeError:  # this backend refused enable_gqa: give it repeated K/V heads instead
            group = q.shape[1] // k.shape[1]
            kr, vr = (t.repeat_interleave(group, dim=1).detach().requires_grad_(t.requires_grad) for t in (k, v))
            call(kr, vr, gqa=False)  # raises if the backend cannot run this case at all
            k, v, note = kr, vr, "K/V heads repeated: backend lacks GQA"
        fn = _fwd_or_bwd(i, lambda: call(k, v, gqa=not note), (q, k, v))
        fn.note = note
        return fn

    return make


def _fwd_or_bwd(i, forward, leaves):
    """Time the forward, or (bwd mode) run it once and time the backward of the retained graph."""
    if not i.get("bwd"):

        def fwd():
            return forward()

        return fwd
    out = forward()
    dout = torch.randn_like(out)

    def bwd():
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)

    return bwd


def _ours(i):
    q, k, v = i["q"], i["k"], i["v"]
    if i.get("cu_seqlens") is not None:  # packed documents: [B·S, H, D] with offsets
        t = q.shape[0] * q.shape[1]
        qp, kp, vp = (x.reshape(t, *x.shape[2:]) for x in (q, k, v))
        cu, mx = i["cu_seqlens"], i["max_seqlen"]
        return _fwd_or_bwd(i, lambda: ops.flash_attention(qp, kp, vp, True, None, cu, mx), (q, k, v))
    return _fwd_or_bwd(i, lambda: ops.flash_attention(q, k, v, causal=True), (q, k, v))


SM90_ENV = {"L3K_FLASH_FWD_SM90": "1", "L3K_FLASH_BWD_SM90": "1"}


def sm90_skip(cuda_skip: str | None) -> str | None:
    """Why the opt-in column does not run here: no GPU, or bench/device_check.sh found a kernel failing its
    standalone check in this run (L3K_SM90_GATE), which could hang the GPU under the bench."""
    failed = [k for k in os.environ.get("L3K_SM90_GATE", "").split(",") if k]
    return cuda_skip or (f"sm90 {', '.join(failed)} failed its standalone check in this run" if failed else None)


def _ours_with(env: dict[str, str]):
    """This project's op with `env` set while the row is built (a backward row runs its forward there) and around
    each timed call: the opt-in Hopper kernels, the dQ kernel, the other fused-dQ tiling."""

    def make(i):
        with env_set(env):
            ours = _ours(i)

        def call():
            with env_set(env):
                return ours()

        return call

    return make


def _flex(i):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = i["qt"], i["kt"], i["vt"]
    b, _, s, _ = q.shape
    doc = i.get("doc_id")
    if doc is None:

        def mask_mod(b_, h_, qi, ki):
            return qi >= ki

        block_mask = create_block_mask(mask_mod, None, None, s, s, device=q.device)
    else:

        def mask_mod(b_, h_, qi, ki):
            return (doc[b_, qi] == doc[b_, ki]) & (qi >= ki)

        block_mask = create_block_mask(mask_mod, b, None, s, s, device=q.device)
    flex = compiled(flex_attention)
    return _fwd_or_bwd(i, lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True), (q, k, v))


def _flash_attn(i):
    import flash_attn

    q, k, v = i["q"], i["k"], i["v"]
    if i.get("cu_seqlens") is not None:
        t = q.shape[0] * q.shape[1]
        qp, kp, vp = (x.reshape(t, *x.shape[2:]) for x in (q, k, v))
        cu, mx = i["cu_seqlens"], i["max_seqlen"]
        return _fwd_or_bwd(
            i, lambda: flash_attn.flash_attn_varlen_func(qp, kp, vp, cu, cu, mx, mx, causal=True), (q, k, v)
        )
    return _fwd_or_bwd(i, lambda: flash_attn.flash_attn_func(q, k, v, causal=True), (q, k, v))


def _inputs(ctx: Context, b: int, s: int, hq: int, hkv: int, d: int, bwd: bool, docs: list[list[int]] | None):
    def make():
        q = ctx.randn(b, s, hq, d, grad=bwd)
        k = ctx.randn(b, s, hkv, d, grad=bwd)
        v = ctx.randn(b, s, hkv, d, grad=bwd)
        # the [B, H, S, D] layout SDPA and FlexAttention want: the same values, made contiguous once
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(bwd) for x in (q, k, v))
        i = {"q": q, "k": k, "v": v, "qt": qt, "kt": kt, "vt": vt, "bwd": bwd}
        if docs is not None:
            offsets = [0]
            for lengths in docs:
                for n in lengths:
                    offsets.append(offsets[-1] + n)
            i["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int32, device=ctx.device)
            i["max_seqlen"] = max(max(x) for x in docs)
            doc_id = torch.tensor([j for lengths in docs for j, n in enumerate(lengths) for _ in range(n)],
                                  device=ctx.device).view(b, s)  # fmt: skip
            i["doc_id"] = doc_id
            pos = torch.arange(s, device=ctx.device)
            allowed = (doc_id[:, :, None] == doc_id[:, None, :]) & (pos[:, None] >= pos[None, :])
            i["dense_mask"] = allowed[:, None]  # [B, 1, S, S] bool for the SDPA backends that take masks
        return i

    return make


def cases(ctx: Context) -> list[Case]:
    if ctx.cpu:
        hq, hkv, d = 4, 2, 64
        causal = [(1, 128, d)]
        doc = (1, 256, 16, 128)  # B, S, shortest, longest document
    else:
        hq, hkv, d = 32, 8, 128
        # (B, S, D): the 16384 tokens at D = 128 (Llama 3 8B-405B), then the Llama 3.2 1B training step's
        # attention (2 x 4096 tokens, D = 64)
        causal = ctx.pick([(16, 1024, d), (4, 4096, d), (1, 16384, d), (2, 4096, 64)], quick=[(4, 4096, d)])
        doc = (2, 8192, 256, 4096)
    compile_skip = ctx.compile_skip()
    dao_skip = ctx.module_skip("flash_attn", "flash-attn (Dao)")
    cuda_skip = ctx.needs_cuda()
    dq_skip = cuda_skip or ("the fused dQ is off in this run" if switched_off("L3K_BWD_FUSED_DQ") else None)
    peak = PEAK_TFLOPS["bf16"]
    out = []
    for b, s, hd in causal:
        fwd_flops = 4.0 * b * hq * s * s * hd / 2
        for mode in ("fwd", "bwd"):
            impls = [
                Impl(OURS, _ours, ours=True),
                Impl(f"{OURS} (sm90 wgmma, opt-in)", _ours_with(SM90_ENV), ours=True, skip=sm90_skip(cuda_skip)),
                Impl("SDPA flash", sdpa("FLASH_ATTENTION")),
                Impl("SDPA cuDNN", sdpa("CUDNN_ATTENTION"), skip=cuda_skip),
                Impl("SDPA efficient", sdpa("EFFICIENT_ATTENTION"), skip=cuda_skip),
                Impl("FlexAttention (compiled)", _flex, skip=compile_skip, compiles=True),
                Impl("flash-attn (Dao)", _flash_attn, skip=dao_skip),
            ]
            if mode == "bwd":
                impls.insert(
                    2,
                    Impl(
                        f"{OURS} (dQ kernel, deterministic)",
                        _ours_with({"L3K_BWD_FUSED_DQ": "0"}),
                        ours=True,
                        skip=dq_skip,
                    ),
                )
                if hd == 64:  # the fused dQ's tiling A/B (D = 128 has one m-tile a warp only)
                    impls.insert(3, Impl(f"{OURS} (fused dQ, one key m-tile a warp)", _ours_with({"L3K_BWD_TWO_MTILES": "0"}), ours=True,
                                         skip=dq_skip))  # fmt: skip
            flops = fwd_flops * (2.5 if mode == "bwd" else 1.0)
            formula = "FLOPs = 4·B·H·S²·D / 2 (causal)" + (" × 2.5 (bwd)" if mode == "bwd" else "")
            out.append(Case(FAMILY, "flash_attention causal", mode, f"B={b} S={s} H={hq}/{hkv} D={hd}", "bf16",
                            _inputs(ctx, b, s, hq, hkv, hd, mode == "bwd", None), impls, flops=flops,
                            formula=formula, peak=peak, api="flash_attention"))  # fmt: skip
    b, s, lo, hi = doc
    rng = random.Random(DOC_SEED)
    docs = [doc_lengths(s, lo, hi, rng) for _ in range(b)]
    pairs = sum(n * (n + 1) // 2 for lengths in docs for n in lengths)
    for mode in ("fwd", "bwd"):
        impls = [
            Impl(OURS, _ours, ours=True),
            Impl(f"{OURS} (sm90 wgmma, opt-in)", _ours_with(SM90_ENV), ours=True, skip=sm90_skip(cuda_skip)),
            Impl("SDPA flash", skip="SDPA's flash backend takes no attention mask (documents need varlen)"),
            Impl("SDPA cuDNN", sdpa("CUDNN_ATTENTION"), skip=cuda_skip, note="dense bool mask"),
            Impl("SDPA efficient", sdpa("EFFICIENT_ATTENTION"), skip=cuda_skip, note="dense bool mask"),
            Impl("FlexAttention (compiled)", _flex, skip=compile_skip, compiles=True),
            Impl("flash-attn (Dao)", _flash_attn, skip=dao_skip),
        ]
        if mode == "bwd":
            impls.insert(
                2,
                Impl(
                    f"{OURS} (dQ kernel, deterministic)", _ours_with({"L3K_BWD_FUSED_DQ": "0"}), ours=True, skip=dq_skip
                ),
            )
        flops = 4.0 * hq * d * pairs * (2.5 if mode == "bwd" else 1.0)
        formula = "FLOPs = 4·H·D·Σ L(L+1)/2 over documents (exact causal pairs)" + (" × 2.5" if mode == "bwd" else "")
        shape = f"B={b} S={s} H={hq}/{hkv} D={d} docs={sum(len(x) for x in docs)}"
        out.append(Case(FAMILY, "flash_attention document", mode, shape, "bf16",
                        _inputs(ctx, b, s, hq, hkv, d, mode == "bwd", docs), impls, flops=flops,
                        formula=formula, peak=peak, api="flash_attention"))  # fmt: skip
    return out
