"""What was built and what will run: `llama3_kernels.info()` and `l3k info`."""

from __future__ import annotations

import platform

import torch

from llama3_kernels.ops._common import _C, has_kernel

# public op → the launchers it needs for its compiled CUDA path
OP_KERNELS = {
    "rms_norm": ("rms_norm_fwd", "rms_norm_bwd"),
    "rms_norm_fp8": ("rms_norm_fp8_fwd",),
    "swiglu": ("swiglu_fwd", "swiglu_bwd"),
    "swiglu_fp8": ("swiglu_fp8_fwd",),
    "quantize_fp8_rowwise": ("quantize_fp8_rowwise",),
    "fp8_rowwise_mm": ("fp8_rowwise_mm",),
    "decode_linear": ("decode_gemv",),
    "rms_norm_linear": ("decode_gemv",),
    "swiglu_linear": ("decode_gemv",),
    "rms_norm_qkv_rope_cache": ("decode_gemv_rope_cache",),
    "flash_attention": ("flash_attn_fwd", "flash_attn_bwd"),
    "decode_attention": ("decode_attn",),
    "rope_kv_cache": ("rope_kv_cache",),
    "rope": ("rope_rotate",),
    "cross_entropy": ("cross_entropy_fwd", "cross_entropy_bwd"),
}


def info() -> dict:
    """Report the build and the runtime honestly.

    Returns:
        dict with versions, whether `_C` was built and for which arch, the visible GPU (if any), and
        for each op the path a CUDA tensor takes: "kernel", "partial kernel" or "reference".
        CPU tensors always run the reference.
    """
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count}
    build = _C.build_info() if _C is not None else None
    hopper = gpu is not None and gpu["capability"] == "9.0"
    ops = {}
    for op, names in OP_KERNELS.items():
        built = [n for n in names if has_kernel(n)]
        path = "kernel" if len(built) == len(names) else ("partial kernel" if built else "reference")
        ops[op] = path if hopper else "reference" + (" (kernel built, no sm_90 GPU)" if built else "")
    return {
        "version": __import__("llama3_kernels").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "extension": build or "not built (pure-Python install: every op runs its reference)",
        "gpu": gpu or "none visible",
        "cuda_ops": ops,
    }
