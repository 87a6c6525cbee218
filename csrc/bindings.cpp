// pybind11 bindings of every launcher: one def each, nothing else. Pointers and streams travel as ints.
#include <pybind11/pybind11.h>

#include "attention/attention.h"
#include "common.h"
#include "gemm/gemm.h"
#include "norm/norm.h"

namespace py = pybind11;

#ifdef L3K_EMU
#include <string>
std::string emu_selftest(const std::string& name, std::uintptr_t out, std::uintptr_t src);  // csrc/emu/selftest.cpp
#endif

#ifndef L3K_MODULE
#define L3K_MODULE _C  // the CPU emulator (csrc/emu/build.py) builds these bindings as _C_emu
#endif

PYBIND11_MODULE(L3K_MODULE, m) {
  m.doc() = "llama3_kernels compiled kernels (raw-pointer launchers; use the ops in llama3_kernels.ops)";
  m.def("build_info", [] {
    py::dict d;
    d["arch"] = L3K_CUDA_ARCH;
    d["cuda"] = L3K_CUDA_VERSION;
    d["compiler"] = __VERSION__;
    return d;
  });

#ifdef L3K_EMU
  m.def("emu_launches", &emu::launches, "kernels the CPU emulator ran since the module loaded");
  m.def("emu_selftest", &emu_selftest, "run one of csrc/emu/selftest.cpp's rule-breaking kernels", py::arg("name"),
        py::arg("out"), py::arg("src") = 0);
#endif

  // ---- norm family: csrc/norm/ -------------------------------------------------------------------
  namespace nrm = l3k::norm;
  m.def("rms_norm_fwd", &nrm::rms_norm_fwd, "RMSNorm (+ residual) forward: y, h_out, rstd");
  m.def("rms_norm_bwd", &nrm::rms_norm_bwd, "RMSNorm backward: dx (+ dh), dw through fp32 partial rows");
  m.def("rms_norm_fp8_fwd", &nrm::rms_norm_fp8_fwd, "RMSNorm (+ residual) fused with row-wise e4m3 quantization");
  m.def("swiglu_fwd", &nrm::swiglu_fwd, "silu(gate) * up");
  m.def("swiglu_bwd", &nrm::swiglu_bwd, "SwiGLU backward: dgate, dup");
  m.def("swiglu_fp8_fwd", &nrm::swiglu_fp8_fwd, "silu(gate) * up fused with row-wise e4m3 quantization");
  m.def("quantize_fp8_rowwise", &nrm::quantize_fp8_rowwise, "row-wise e4m3 quantization with the Llama 3 scale");
  m.def("cross_entropy_fwd", &nrm::cross_entropy_fwd, "cross-entropy of 16-bit logits in fp32: loss, lse per row");
  m.def("cross_entropy_bwd", &nrm::cross_entropy_bwd, "cross-entropy backward: dlogits in the logits' dtype");
  // ---- end norm family ---------------------------------------------------------------------------

  // ---- gemm family: csrc/gemm/ -------------------------------------------------------------------
  m.def("fp8_rowwise_mm", &l3k::fp8_rowwise_mm, "y = (xq · wqᵀ) · x_scale[:, None] · w_scale (+ bias), FP8 row-wise",
        py::arg("xq"), py::arg("x_scale"), py::arg("wq"), py::arg("w_scale"), py::arg("bias"), py::arg("bias_dtype"),
        py::arg("y"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("out_dtype"), py::arg("stream"));
  m.def("fp8_rowwise_mm_config", &l3k::fp8_rowwise_mm_config, "tile configuration fp8_rowwise_mm picks for (M, N, K)",
        py::arg("m"), py::arg("n"), py::arg("k"));
  m.def("decode_gemv", &l3k::decode_gemv,
        "decode GEMV on 16-bit weights (M <= 4) with a fused prologue: none, rms_norm (+ residual) or swiglu",
        py::arg("x"), py::arg("x_stride"), py::arg("residual"), py::arg("norm_w"), py::arg("h_out"), py::arg("eps"),
        py::arg("prologue"), py::arg("w"), py::arg("y"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("dtype"),
        py::arg("num_sms"), py::arg("stream"));
  m.def("decode_gemv_rope_cache", &l3k::decode_gemv_rope_cache,
        "decode qkv GEMV with the rms_norm prologue and RoPE + KV-cache append as its epilogue: returns nothing, "
        "writes q_out, k_cache, v_cache (and h_out)",
        py::arg("x"), py::arg("x_stride"), py::arg("residual"), py::arg("norm_w"), py::arg("h_out"), py::arg("eps"),
        py::arg("w"), py::arg("m"), py::arg("k"), py::arg("rot"), py::arg("positions"), py::arg("q_out"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("S"), py::arg("hq"), py::arg("hkv"), py::arg("d"),
        py::arg("L"), py::arg("k_stride_b"), py::arg("k_stride_l"), py::arg("v_stride_b"), py::arg("v_stride_l"),
        py::arg("dtype"), py::arg("num_sms"), py::arg("stream"));
  // ---- end gemm family ---------------------------------------------------------------------------

  // ---- attention family: csrc/attention/ ---------------------------------------------------------
  m.def("flash_attn_fwd", &l3k::flash_attn_fwd, "flash attention forward: out, lse (GQA, causal, padded or varlen)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens"),
        py::arg("cu_seqlens_k"), py::arg("batch"), py::arg("max_seqlen"), py::arg("max_seqlen_k"), py::arg("total_q"),
        py::arg("hq"), py::arg("hkv"), py::arg("d"), py::arg("causal"), py::arg("softmax_scale"), py::arg("dtype"),
        py::arg("num_sms"), py::arg("stream"));
  m.def("flash_attn_bwd", &l3k::flash_attn_bwd,
        "flash attention backward: dq, dk, dv (dq_accum: the fp32 workspace of the fused, atomic dQ; 0: the "
        "deterministic dq kernel)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dsum"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("cu_seqlens"), py::arg("cu_seqlens_k"), py::arg("batch"),
        py::arg("max_seqlen"), py::arg("max_seqlen_k"), py::arg("total_q_or_S"), py::arg("total_k_or_Sk"),
        py::arg("hq"), py::arg("hkv"), py::arg("d"), py::arg("causal"), py::arg("softmax_scale"),
        py::arg("deterministic"), py::arg("dtype"), py::arg("num_sms"), py::arg("stream"), py::arg("dq_accum") = 0);
  m.def("decode_attn", &l3k::decode_attn,
        "KV-cache decode attention, split-KV merged in a cluster's shared memory or by a combine kernel",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("out"),
        py::arg("o_accum"), py::arg("lse_accum"), py::arg("num_splits"), py::arg("cluster"), py::arg("B"),
        py::arg("Sq"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"), py::arg("L"), py::arg("k_stride_b"),
        py::arg("k_stride_l"), py::arg("v_stride_b"), py::arg("v_stride_l"), py::arg("softmax_scale"),
        py::arg("dtype"), py::arg("num_sms"), py::arg("stream"));
  m.def("decode_attn_max_cluster", &l3k::decode_attn_max_cluster,
        "the most decode splits one thread-block cluster can hold on this device (1: none)", py::arg("d"),
        py::arg("dtype"), py::arg("rows_per_kv_head"));
  m.def("rope_kv_cache", &l3k::rope_kv_cache, "RoPE on q and k of a fused qkv, k and v appended to a KV cache",
        py::arg("qkv"), py::arg("qkv_row_stride"), py::arg("rot"), py::arg("positions"), py::arg("q_out"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("tokens"), py::arg("S"), py::arg("hq"), py::arg("hkv"),
        py::arg("d"), py::arg("L"), py::arg("k_stride_b"), py::arg("k_stride_l"), py::arg("v_stride_b"),
        py::arg("v_stride_l"), py::arg("dtype"), py::arg("stream"));
  m.def("rope_rotate", &l3k::rope_rotate, "RoPE on [tokens, heads, d] by rot [tokens, d/2], or its inverse",
        py::arg("x"), py::arg("x_row_stride"), py::arg("rot"), py::arg("out"), py::arg("tokens"), py::arg("heads"),
        py::arg("d"), py::arg("inverse"), py::arg("dtype"), py::arg("num_sms"), py::arg("stream"));
  // ---- end attention family ----------------------------------------------------------------------
}
