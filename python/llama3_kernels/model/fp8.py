"""FP8 inference path of the Llama 3 paper (section 6): row-wise FP8 in the FFN of the inner layers.

Only the feed-forward linears are quantized (attention stays in 16 bits) and the first and last layers are
left alone. Weights get one fp32 scale per output row; activations one scale per token row, computed from
an amax bounded at 1200 so that rare outliers do not crush the other values of their row. At run time:
ffn_norm + residual + quantize (rms_norm_fp8) → one fused w1|w3 GEMM → swiglu_fp8 → w2 GEMM.

Models with massive activations far above the bound in a few layers (SmolLM2: |x| ≈ 2800 in layer 11) lose
those values to the clip. `outlier_layers` finds such layers on a calibration text, and `quantize_model_fp8`
keeps them in 16 bits (`skip_layers`), as the paper keeps its first and last layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from llama3_kernels import ops
from llama3_kernels.model.model import FeedForward, RMSNorm, Transformer

ACT_AMAX_UB = 1200.0  # the paper's upper bound on activation row amax
# A neutral calibration text for `outlier_layers` (plain encyclopedic English, not any test's evaluation text).
CALIBRATION_TEXT = (
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize "
    "foods from carbon dioxide and water. It generally involves the green pigment chlorophyll and generates "
    "oxygen as a byproduct. The word comes from Greek."
)


class RMSNormFP8(nn.Module):
    """ffn_norm fused with the residual add and row-wise e4m3 quantization: returns ((q, scale), h)."""

    def __init__(self, norm: RMSNorm, amax_ub: float = ACT_AMAX_UB):
        super().__init__()
        self.eps, self.amax_ub = norm.eps, amax_ub
        self.weight = norm.weight  # same parameter and name: layers.N.ffn_norm.weight

    def forward(self, x: Tensor, residual: Tensor | None = None):
        if residual is None:
            return ops.rms_norm_fp8(x, self.weight, self.eps, amax_ub=self.amax_ub)
        q, scale, h = ops.rms_norm_fp8(x, self.weight, self.eps, residual, self.amax_ub)
        return (q, scale), h


class FeedForwardFP8(nn.Module):
    """SwiGLU FFN on row-wise FP8 weights: w13 = [w1; w3] as e4m3 [2F, dim] and w2 as e4m3 [dim, F]."""

    def __init__(self, ff: FeedForward, amax_ub: float = ACT_AMAX_UB, weight_amax_ub: float = math.inf):
        super().__init__()
        fused = ff.w13 is not None  # Transformer.fuse_projections() ran first
        self.amax_ub, self.out_dtype = amax_ub, (ff.w13 if fused else ff.w1).weight.dtype
        with torch.no_grad():
            w13 = ff.w13.weight if fused else torch.cat([ff.w1.weight, ff.w3.weight])  # [2F, dim], gate rows first
            w13_q, w13_scale = ops.quantize_fp8_rowwise(w13, amax_ub=weight_amax_ub)
            w2_q, w2_scale = ops.quantize_fp8_rowwise(ff.w2.weight.contiguous(), amax_ub=weight_amax_ub)
        self.register_buffer("w13", w13_q)
        self.register_buffer("w13_scale", w13_scale)
        self.register_buffer("w2", w2_q)
        self.register_buffer("w2_scale", w2_scale)

    def _apply(self, fn, recurse=True):
        # follow the model's device moves and dtype casts (which set the output dtype), but never cast the
        # e4m3 weights or the fp32 scales: probe what fn does to a tensor of the current output dtype
        probe = fn(torch.empty(0, dtype=self.out_dtype, device=self.w13.device))
        self.out_dtype = probe.dtype
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(probe.device)
        return self

    def forward(self, x: tuple[Tensor, Tensor]) -> Tensor:
        xq, x_scale = x  # [B, S, dim] e4m3, [B, S] fp32
        gate_up = ops.fp8_rowwise_mm(xq, x_scale, self.w13, self.w13_scale, out_dtype=self.out_dtype)  # [B, S, 2F]
        aq, a_scale = ops.swiglu_fp8(gate_up, amax_ub=self.amax_ub)  # [B, S, F] e4m3, [B, S]
        return ops.fp8_rowwise_mm(aq, a_scale, self.w2, self.w2_scale, out_dtype=self.out_dtype)  # [B, S, dim]


@torch.no_grad()
def ffn_activation_amax(model: Transformer, tokens: Tensor) -> list[float]:
    """Per layer, the largest |value| that an FP8 FFN would quantize on `tokens` ([B, S] int64, cut to the model's
    max_seq_len): the normed FFN input and the SwiGLU output, over every row. The layers must still be 16-bit
    FeedForwards."""
    amax = [0.0] * len(model.layers)

    def record(i):
        def hook(ff, args, out):
            x = args[0]
            gate_up = ff.w13(x) if ff.w13 is not None else torch.cat([ff.w1(x), ff.w3(x)], -1)
            amax[i] = max(x.abs().max().item(), ops.swiglu(gate_up).abs().max().item())

        return hook

    hooks = []
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.feed_forward, FeedForward):
            raise ValueError(f"model: layer {i} is already FP8; calibrate before quantize_model_fp8")
        hooks.append(layer.feed_forward.register_forward_hook(record(i)))
    try:
        model(tokens[:, : model.cfg.max_seq_len])
    finally:
        for h in hooks:
            h.remove()
    return amax


def outlier_layers(model: Transformer, tokens: Tensor, amax_ub: float = ACT_AMAX_UB) -> list[int]:
    """The layers whose FFN activations exceed `amax_ub` on `tokens`: the bound would clip them."""
    return [i for i, a in enumerate(ffn_activation_amax(model, tokens)) if a > amax_ub]


def quantize_model_fp8(
    model: Transformer,
    amax_ub: float = ACT_AMAX_UB,
    weight_amax_ub: float = math.inf,
    skip_first_last: bool = True,
    skip_layers: Iterable[int] = (),
) -> Transformer:
    """Switch the FFNs of a model to row-wise FP8, in place (later .to() moves and casts keep the FP8 weights).

    Args:
        model: a Transformer with real (not meta) weights.
        amax_ub: bound on activation row amax (1200 in the paper).
        weight_amax_ub: bound on weight row amax (none by default: weights are known and outlier-free).
        skip_first_last: leave the first and last layers in 16 bits, as the paper does.
        skip_layers: further layers to leave in 16 bits (e.g. `outlier_layers` of a calibration text).
    Returns:
        The same model; its `fp8_layers` attribute lists the converted layer indices.
    Raises:
        ValueError if the weights are on the meta device or the FFN sizes are not multiples of 16.
    """
    if model.tok_embeddings.weight.is_meta:
        raise ValueError("model: weights are on the meta device; load or initialize them first")
    if model.cfg.dim % 16 or model.cfg.ffn_dim % 16:
        raise ValueError(
            f"model: FP8 GEMMs need dim and ffn_dim multiples of 16, got {model.cfg.dim}, {model.cfg.ffn_dim}"
        )
    n = len(model.layers)
    skip = set(skip_layers)
    if not skip <= set(range(n)):
        raise ValueError(f"skip_layers: {sorted(skip - set(range(n)))} are not layers of a {n}-layer model")
    picked = [i for i in (range(1, n - 1) if skip_first_last else range(n)) if i not in skip]
    done = []
    for i in picked:
        layer = model.layers[i]
        if isinstance(layer.feed_forward, FeedForwardFP8):
            continue
        layer.ffn_norm = RMSNormFP8(layer.ffn_norm, amax_ub)
        layer.feed_forward = FeedForwardFP8(layer.feed_forward, amax_ub, weight_amax_ub)
        done.append(i)
    model.fp8_layers = sorted({*getattr(model, "fp8_layers", []), *done})
    return model
