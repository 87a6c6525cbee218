"""Cross-entropy over Llama 3's vocabulary (fwd, fwd+bwd) vs F.cross_entropy eager and compiled, and Liger.

The shape is the 1B training step's loss: 2 x 4096 tokens x 128256 classes, bf16 logits, mean over the tokens.
The peers that a Llama training loop runs: F.cross_entropy on fp32 logits (what this project's trainer ran before,
and the bench's plain-PyTorch model), the same on the bf16 logits directly (PyTorch's log_softmax then rounds to
bf16), torch.compile of the fp32 form, and Liger-Kernel's Triton cross-entropy (which writes the gradient into the
logits during the forward).

Minimum bytes, e = 2 bytes per logit, logits [M, V]:
  fwd      M·V·e     (read the logits)
  fwd+bwd  3·M·V·e   (fwd; bwd reads the logits again and writes dlogits)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama3_kernels import ops
from llama3_kernels.bench.harness import OURS, Case, Context, Impl, compiled, grads
from llama3_kernels.ops._common import switched_off

FAMILY = "loss"


def _fp32_ce(x, t):
    return F.cross_entropy(x.float(), t)


def _liger(x, t):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return liger_cross_entropy(x, t, ignore_index=-100, reduction="mean")


def _make(fn_factory, mode: str):
    def make(inp):
        f = fn_factory()
        x, t = inp["x"], inp["t"]
        if mode == "fwd+bwd":
            return lambda: grads(f(x, t), (x,), None)
        return lambda: f(x, t)

    return make


def cases(ctx: Context) -> list[Case]:
    (m, v), e = ctx.pick([(8192, 128256)], cpu=[(64, 1003)])[0], 2
    off = "cross_entropy kernels off in this run (L3K_CROSS_ENTROPY=0)" if switched_off("L3K_CROSS_ENTROPY") else None
    fns = {  # name → (factory of f(logits, targets) → scalar loss, skip reason)
        OURS: (lambda: ops.cross_entropy, off),
        "F.cross_entropy(logits.float()) eager": (lambda: _fp32_ce, None),
        "F.cross_entropy(bf16 logits) eager": (lambda: F.cross_entropy, None),
        "torch.compile(F.cross_entropy(logits.float()))": (lambda: compiled(_fp32_ce), ctx.compile_skip()),
        "Liger-Kernel": (lambda: _liger, ctx.module_skip("liger_kernel.transformers.functional", "Liger-Kernel")),
    }
    out = []
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"

        def inputs(grad=grad):
            t = torch.randint(0, v, (m,), device=ctx.device)
            t[::97] = -100  # a few ignored positions, as packed documents' last tokens are
            return {"x": ctx.randn(m, v, dtype=torch.bfloat16, scale=4.0, grad=grad), "t": t}

        if grad:
            nbytes, formula = 3 * m * v * e, "bytes = 3·M·V·2 (fwd reads the logits; bwd reads them, writes dlogits)"
        else:
            nbytes, formula = m * v * e, "bytes = M·V·2 (read the logits)"
        impls = [
            Impl(n, _make(fac, mode), ours=n == OURS, skip=skip, compiles=n.startswith("torch.compile"))
            for n, (fac, skip) in fns.items()
        ]
        out.append(Case(FAMILY, "cross_entropy", mode, f"{m}x{v}", "bf16", inputs, impls, bytes=nbytes,
                        formula=formula))  # fmt: skip
    return out
