"""SwiGLU silu(gate)·up (fwd, fwd+bwd) vs the eager reference, bf16 eager F.silu·up, torch.compile and Liger.

Minimum bytes, e = bytes per element, gate and up [M, F]:
  fwd      3·M·F·e   (read gate, up; write y)
  fwd+bwd  8·M·F·e   (fwd; bwd reads dy, gate, up and writes dgate, dup)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama3_kernels import ops, reference
from llama3_kernels.bench.harness import OURS, Case, Context, Impl, compiled, grads

FAMILY = "swiglu"


def _liger(g, u):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(g, u)


def _make(fn_factory, mode: str):
    def make(inp):
        f = fn_factory()
        g, u, dy = inp["g"], inp["u"], inp["dy"]
        if mode == "fwd+bwd":
            return lambda: grads(f(g, u), (g, u), dy)
        return lambda: f(g, u)

    return make


def cases(ctx: Context) -> list[Case]:
    shapes = ctx.pick([(16384, 14336), (8192, 28672)], cpu=[(256, 1024), (37, 760)])
    dtype, e = torch.bfloat16, 2
    fns = {  # name → (factory of f(gate, up), skip reason)
        OURS: (lambda: ops.swiglu, None),
        "torch eager reference": (lambda: reference.swiglu, None),
        "F.silu(gate)·up eager": (lambda: lambda g, u: F.silu(g) * u, None),
        "torch.compile(reference)": (lambda: compiled(reference.swiglu), ctx.compile_skip()),
        "Liger-Kernel": (lambda: _liger, ctx.module_skip("liger_kernel.ops.swiglu", "Liger-Kernel")),
    }
    out = []
    for m, f in shapes:
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"

            def inputs(m=m, f=f, grad=grad):
                return {
                    "g": ctx.randn(m, f, dtype=dtype, grad=grad),
                    "u": ctx.randn(m, f, dtype=dtype, grad=grad),
                    "dy": ctx.randn(m, f, dtype=dtype) if grad else None,
                }

            if grad:
                nbytes, formula = (
                    8 * m * f * e,
                    "bytes = 8·M·F·2 (fwd 3·M·F; bwd reads dy, gate, up, writes dgate, dup)",
                )
            else:
                nbytes, formula = 3 * m * f * e, "bytes = 3·M·F·2 (read gate, up; write y)"
            impls = [
                Impl(n, _make(fac, mode), ours=n == OURS, skip=skip, compiles=n.startswith("torch.compile"))
                for n, (fac, skip) in fns.items()
            ]
            out.append(Case(FAMILY, "swiglu", mode, f"{m}x{f}", "bf16", inputs, impls, bytes=nbytes, formula=formula))
    return out
