"""Rotary position embeddings with the Llama 3.1 frequency scaling, Meta's interleaved-pair convention.

Meta checkpoints rotate the pairs (x[2i], x[2i+1]) by angle pos * freq[i]; Hugging Face checkpoints permute
the q/k rows to rotate (x[i], x[i + D/2]) instead, and the HF loader undoes that permutation. Tables and the
rotation are fp32 whatever the model dtype.
"""

from __future__ import annotations

import math

import torch

from llama3_kernels import reference


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling_factor: float | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_context: int = 8192,
) -> torch.Tensor:
    """Per-pair inverse frequencies θ^(-2i/D), fp32 [D/2], with the Llama 3.1 scaling when a factor is given.

    The scaling keeps high frequencies (wavelength < original_context / high_freq_factor), divides low
    ones (wavelength > original_context / low_freq_factor) by the factor, and blends linearly between.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]
    if scaling_factor is None:
        return freqs
    wavelen = 2 * math.pi / freqs
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, freqs / scaling_factor, freqs)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * freqs / scaling_factor + smooth * freqs, scaled)


def rope_tables(freqs: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos * freq for pos in [0, seq_len): two fp32 [seq_len, D/2] tables."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=freqs.device), freqs)  # [L, D/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., S, H, D] by cos/sin [..., S, D/2] (fp32 math, x's dtype out)."""
    return rotate_pairs(x, torch.complex(cos.float(), sin.float()))


def rotate_pairs(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with the rotation given as complex64 rot = cos + i·sin [..., S, D/2] (built once per forward).

    The pairs are complex numbers x[2i] + i·x[2i+1] multiplied by rot: one fp32 multiply kernel between the two
    dtype casts (forward and backward), where real arithmetic on the halves takes eight.
    """
    if torch.compiler.is_compiling():  # Inductor generates no code for complex ops: real arithmetic fuses
        c, s = rot.real.unsqueeze(-2), rot.imag.unsqueeze(-2)  # [..., S, 1, D/2]
        pairs = x.float().unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2).to(x.dtype)
    return reference.rope_rotate(x, rot)  # the pairs as complex64 numbers times rot
