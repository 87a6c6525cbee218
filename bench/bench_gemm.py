"""FP8 row-wise GEMM on the Llama 3 linear shapes vs torch._scaled_mm row-wise (cuBLASLt) and bf16 torch.mm;
the 16-bit decode GEMV (one token, norm or SwiGLU fused in) vs F.linear (cuBLAS) after the unfused ops.

y [M, N] bf16 = (xq [M, K] · wq [N, K]ᵀ) · x_scale[:, None] · w_scale[None, :].
  FLOPs = 2·M·N·K. MFU: fp8 impls against 1979 TFLOP/s (H100 SXM dense e4m3), bf16 torch.mm against 989.
  Minimum bytes, fp8: M·K + N·K + 4·(M + N) + 2·M·N; bf16 mm: 2·(M·K + N·K + M·N).
Decode GEMV rows (M = 1, bf16): bytes = 2·(N·K + N) + the prologue's input (2·K, rms_norm with a residual 4·K and
its weight 2·K, SwiGLU 4·K); the weight dominates.
"""

from __future__ import annotations

import torch

from llama3_kernels import ops, reference
from llama3_kernels.bench.harness import OURS, PEAK_TFLOPS, Case, Context, Impl
from llama3_kernels.ops._common import switched_off

FAMILY = "gemm"

# (name, N, K) of the Llama 3 linears: fused q/k/v, o, fused w1/w3, w2
SHAPES = [
    ("8B qkv", 6144, 4096),
    ("8B o", 4096, 4096),
    ("8B w13", 28672, 4096),
    ("8B w2", 4096, 14336),
    ("70B w13", 57344, 8192),
    ("70B w2", 8192, 28672),
    ("405B w13", 106496, 16384),
    ("405B w2", 16384, 53248),
]
M_VALUES = [1, 16, 128, 1024, 8192]


def _inputs(ctx: Context, m: int, n: int, k: int):
    def make():
        x = ctx.randn(m, k)
        w = ctx.randn(n, k, scale=0.02)
        xq, xs = reference.quantize_fp8_rowwise(x)
        wq, ws = reference.quantize_fp8_rowwise(w)
        return {"x": x, "w": w, "xq": xq, "xs": xs, "wq": wq, "ws": ws}

    return make


def _ours(i):
    return lambda: ops.fp8_rowwise_mm(i["xq"], i["xs"], i["wq"], i["ws"])


def _scaled_mm(i):
    xq, wq = i["xq"], i["wq"]
    xs, ws = i["xs"].view(-1, 1), i["ws"].view(1, -1)  # row-wise: [M, 1] and [1, N] fp32 scales
    return lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)


def _bf16_mm(i):
    x, wt = i["x"], i["w"].t()
    return lambda: torch.mm(x, wt)


# (name, N, K, prologue) of a Llama 3.2-1B decode step (and the 8B's largest), M = 1
DECODE_SHAPES = [
    ("1B norm+qkv", 3072, 2048, "rms_norm"),
    ("1B o", 2048, 2048, "none"),
    ("1B norm+w13", 16384, 2048, "rms_norm"),
    ("1B swiglu+w2", 2048, 8192, "swiglu"),
    ("1B norm+lm_head", 128256, 2048, "rms_norm"),
    ("8B swiglu+w2", 4096, 14336, "swiglu"),
]


def _decode_inputs(ctx: Context, n: int, k: int, prologue: str):
    def make():
        kx = 2 * k if prologue == "swiglu" else k
        return {"x": ctx.randn(1, kx), "h": ctx.randn(1, k), "g": ctx.randn(k), "w": ctx.randn(n, k, scale=0.02)}

    return make


def _decode_ours(prologue: str):
    def make(i):
        x, h, g, w = i["x"], i["h"], i["g"], i["w"]
        if prologue == "rms_norm":
            return lambda: ops.rms_norm_linear(x, g, 1e-5, w, residual=h)
        if prologue == "swiglu":
            return lambda: ops.swiglu_linear(x, w)
        return lambda: ops.decode_linear(x, w)

    return make


def _decode_unfused(prologue: str, torch_ops: bool):
    """The same math as separate ops then F.linear: this library's norm/SwiGLU kernels, or PyTorch's own."""

    def make(i):
        x, h, g, w = i["x"], i["h"], i["g"], i["w"]
        if prologue == "rms_norm":
            if torch_ops:
                return lambda: torch.nn.functional.linear(
                    torch.nn.functional.rms_norm(x + h, (x.shape[-1],), g, 1e-5), w
                )
            return lambda: torch.nn.functional.linear(ops.rms_norm(x, g, 1e-5, h)[0], w)
        if prologue == "swiglu":
            k = w.shape[1]
            if torch_ops:
                return lambda: torch.nn.functional.linear(torch.nn.functional.silu(x[:, :k]) * x[:, k:], w)
            return lambda: torch.nn.functional.linear(ops.swiglu(x), w)
        return lambda: torch.nn.functional.linear(x, w)

    return make


def decode_cases(ctx: Context) -> list[Case]:
    shapes = [("tiny norm+proj", 96, 256, "rms_norm"), ("tiny swiglu+w2", 64, 256, "swiglu")] if ctx.cpu else (
        ctx.pick(DECODE_SHAPES, quick=DECODE_SHAPES[3:5]))  # fmt: skip
    formula = ("bytes = 2·(N·K + N) + prologue input (rms_norm + residual: 6·K, swiglu: 4·K); "
               "FLOPs = 2·N·K; the unfused peers also write and re-read the norm/SwiGLU output")  # fmt: skip
    out = []
    for name, n, k, prologue in shapes:
        extra = {"rms_norm": 6 * k, "swiglu": 4 * k, "none": 2 * k}[prologue]
        off = "decode GEMV off in this run (L3K_DECODE_GEMV=0)" if switched_off("L3K_DECODE_GEMV") else None
        impls = [
            Impl(OURS, _decode_ours(prologue), ours=True, skip=off),
            Impl("llama3_kernels ops + F.linear (unfused)", _decode_unfused(prologue, False)),
            Impl("PyTorch ops + F.linear (cuBLAS)", _decode_unfused(prologue, True)),
        ]
        out.append(Case(FAMILY, "decode_linear", "fwd", f"{name} M=1 N={n} K={k}", "bf16",
                        _decode_inputs(ctx, n, k, prologue), impls, bytes=2.0 * (n * k + n) + extra,
                        flops=2.0 * n * k, formula=formula, peak=PEAK_TFLOPS["bf16"], api="decode_linear"))  # fmt: skip
    return out + [_qkv_rope_cache_case(ctx)]


def _qkv_rope_cache_case(ctx: Context) -> Case:
    """A decode step's attention input (the 1B's norm + q/k/v projection + RoPE + cache append, one token) in one
    kernel, against this library's two kernels (rms_norm_linear, rope_kv_cache) and PyTorch's ops."""
    hq, hkv, d, k, length = (4, 2, 16, 256, 64) if ctx.cpu else (32, 8, 64, 2048, 4096)
    n = (hq + 2 * hkv) * d

    def make():
        angles = torch.rand(1, 1, d // 2, device=ctx.device) * 100
        return {
            "x": ctx.randn(1, 1, k), "h": ctx.randn(1, 1, k), "g": ctx.randn(k), "w": ctx.randn(n, k, scale=0.02),
            "rot": torch.polar(torch.ones_like(angles), angles),
            "pos": torch.full((1, 1), length - 1, dtype=torch.long, device=ctx.device),
            "kc": ctx.randn(1, length, hkv, d), "vc": ctx.randn(1, length, hkv, d),
        }  # fmt: skip

    def ours(i):
        x, h, g, w, rot, pos, kc, vc = (i[key] for key in ("x", "h", "g", "w", "rot", "pos", "kc", "vc"))
        return lambda: ops.rms_norm_qkv_rope_cache(x, g, 1e-5, w, rot, pos, kc, vc, hq, residual=h)[0]

    def unfused(torch_ops: bool):
        def make_fn(i):
            x, h, g, w, rot, pos, kc, vc = (i[key] for key in ("x", "h", "g", "w", "rot", "pos", "kc", "vc"))
            if torch_ops:
                return lambda: reference.rope_kv_cache(
                    torch.nn.functional.linear(torch.nn.functional.rms_norm(x + h, (k,), g, 1e-5), w),
                    rot, pos, kc, vc, hq,
                )  # fmt: skip
            return lambda: ops.rope_kv_cache(ops.rms_norm_linear(x, g, 1e-5, w, residual=h)[0], rot, pos, kc, vc, hq)

        return make_fn

    off = "decode GEMV off in this run (L3K_DECODE_GEMV=0)" if switched_off("L3K_DECODE_GEMV") else None
    impls = [
        Impl(OURS, ours, ours=True, skip=off),
        Impl("llama3_kernels rms_norm_linear + rope_kv_cache (2 kernels)", unfused(False)),
        Impl("PyTorch ops + F.linear (cuBLAS) + complex RoPE + index_put", unfused(True)),
    ]
    return Case(FAMILY, "decode_linear", "fwd", f"1B norm+qkv+rope+cache M=1 N={n} K={k}", "bf16", make, impls,
                bytes=2.0 * (n * k + n) + 8 * k + 4 * d, flops=2.0 * n * k,
                formula="bytes = 2·(N·K + N) (weight; q, k, v out) + 8·K (x, residual, norm weight, h) + 4·D (angles)",
                peak=PEAK_TFLOPS["bf16"], api="rms_norm_qkv_rope_cache")  # fmt: skip


def cases(ctx: Context) -> list[Case]:
    if ctx.tier == "cpu":
        grid = [("tiny", 256, 512, m) for m in (1, 16, 37)]
    elif ctx.tier == "quick":
        grid = [(name, n, k, m) for name, n, k in (SHAPES[2], SHAPES[5]) for m in (16, 8192)]
    else:
        grid = [(name, n, k, m) for name, n, k in SHAPES for m in M_VALUES]
    formula = ("FLOPs = 2·M·N·K; bytes fp8 = M·K + N·K + 4·(M+N) + 2·M·N, bf16 = 2·(M·K + N·K + M·N); "
               "MFU vs 1979 TFLOP/s for fp8, 989 for bf16 torch.mm")  # fmt: skip
    out = []
    for name, n, k, m in grid:
        fp8_bytes = m * k + n * k + 4 * (m + n) + 2 * m * n
        impls = [
            Impl(OURS, _ours, ours=True),
            Impl("torch._scaled_mm row-wise (cuBLASLt)", _scaled_mm, skip=ctx.needs_cuda()),
            Impl("bf16 torch.mm", _bf16_mm, bytes=2 * (m * k + n * k + m * n), peak=PEAK_TFLOPS["bf16"]),
        ]
        out.append(Case(FAMILY, "fp8_rowwise_mm", "fwd", f"{name} M={m} N={n} K={k}", "e4m3→bf16",
                        _inputs(ctx, m, n, k), impls, bytes=fp8_bytes, flops=2.0 * m * n * k,
                        formula=formula, peak=PEAK_TFLOPS["fp8"]))  # fmt: skip
    return out + decode_cases(ctx)
