"""Row-wise FP8 producers: quantize, RMSNorm→FP8 and SwiGLU→FP8, vs the eager and compiled references.

Minimum bytes (bf16 in, e4m3 out, one fp32 scale per row), x [M, N]:
  quantize_fp8_rowwise  M·N·2 + M·N + 4·M        (read x; write q, scale)
  rms_norm_fp8          M·N·2 + N·2 + M·N + 4·M  (read x, weight; write q, scale)
  swiglu_fp8            2·M·N·2 + M·N + 4·M      (read gate, up; write q, scale)
"""

from __future__ import annotations

from llama3_kernels import ops, reference
from llama3_kernels.bench.harness import OURS, Case, Context, Impl, compiled

FAMILY = "fp8"
EPS, AMAX_UB = 1e-5, 1200.0

# op → (our call, reference call, bytes(M, N), formula); each call takes the inputs dict
OPS = {
    "quantize_fp8_rowwise": (
        lambda i: ops.quantize_fp8_rowwise(i["x"], AMAX_UB),
        lambda f, i: f(i["x"], AMAX_UB),
        reference.quantize_fp8_rowwise,
        lambda m, n: m * n * 2 + m * n + 4 * m,
        "bytes = M·N·2 + M·N + 4·M (read x; write q, scale)",
    ),
    "rms_norm_fp8": (
        lambda i: ops.rms_norm_fp8(i["x"], i["w"], EPS, amax_ub=AMAX_UB),
        lambda f, i: f(i["x"], i["w"], EPS, None, AMAX_UB),
        reference.rms_norm_fp8,
        lambda m, n: m * n * 2 + n * 2 + m * n + 4 * m,
        "bytes = M·N·2 + N·2 + M·N + 4·M (read x, weight; write q, scale)",
    ),
    "swiglu_fp8": (
        lambda i: ops.swiglu_fp8(i["x"], i["u"], AMAX_UB),
        lambda f, i: f(i["x"], i["u"], AMAX_UB),
        reference.swiglu_fp8,
        lambda m, n: 2 * m * n * 2 + m * n + 4 * m,
        "bytes = 2·M·N·2 + M·N + 4·M (read gate, up; write q, scale)",
    ),
}


def cases(ctx: Context) -> list[Case]:
    norm_shapes = ctx.pick([(16384, 4096), (16384, 8192), (4096, 16384)], cpu=[(256, 1024), (37, 760)])
    shapes = {
        "quantize_fp8_rowwise": norm_shapes,
        "rms_norm_fp8": norm_shapes,
        "swiglu_fp8": ctx.pick([(16384, 14336)], cpu=[(256, 1024)]),
    }
    out = []
    for op, (ours, call, ref, nbytes, formula) in OPS.items():
        for m, n in shapes[op]:

            def inputs(m=m, n=n, op=op):
                return {
                    "x": ctx.randn(m, n),
                    "w": ctx.randn(n).add(1.0) if op == "rms_norm_fp8" else None,
                    "u": ctx.randn(m, n) if op == "swiglu_fp8" else None,
                }

            def make_compiled(i, call=call, ref=ref):
                f = compiled(ref)
                return lambda: call(f, i)

            impls = [
                Impl(OURS, lambda i, ours=ours: lambda: ours(i), ours=True),
                Impl("torch eager reference", lambda i, call=call, ref=ref: lambda: call(ref, i)),
                Impl("torch.compile(reference)", make_compiled, skip=ctx.compile_skip(), compiles=True),
            ]
            out.append(Case(FAMILY, op, "fwd", f"{m}x{n}", "bf16→e4m3", inputs, impls, bytes=nbytes(m, n),
                            formula=formula))  # fmt: skip
    return out
