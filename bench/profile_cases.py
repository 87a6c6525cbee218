"""Kernels for Nsight Compute to profile in the device check: one launch of each, on bench-sized inputs.

    ncu --clock-control none --kernel-name regex:'rms_norm_(fwd|bwd)_kernel|flash_fwd_kernel|dkdv_kernel|dq_kernel' \
        --launch-count 5 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        python3 bench/profile_cases.py

The open questions these answer (bench/results/README.md): why the RMSNorm forward reaches 3.0 TB/s where
Liger reaches 3.9 on the same H200, why its backward trails F.rms_norm, and what bounds the mma.sync
attention forward at ~200 TFLOP/s and its backward (dK/dV and dQ kernels) at ~140 (ldmatrix, tensor-core issue,
softmax, or occupancy).
"""

import torch

import llama3_kernels as l3k


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


if __name__ == "__main__":
    main()
