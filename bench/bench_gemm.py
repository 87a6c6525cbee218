"""FP8 row-wise GEMM on the Llama 3 linear shapes vs torch._scaled_mm row-wise (cuBLASLt) and bf16 torch.mm.

y [M, N] bf16 = (xq [M, K] · wq [N, K]ᵀ) · x_scale[:, None] · w_scale[None, :].
  FLOPs = 2·M·N·K. MFU: fp8 impls against 1979 TFLOP/s (H100 SXM dense e4m3), bf16 torch.mm against 989.
  Minimum bytes, fp8: M·K + N·K + 4·(M + N) + 2·M·N; bf16 mm: 2·(M·K + N·K + M·N).
"""

from __future__ import annotations

import torch

from llama3_kernels import ops, reference
from llama3_kernels.bench.harness import OURS, PEAK_TFLOPS, Case, Context, Impl

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
    return out
