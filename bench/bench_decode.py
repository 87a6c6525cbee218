"""Decode attention (one new token per sequence against a full KV cache, GQA) vs SDPA, flash-attn and the reference.

Minimum bytes: 2·B·L·Hkv·D·2 (read the K and V caches once) + 2·B·Hq·D·2 (q in, out). FLOPs 4·B·Hq·L·D.
The cache is batch-major [B, L, Hkv, D] for this project and flash-attn; SDPA gets the same values laid out
[B, Hkv, L, D] (its own layout) so no impl pays for a transpose inside the timing.
"""

from __future__ import annotations

import torch

from llama3_kernels import ops, reference
from llama3_kernels.bench.bench_attention import sdpa
from llama3_kernels.bench.harness import OURS, Case, Context, Impl

FAMILY = "decode"


def _inputs(ctx: Context, b: int, length: int, hq: int, hkv: int, d: int):
    def make():
        k = ctx.randn(b, length, hkv, d)
        v = ctx.randn(b, length, hkv, d)
        q = ctx.randn(b, 1, hq, d)
        return {
            "q": q, "k": k, "v": v,
            "lens": torch.full((b,), length, dtype=torch.int32, device=ctx.device),
            "qt": q.transpose(1, 2).contiguous(), "kt": k.transpose(1, 2).contiguous(),
            "vt": v.transpose(1, 2).contiguous(),
        }  # fmt: skip

    return make


def _flash_attn(i):
    from flash_attn import flash_attn_with_kvcache

    q, k, v, lens = i["q"], i["k"], i["v"], i["lens"]
    return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)


def cases(ctx: Context) -> list[Case]:
    if ctx.cpu:
        hq, hkv, d = 4, 2, 64
        grid = [(1, 512), (4, 256)]
    else:
        hq, hkv, d = 32, 8, 128
        grid = ctx.pick([(1, 8192), (16, 8192), (1, 131072)], quick=[(1, 8192), (16, 8192)])
    dao_skip = ctx.module_skip("flash_attn", "flash-attn (Dao)")
    out = []
    for b, length in grid:
        impls = [
            Impl(OURS, lambda i: lambda: ops.decode_attention(i["q"], i["k"], i["v"], i["lens"]), ours=True),
            Impl("SDPA flash", sdpa("FLASH_ATTENTION", causal=False)),
            Impl("SDPA efficient", sdpa("EFFICIENT_ATTENTION", causal=False), skip=ctx.needs_cuda()),
            Impl("flash-attn (Dao) kvcache", _flash_attn, skip=dao_skip),
            Impl(
                "torch eager reference", lambda i: lambda: reference.decode_attention(i["q"], i["k"], i["v"], i["lens"])
            ),
        ]
        nbytes = 2 * b * length * hkv * d * 2 + 2 * b * hq * d * 2
        out.append(Case(FAMILY, "decode_attention", "decode", f"B={b} L={length} H={hq}/{hkv} D={d}", "bf16",
                        _inputs(ctx, b, length, hq, hkv, d), impls, bytes=nbytes, flops=4.0 * b * hq * length * d,
                        formula="bytes = 2·B·L·Hkv·D·2 + 2·B·Hq·D·2 (K, V caches; q, out); FLOPs = 4·B·Hq·L·D"))  # fmt: skip
    return out
