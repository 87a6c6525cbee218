"""Call every compiled kernel once on a small, odd-shaped input: the workload for compute-sanitizer.

  compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize_cases.py

Shapes are small (the sanitizer slows kernels 10-100×) and odd (M = 37, N = 760) so masked tails run.
Each launcher the extension lacks is reported and its case skipped; a launcher that runs but falls back to
the reference for these inputs would not be checked, so the cases use the dtypes and head dims the kernels
take. Exits 1 if a case raises, 2 without a GPU.
"""

from __future__ import annotations

import sys
import traceback

import torch


def _cases(dev: torch.device) -> dict[str, tuple[tuple[str, ...], object]]:
    """case name → (launchers it exercises, zero-argument callable)."""
    import llama3_kernels.ops as ops

    bf16 = torch.bfloat16

    def r(*shape, dtype=bf16, grad=False):
        return torch.randn(*shape, device=dev).to(dtype).requires_grad_(grad)

    def norm_fwd_bwd(residual: bool):
        x, w = r(37, 760, grad=True), r(760, grad=True)
        res = r(37, 760, grad=True) if residual else None
        out = ops.rms_norm(x, w, 1e-5, res)
        y = out[0] if residual else out
        torch.autograd.grad(y, (x, w), torch.randn_like(y))

    def swiglu_fwd_bwd():
        g, u = r(37, 760, grad=True), r(37, 760, grad=True)
        y = ops.swiglu(g, u)
        torch.autograd.grad(y, (g, u), torch.randn_like(y))
        gu = r(37, 2 * 760)  # the fused gate-up layout (strided halves)
        ops.swiglu(gu)

    def gemm():
        for m in (1, 37, 200):
            xq, xs = ops.quantize_fp8_rowwise(r(m, 512))
            wq, ws = ops.quantize_fp8_rowwise(r(272, 512))
            ops.fp8_rowwise_mm(xq, xs, wq, ws)
            ops.fp8_rowwise_mm(xq, xs, wq, ws, bias=r(272))

    def attention(d: int):
        q, k, v = r(2, 77, 8, d, grad=True), r(2, 77, 2, d, grad=True), r(2, 77, 2, d, grad=True)
        out = ops.flash_attention(q, k, v, causal=True)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        lens = [13, 64, 50, 27]  # packed documents, 154 tokens
        cu = torch.tensor([0, 13, 77, 127, 154], dtype=torch.int32, device=dev)
        qp, kp, vp = r(154, 8, d, grad=True), r(154, 2, d, grad=True), r(154, 2, d, grad=True)
        out = ops.flash_attention(qp, kp, vp, True, None, cu, max(lens))
        torch.autograd.grad(out, (qp, kp, vp), torch.randn_like(out))

    def decode(d: int):
        q, kc, vc = r(3, 1, 8, d), r(3, 300, 2, d), r(3, 300, 2, d)
        lens = torch.tensor([1, 150, 300], dtype=torch.int32, device=dev)
        ops.decode_attention(q, kc, vc, lens)

    return {
        "rms_norm": (("rms_norm_fwd", "rms_norm_bwd"), lambda: norm_fwd_bwd(False)),
        "rms_norm residual": (("rms_norm_fwd", "rms_norm_bwd"), lambda: norm_fwd_bwd(True)),
        "rms_norm_fp8": (("rms_norm_fp8_fwd",), lambda: ops.rms_norm_fp8(r(37, 760), r(760), residual=r(37, 760))),
        "swiglu": (("swiglu_fwd", "swiglu_bwd"), swiglu_fwd_bwd),
        "swiglu_fp8": (("swiglu_fp8_fwd",), lambda: ops.swiglu_fp8(r(37, 760), r(37, 760))),
        "quantize_fp8_rowwise": (("quantize_fp8_rowwise",), lambda: ops.quantize_fp8_rowwise(r(37, 760))),
        "fp8_rowwise_mm": (("fp8_rowwise_mm", "quantize_fp8_rowwise"), gemm),
        "flash_attention d128": (("flash_attn_fwd", "flash_attn_bwd"), lambda: attention(128)),
        "flash_attention d64": (("flash_attn_fwd", "flash_attn_bwd"), lambda: attention(64)),
        "decode_attention d128": (("decode_attn",), lambda: decode(128)),
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cases: no CUDA GPU")
        return 2
    from llama3_kernels.ops._common import has_kernel

    dev = torch.device("cuda")
    failed = 0
    for name, (launchers, fn) in _cases(dev).items():
        missing = [n for n in launchers if not has_kernel(n)]
        if missing:
            print(f"sanitize_cases: {name}: SKIPPED (not built: {', '.join(missing)})")
            continue
        try:
            fn()
            torch.cuda.synchronize()
            print(f"sanitize_cases: {name}: ran ({', '.join(launchers)})")
        except Exception:  # report every case, then fail
            failed += 1
            print(f"sanitize_cases: {name}: FAILED")
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
