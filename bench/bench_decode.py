"""Decode attention (one new token per sequence against a full KV cache, GQA) vs SDPA, flash-attn and the reference;
and rope_kv_cache (RoPE on q, k of a fused qkv + the cache append) vs the eager ops it replaces and their compiled form.

Minimum bytes: 2·B·L·Hkv·D·2 (read the K and V caches once) + 2·B·Hq·D·2 (q in, out). FLOPs 4·B·Hq·L·D.
rope_kv_cache: B·(Hq + 2 Hkv)·D·2 read, the same written (q out, k and v into the cache), + B·D/2·8 of angles.
The cache is batch-major [B, L, Hkv, D] for this project and flash-attn; SDPA gets the same values laid out
[B, Hkv, L, D] (its own layout) so no impl pays for a transpose inside the timing.
"""

from __future__ import annotations

import torch

from llama3_kernels import ops, reference
from llama3_kernels.bench.bench_attention import sdpa
from llama3_kernels.bench.harness import OURS, Case, Context, Impl, compiled, env_set
from llama3_kernels.ops._common import switched_off

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


def _ours_combine(i):
    """This project's op with its splits merged by the combine kernel (the path before the cluster merge)."""
    q, k, v, lens = i["q"], i["k"], i["v"], i["lens"]

    def call():
        with env_set({"L3K_DECODE_CLUSTER": "0"}):
            return ops.decode_attention(q, k, v, lens)

    return call


def _flash_attn(i):
    from flash_attn import flash_attn_with_kvcache

    q, k, v, lens = i["q"], i["k"], i["v"], i["lens"]
    return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)


def _rope_inputs(ctx: Context, b: int, hq: int, hkv: int, d: int, length: int):
    def make():
        angles = torch.rand(b, 1, d // 2, device=ctx.device) * 1000.0
        return {
            "qkv": ctx.randn(b, 1, (hq + 2 * hkv) * d), "rot": torch.polar(torch.ones_like(angles), angles),
            "pos": torch.randint(0, length, (b, 1), device=ctx.device),
            "kc": ctx.randn(b, length, hkv, d), "vc": ctx.randn(b, length, hkv, d),
        }  # fmt: skip

    return make


def _rope_cases(ctx: Context) -> list[Case]:
    hq, hkv, d, length = (4, 2, 64, 256) if ctx.cpu else (32, 8, 128, 8192)
    cref = None

    def ref_compiled(i):
        nonlocal cref
        cref = cref or compiled(reference.rope_kv_cache)
        return lambda: cref(i["qkv"], i["rot"], i["pos"], i["kc"], i["vc"], hq)

    out = []
    for b in ctx.pick([1, 16], cpu=[1, 4]):
        impls = [
            Impl(OURS, lambda i: lambda: ops.rope_kv_cache(i["qkv"], i["rot"], i["pos"], i["kc"], i["vc"], hq),
                 ours=True),
            Impl("torch eager (complex multiply, index_put)",
                 lambda i: lambda: reference.rope_kv_cache(i["qkv"], i["rot"], i["pos"], i["kc"], i["vc"], hq)),
            Impl("torch.compile(reference)", ref_compiled, skip=ctx.compile_skip(), compiles=True),
        ]  # fmt: skip
        nbytes = 2 * b * (hq + 2 * hkv) * d * 2 + b * d // 2 * 8
        out.append(Case(FAMILY, "rope_kv_cache", "decode", f"B={b} H={hq}/{hkv} D={d}", "bf16",
                        _rope_inputs(ctx, b, hq, hkv, d, length), impls, bytes=nbytes,
                        formula="bytes = 2·B·(Hq + 2·Hkv)·D·2 + B·D/2·8 (qkv in; q, k, v out; cos/sin)"))  # fmt: skip
    return out


def cases(ctx: Context) -> list[Case]:
    if ctx.cpu:
        grid = [(1, 512, 4, 2, 64), (4, 256, 4, 2, 64)]
    else:  # the issue's shapes (8B heads), then the 1B model's decode step (head dim 64, a 4096-token cache)
        issue = [(1, 8192, 32, 8, 128), (16, 8192, 32, 8, 128), (1, 131072, 32, 8, 128)]
        grid = ctx.pick([*issue, (1, 4096, 32, 8, 64)], quick=issue[:2])
    dao_skip = ctx.module_skip("flash_attn", "flash-attn (Dao)")
    combine_skip = "the cluster merge is off in this run" if switched_off("L3K_DECODE_CLUSTER") else None
    out = []
    for b, length, hq, hkv, d in grid:
        impls = [
            Impl(OURS, lambda i: lambda: ops.decode_attention(i["q"], i["k"], i["v"], i["lens"]), ours=True),
            Impl(f"{OURS} (split combine kernel)", _ours_combine, ours=True, skip=combine_skip or ctx.needs_cuda()),
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
    return out + _rope_cases(ctx)
