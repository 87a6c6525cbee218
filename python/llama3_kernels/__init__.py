"""llama3_kernels: compiled CUDA kernels for the Llama 3 family, with PyTorch references.

Every op is a torch custom op whose CPU path is the fp32 reference (`llama3_kernels.reference`) and whose
CUDA path runs the compiled kernel from `llama3_kernels._C` when it was built; `info()` says which.
"""

from llama3_kernels.info import info
from llama3_kernels.ops import (
    cross_entropy,
    decode_attention,
    decode_linear,
    flash_attention,
    fp8_rowwise_mm,
    quantize_fp8_rowwise,
    rms_norm,
    rms_norm_fp8,
    rms_norm_linear,
    rms_norm_qkv_rope_cache,
    rope,
    rope_kv_cache,
    swiglu,
    swiglu_fp8,
    swiglu_linear,
)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "decode_attention",
    "decode_linear",
    "flash_attention",
    "fp8_rowwise_mm",
    "info",
    "quantize_fp8_rowwise",
    "rms_norm",
    "rms_norm_fp8",
    "rms_norm_linear",
    "rms_norm_qkv_rope_cache",
    "rope",
    "rope_kv_cache",
    "swiglu",
    "swiglu_fp8",
    "swiglu_linear",
]
