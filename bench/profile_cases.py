"""Kernels for Nsight Compute to profile in the device check: one launch of each, on bench-sized inputs.

    ncu --clock-control none --launch-count 8 \
        --kernel-name regex:'rms_norm_(fwd|bwd)_kernel|flash_fwd_kernel|dkdv_kernel|dq_kernel|flash_fwd_sm90|dq_sm90|dkdv_sm90' \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        python3 bench/profile_cases.py

The open questions these answer (bench/results/README.md): why the RMSNorm forward reaches 3.0 TB/s where
Liger reaches 3.9 on the same H200, why its backward trails F.rms_norm, and what bounds the mma.sync
attention forward at ~200 TFLOP/s and its backward (dK/dV and dQ kernels) at ~140 (ldmatrix, tensor-core issue,
softmax, or occupancy); and, unless the device check's gate kept them out, the opt-in Hopper attention kernels on
the Llama 3.2-1B training step's attention (D = 64), where issue 5's MFU is decided.
"""

import torch

import llama3_kernels as l3k
from llama3_kernels.bench.bench_attention import SM90_ENV, sm90_skip
from llama3_kernels.bench.harness import env_set


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_cases.py: needs a GPU")
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(16384, 4096, device=dev, dtype=bf16, requires_grad=True)
    w = torch.randn(4096, device=dev, dtype=bf16, requires_grad=True)
    y = l3k.rms_norm(x, w, 1e-5)  # rms_norm_fwd_kernel
    y.backward(torch.randn_like(y))  # rms_norm_bwd_kernel
    q = torch.randn(1, 4096, 32, 128, device=dev, dtype=bf16)
    k = torch.randn(1, 4096, 8, 128, device=dev, dtype=bf16)
    k.requires_grad_(True)
    q.requires_grad_(True)
    v = torch.randn_like(k, requires_grad=True)
    out = l3k.flash_attention(q, k, v, causal=True)  # flash_fwd_kernel
    out.backward(torch.randn_like(out))  # dot_do_o_kernel, dkdv_kernel, dq_kernel
    torch.cuda.synchronize()
    print("profile_cases: ran rms_norm fwd/bwd 16384x4096 and causal attention fwd/bwd B=1 S=4096 H=32/8 D=128")
    if reason := sm90_skip(None):  # bench/device_check.sh: a Hopper kernel failed its standalone check
        print(f"profile_cases: sm90 attention skipped, {reason}")
        return
    # the opt-in Hopper kernels on the Llama 3.2-1B training step's attention (D = 64)
    q, k, v = (torch.randn(2, 4096, h, 64, device=dev, dtype=bf16, requires_grad=True) for h in (32, 8, 8))
    with env_set(SM90_ENV):
        out = l3k.flash_attention(q, k, v, causal=True)  # flash_fwd_sm90_kernel
        out.backward(torch.randn_like(out))  # dsum_sm90_kernel, dq_sm90_kernel, dkdv_sm90_kernel
        torch.cuda.synchronize()
    print("profile_cases: ran the sm90 attention fwd/bwd B=2 S=4096 H=32/8 D=64")


if __name__ == "__main__":
    main()
