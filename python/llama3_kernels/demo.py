"""The README's main job (`make run`): what was built, every op checked, then a real model generating text.

On a GPU the ops run their compiled kernels and are compared with the fp32 reference on the CPU; on a CPU-only
machine they run the references and are compared with independent torch formulas.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

import llama3_kernels as l3k
from llama3_kernels import reference


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def check_ops(device: torch.device) -> list[tuple[str, float]]:
    """Run each op once on an odd shape and return (name, max abs error vs an fp32/fp64 check)."""
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, r, w = (torch.randn(s, generator=g) for s in ((37, 1128), (37, 1128), (1128,)))
    rows = []
    y, h = l3k.rms_norm(x.to(device, dt), w.to(device), residual=r.to(device, dt))
    rows.append(("rms_norm (+residual)", _max_err(y, F.rms_norm((x + r).double(), (1128,), w.double(), eps=1e-5))))
    gate, up = torch.randn(37, 1128, generator=g), torch.randn(37, 1128, generator=g)
    rows.append(("swiglu", _max_err(l3k.swiglu(gate.to(device, dt), up.to(device, dt)), F.silu(gate) * up)))
    q, s = l3k.quantize_fp8_rowwise(x.to(device, dt))
    rel = (reference.dequantize_fp8_rowwise(q, s).cpu() - x).abs() / x.abs().amax(-1, keepdim=True)
    rows.append(("quantize_fp8 (err / row amax)", float(rel.max())))
    xq, xs = l3k.quantize_fp8_rowwise(torch.randn(37, 1152, generator=g).to(device, dt))  # K, N multiples of 16
    wq, ws = l3k.quantize_fp8_rowwise(torch.randn(64, 1152, generator=g).to(device) * 0.02)
    y = l3k.fp8_rowwise_mm(xq, xs, wq, ws, out_dtype=torch.float32)
    want = (xq.double().cpu() @ wq.double().cpu().t()) * xs.double().cpu()[:, None] * ws.double().cpu()
    rows.append(("fp8_rowwise_mm", _max_err(y, want)))
    qa, ka, va = (torch.randn(2, 37, h, 64, generator=g) for h in (8, 2, 2))
    out = l3k.flash_attention(qa.to(device, dt), ka.to(device, dt), va.to(device, dt), causal=True)
    ref = F.scaled_dot_product_attention(
        qa.transpose(1, 2), ka.repeat_interleave(4, 2).transpose(1, 2), va.repeat_interleave(4, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)  # fmt: skip
    rows.append(("flash_attention (causal GQA)", _max_err(out, ref)))
    logits, targets = torch.randn(37, 1003, generator=g) * 4, torch.randint(0, 1003, (37,), generator=g)
    loss = l3k.cross_entropy(logits.to(device, dt), targets.to(device), reduction="none")
    rows.append(("cross_entropy", _max_err(loss, F.cross_entropy(logits.to(dt).double(), targets, reduction="none"))))
    return rows


def main(argv: list[str]) -> int:
    report = l3k.info()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("== llama3_kernels", report["version"], "| torch", report["torch"], "| gpu:", json.dumps(report["gpu"]))
    print("extension:", report["extension"])
    for op, path in report["cuda_ops"].items():
        print(f"  {op:22s} CUDA path: {path}")
    print(f"\n== ops on {device} (max abs error vs an independent fp64 formula)")
    for name, err in check_ops(device):
        print(f"  {name:32s} {err:.2e}")
    print("\n== generation: SmolLM2-135M-Instruct (real weights, Q4_1 GGUF dequantized) through these ops")
    start = time.time()
    from llama3_kernels.generate import main as generate_main

    prompt = "What is the capital of France? Answer in one sentence, then name one famous landmark there."
    rc = generate_main(["--model", "smollm2-135m", "--chat", "--prompt", prompt, "--max-new-tokens", "48"])
    print(f"(generation took {time.time() - start:.1f} s including loading)")
    print("\n== benches, this project's ops beside their peers (on a CPU: reference timings, labelled so)")
    from llama3_kernels.bench.cli import main as bench_main

    return rc or bench_main(["--quick"])
