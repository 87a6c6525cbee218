"""The machine's own ceilings, measured in the same run so every TB/s and TFLOP/s above has its yardstick.

  copy     a device-to-device copy of a large bf16 tensor; bytes = 2·n·2 (read and write)
  matmul   bf16 torch.mm of N×N by N×N (cuBLAS); FLOPs = 2·N³, MFU against 989 TFLOP/s
There is no project op here: these rows are the bounds the project's rows are judged against.
"""

from __future__ import annotations

import torch

from llama3_kernels.bench.harness import PEAK_TFLOPS, Case, Context, Impl

FAMILY = "ceiling"


def cases(ctx: Context) -> list[Case]:
    n_copy = 1 << 18 if ctx.cpu else 1 << 29  # 1 GiB of bf16 on a GPU: far past L2
    n_mm = 256 if ctx.cpu else 8192

    def copy_inputs():
        return {"src": ctx.randn(n_copy), "dst": torch.empty(n_copy, dtype=torch.bfloat16, device=ctx.device)}

    def mm_inputs():
        return {"a": ctx.randn(n_mm, n_mm), "b": ctx.randn(n_mm, n_mm)}

    return [
        Case(FAMILY, "device copy", "copy", f"{n_copy} bf16", "bf16", copy_inputs,
             [Impl("torch copy_", lambda i: lambda: i["dst"].copy_(i["src"]))],
             bytes=2 * n_copy * 2, formula="bytes = 2·n·2 (read + write)"),
        Case(FAMILY, "matmul", "fwd", f"{n_mm}x{n_mm}x{n_mm}", "bf16", mm_inputs,
             [Impl("bf16 torch.mm (cuBLAS)", lambda i: lambda: torch.mm(i["a"], i["b"]))],
             flops=2.0 * n_mm**3, formula="FLOPs = 2·N³", peak=PEAK_TFLOPS["bf16"]),
    ]  # fmt: skip
