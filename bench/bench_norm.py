"""RMSNorm (fwd, fwd+bwd, fused residual fwd) vs the eager reference, F.rms_norm, torch.compile and Liger.

Minimum bytes, e = bytes per element, x [M, N]:
  fwd            2·M·N·e + N·e        (read x, write y, read weight)
  fwd+bwd        5·M·N·e + 3·N·e      (fwd; bwd reads dy and x, writes dx; weight read twice, dweight written)
  fwd residual   4·M·N·e + N·e        (read x and residual, write y and the new residual h)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama3_kernels import ops, reference
from llama3_kernels.bench.harness import OURS, Case, Context, Impl, compiled, grads

FAMILY = "norm"
EPS = 1e-5


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _liger(x, w, eps):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # offset 0, Llama casting (fp32 compute, cast before the weight multiply), dY not overwritten in place
    return LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)


def _f_rms_norm(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _add_then(norm, x, w, r):
    """The unfused residual form peers without one use: h = x + r, then the norm; returns (y, h)."""
    h = x + r
    return norm(h, w, EPS), h


def _fns(residual: bool):
    """name → f(x, w, r) returning y (and h with a residual), the same math for every impl."""
    if residual:
        return {
            OURS: lambda x, w, r: ops.rms_norm(x, w, EPS, r),
            "torch eager reference": lambda x, w, r: reference.rms_norm(x, w, EPS, r)[:2],
            "F.rms_norm": lambda x, w, r: _add_then(_f_rms_norm, x, w, r),
            "torch.compile(reference)": None,  # built lazily below (compiling is part of warm-up)
            "Liger-Kernel": lambda x, w, r: _add_then(_liger, x, w, r),
        }
    return {
        OURS: lambda x, w, r: ops.rms_norm(x, w, EPS),
        "torch eager reference": lambda x, w, r: reference.rms_norm(x, w, EPS)[0],
        "F.rms_norm": lambda x, w, r: _f_rms_norm(x, w, EPS),
        "torch.compile(reference)": None,
        "Liger-Kernel": lambda x, w, r: _liger(x, w, EPS),
    }


def _make(name: str, fn, mode: str, residual: bool):
    def make(inp):
        f = fn
        if f is None:
            cref = compiled(reference.rms_norm)
            f = (lambda x, w, r: cref(x, w, EPS, r)[:2]) if residual else (lambda x, w, r: cref(x, w, EPS)[0])
        x, w, r, dy = inp["x"], inp["w"], inp["r"], inp["dy"]
        if mode == "fwd+bwd":
            return lambda: grads(_first(f(x, w, r)), (x, w), dy)
        return lambda: f(x, w, r)

    return make


def cases(ctx: Context) -> list[Case]:
    shapes = ctx.pick([(16384, 4096), (16384, 8192), (4096, 16384)], cpu=[(256, 1024), (37, 760)])
    dtype, e = torch.bfloat16, 2
    skips = {
        "torch.compile(reference)": ctx.compile_skip(),
        "Liger-Kernel": ctx.module_skip("liger_kernel.ops.rms_norm", "Liger-Kernel"),
    }
    out = []
    for m, n in shapes:
        for mode, residual in (("fwd", False), ("fwd+bwd", False), ("fwd residual", True)):
            grad = mode == "fwd+bwd"

            def inputs(m=m, n=n, grad=grad, residual=residual):
                return {
                    "x": ctx.randn(m, n, dtype=dtype, grad=grad),
                    "w": ctx.randn(n, dtype=dtype).add(1.0).requires_grad_(grad),
                    "r": ctx.randn(m, n, dtype=dtype) if residual else None,
                    "dy": ctx.randn(m, n, dtype=dtype) if grad else None,
                }

            if mode == "fwd":
                nbytes, formula = 2 * m * n * e + n * e, "bytes = 2·M·N·2 + N·2 (read x, write y, read weight)"
            elif mode == "fwd+bwd":
                nbytes = 5 * m * n * e + 3 * n * e
                formula = "bytes = 5·M·N·2 + 3·N·2 (fwd 2·M·N; bwd reads dy, x, writes dx; weight ×2, dweight)"
            else:
                nbytes, formula = 4 * m * n * e + n * e, "bytes = 4·M·N·2 + N·2 (read x, residual; write y, h)"
            impls = [
                Impl(
                    name, _make(name, fn, mode, residual), ours=name == OURS, skip=skips.get(name), compiles=fn is None
                )
                for name, fn in _fns(residual).items()
            ]
            out.append(Case(FAMILY, "rms_norm", mode, f"{m}x{n}", "bf16", inputs, impls, bytes=nbytes,
                            formula=formula))  # fmt: skip
    return out
