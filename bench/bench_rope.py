"""RoPE on a training step's q and k (fwd, fwd+bwd): ops.rope vs the complex-multiply form, torch.compile and Liger.

The shape is the Llama 3.2-1B training step's: 2 x 4096 tokens, 32 query and 8 KV heads of dim 64, bf16, one
rotation table shared by the batch. Peers: this model's former path (fp32 cast, complex multiply, cast back, the
same values as ops.rope), torch.compile of the real-arithmetic form, and Liger-Kernel's Triton RoPE (Hugging Face's
rotate-half pairing: the same work on other pairs; it takes q, k as [B, H, S, D] views).

Minimum bytes, e = 2, T = B·S tokens:
  fwd      2·T·(Hq + Hkv)·D·e   (read q and k, write the rotated pair)
  fwd+bwd  4·T·(Hq + Hkv)·D·e   (fwd; bwd reads dq, dk and writes their inverse rotation)
"""

from __future__ import annotations

import torch

from llama3_kernels import ops
from llama3_kernels.bench.harness import OURS, Case, Context, Impl, compiled, grads
from llama3_kernels.model.rope import rotate_pairs

FAMILY = "rope"


def _pair(fn):
    return lambda q, k, rot: (fn(q, rot), fn(k, rot))


def _liger(i):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rotary_pos_emb(i["qt"], i["kt"], i["cos"], i["sin"])


def _make(fn_factory, mode: str):
    def make(i):
        f = fn_factory()
        q, k, rot = i["q"], i["k"], i["rot"]
        if mode == "fwd+bwd":
            return lambda: grads(f(q, k, rot), (q, k), (i["dq"], i["dk"]))
        return lambda: f(q, k, rot)

    return make


def _make_liger(mode: str):
    def make(i):
        if mode == "fwd+bwd":
            return lambda: grads(_liger(i), (i["q"], i["k"]), (i["dqt"], i["dkt"]))
        return lambda: _liger(i)

    return make


def cases(ctx: Context) -> list[Case]:
    b, s, hq, hkv, d = (1, 64, 4, 2, 64) if ctx.cpu else (2, 4096, 32, 8, 64)
    e = 2
    fns = {  # name → (factory of f(q, k, rot) → (q', k'), skip reason)
        OURS: (lambda: _pair(ops.rope), None),
        "complex multiply eager (the model's former path)": (lambda: _pair(rotate_pairs), None),
        "torch.compile (real arithmetic)": (lambda: compiled(_pair(rotate_pairs)), ctx.compile_skip()),
    }
    liger_skip = ctx.module_skip("liger_kernel.transformers.rope", "Liger-Kernel")
    out = []
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"

        def inputs(grad=grad):
            q = ctx.randn(b, s, hq, d, grad=grad)
            k = ctx.randn(b, s, hkv, d, grad=grad)
            angles = torch.rand(s, d // 2, device=ctx.device) * s
            rot = torch.polar(torch.ones_like(angles), angles)  # [S, D/2] complex64, shared by the batch
            cos = torch.cat([rot.real, rot.real], -1)[None].to(torch.bfloat16)  # [1, S, D]: rotate-half tables
            sin = torch.cat([rot.imag, rot.imag], -1)[None].to(torch.bfloat16)
            i = {"q": q, "k": k, "rot": rot, "cos": cos, "sin": sin, "qt": q.transpose(1, 2), "kt": k.transpose(1, 2)}
            if grad:
                i["dq"], i["dk"] = ctx.randn(b, s, hq, d), ctx.randn(b, s, hkv, d)
                i["dqt"], i["dkt"] = i["dq"].transpose(1, 2), i["dk"].transpose(1, 2)
            return i

        per_pass = 2 * b * s * (hq + hkv) * d * e
        if grad:
            nbytes, formula = 2 * per_pass, "bytes = 4·T·(Hq + Hkv)·D·2 (fwd reads and writes q, k; bwd dq, dk)"
        else:
            nbytes, formula = per_pass, "bytes = 2·T·(Hq + Hkv)·D·2 (read q and k, write them rotated)"
        impls = [
            Impl(n, _make(fac, mode), ours=n == OURS, skip=skip, compiles=n.startswith("torch.compile"))
            for n, (fac, skip) in fns.items()
        ]
        impls.append(Impl("Liger-Kernel (rotate-half pairs)", _make_liger(mode), skip=liger_skip))
        out.append(Case(FAMILY, "rope q, k", mode, f"B={b} S={s} H={hq}/{hkv} D={d}", "bf16", inputs, impls,
                        bytes=nbytes, formula=formula, api="rope"))  # fmt: skip
    return out
