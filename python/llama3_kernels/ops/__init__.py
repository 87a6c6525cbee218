"""The op surface: each a torch custom op (CPU = fp32 reference, CUDA = compiled kernel when built)."""

from llama3_kernels.ops.attention import decode_attention, flash_attention
from llama3_kernels.ops.gemm import fp8_rowwise_mm
from llama3_kernels.ops.linear import decode_linear, rms_norm_linear, rms_norm_qkv_rope_cache, swiglu_linear
from llama3_kernels.ops.loss import cross_entropy
from llama3_kernels.ops.norm import rms_norm, rms_norm_fp8
from llama3_kernels.ops.quant import quantize_fp8_rowwise
from llama3_kernels.ops.rope import rope, rope_kv_cache
from llama3_kernels.ops.swiglu import swiglu, swiglu_fp8

__all__ = [
    "cross_entropy",
    "decode_attention",
    "decode_linear",
    "flash_attention",
    "fp8_rowwise_mm",
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
