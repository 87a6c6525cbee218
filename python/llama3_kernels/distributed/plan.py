"""`l3k cp-plan`: a back-of-envelope model of context-parallel training at scale, checked against Llama 3.

Per layer and CP rank it estimates the attention time (causal FLOPs of the two local chunks), the K/V
all-gather and dK/dV reduce-scatter time (NVLink when the CP group fits in a node, else the network), the
gathered K/V memory, and from them the CP efficiency and the MFU, starting from a measured MFU at a short
sequence (the Llama 3 405B run: 41% at 8K on 16K GPUs, paper Table 4; 38% at 128K with CP = 16).

Assumptions (all parameters below):
- Non-attention time per token does not change with sequence length: CP keeps each rank at S / CP tokens,
  and at 128K / 16 that is exactly the 8K run's per-rank shape (same GEMMs, microbatches and pipeline).
- Attention runs at `attn_eff` of peak for forward + backward model FLOPs (3× forward); by default the same
  efficiency as the whole model at the short sequence, i.e. no better and no worse than the GEMMs.
- Model FLOPs per token = 6·params + 6·(S+1)·Hq·D·layers (causal attention), the convention in which the
  paper's 128K MFU is plausible; documents are taken as one full-length document (worst case for attention).
- Communication is exposed (the paper: "the all-gather communication latency is exposed"); `overlap` hides
  that fraction. Backward re-gathers K/V and reduce-scatters dK/dV in fp32, as `context_parallel_attention` does.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# fallback sizes (name: dim, layers, heads, kv heads, ffn, vocab) if the model package is unavailable
_SIZES = {
    "llama3.1-8b": (4096, 32, 32, 8, 14336, 128256),
    "llama3.1-70b": (8192, 80, 64, 8, 28672, 128256),
    "llama3.1-405b": (16384, 126, 128, 8, 53248, 128256),
}


@dataclass(frozen=True)
class Shape:
    """The model sizes the estimate needs."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        """Matmul parameters (the embedding lookup costs no FLOPs; the output projection does)."""
        d, hd = self.dim, self.head_dim
        layer = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d + 3 * d * self.ffn_dim
        return self.n_layers * layer + self.vocab_size * d


def model_shape(name: str) -> Shape:
    """Sizes from `llama3_kernels.model.get_config(name)`, else the local table.

    Raises:
        KeyError naming the unknown model.
    """
    try:
        from llama3_kernels.model import get_config
    except ImportError:
        if name not in _SIZES:
            raise KeyError(f"model: unknown {name!r}; known: {', '.join(_SIZES)}") from None
        return Shape(*_SIZES[name])
    c = get_config(name)
    return Shape(c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size)


@dataclass(frozen=True)
class Hardware:
    """Per-GPU figures. Bandwidths are achieved bytes/s per GPU per direction."""

    peak_tflops: float = 989.0  # H100 SXM dense bf16
    nvlink_gbps: float = 360.0  # GB/s: ~80% of NVLink 4's 450 GB/s per direction
    ib_gbps: float = 40.0  # GB/s: ~80% of a 400 Gb/s (50 GB/s) NIC per GPU, as in Llama 3's clusters
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Estimate:
    """Per layer, per GPU, per microbatch (one sequence) figures, in seconds and bytes."""

    local_tokens: int
    attn_s: float
    dense_s: float
    comm_s: float
    exposed_comm_s: float
    link: str
    gathered_kv_bytes: int
    grad_buffer_bytes: int
    attn_flop_share: float
    cp_efficiency: float
    mfu: float


def attention_flops_per_token(shape: Shape, seq: int) -> float:
    """Training (forward + 2× backward) causal attention model FLOPs per token over all layers."""
    return 3 * 4 * (seq + 1) / 2 * shape.n_heads * shape.head_dim * shape.n_layers


def estimate(
    shape: Shape,
    seq: int,
    cp: int,
    tp: int = 8,
    hw: Hardware = Hardware(),  # noqa: B008 (frozen)
    mfu_base: float = 0.41,
    base_seq: int = 8192,
    attn_eff: float | None = None,
    overlap: float = 0.0,
    kv_bytes: int = 2,
    grad_bytes: int = 4,
    kv_heads_per_step: int | None = None,
) -> Estimate:
    """Estimate one layer of context-parallel training and the resulting MFU.

    Args:
        shape: model sizes; seq: tokens per sequence; cp, tp: context- and tensor-parallel sizes (TP innermost
            in a node, then CP).
        hw: peak FLOP/s and link bandwidths.
        mfu_base: MFU measured at `base_seq` with CP = 1 and the same TP/PP (sets the non-attention time).
        attn_eff: attention fwd+bwd efficiency (fraction of peak); None = mfu_base.
        overlap: fraction of the CP communication hidden behind compute (0 = exposed, as in Llama 3).
        kv_bytes / grad_bytes: element sizes of gathered K/V (bf16) and reduced dK/dV (fp32 here).
        kv_heads_per_step: gather this many KV heads at a time (None = all of a TP rank's KV heads).
    Returns:
        An Estimate.
    Raises:
        ValueError naming the argument.
    """
    if seq % (2 * cp):
        raise ValueError(f"seq: must be divisible by 2·cp = {2 * cp}, got {seq}")
    if shape.n_heads % tp or shape.n_kv_heads % tp and tp % shape.n_kv_heads:
        raise ValueError(f"tp: must divide the heads ({shape.n_heads} q, {shape.n_kv_heads} kv), got {tp}")
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap: expected a fraction in [0, 1], got {overlap}")
    peak = hw.peak_tflops * 1e12
    eff = mfu_base if attn_eff is None else attn_eff
    tokens = seq // cp
    per_layer_gpu = tokens / (shape.n_layers * tp)  # converts per-token whole-model FLOPs to one layer on one GPU

    # non-attention seconds per token, from the short-sequence MFU minus its attention share
    base_s = (6 * shape.n_params + attention_flops_per_token(shape, base_seq)) / (mfu_base * peak)
    dense_s = (base_s - attention_flops_per_token(shape, base_seq) / (eff * peak)) * per_layer_gpu
    # the 2·CP-chunk split gives every rank exactly 1/cp of the causal pairs of a full-length document
    attn_s = attention_flops_per_token(shape, seq) / (eff * peak) * per_layer_gpu

    kv_heads = max(shape.n_kv_heads // tp, 1)  # a TP rank's KV heads (replicated when tp > n_kv_heads)
    local_kv = tokens * kv_heads * shape.head_dim  # elements of one of K, V on one rank
    bytes_moved = (cp - 1) * local_kv * 2 * (2 * kv_bytes + grad_bytes)  # fwd gather, bwd re-gather, reduce-scatter
    intra_node = tp * cp <= hw.gpus_per_node
    bw = (hw.nvlink_gbps if intra_node else hw.ib_gbps) * 1e9
    comm_s = bytes_moved / bw if cp > 1 else 0.0
    exposed = comm_s * (1 - overlap)

    step_heads = kv_heads if kv_heads_per_step is None else min(kv_heads_per_step, kv_heads)
    live_steps = 1 if step_heads == kv_heads else 2  # the next step's buffer is gathered while this one computes
    gathered = live_steps * seq * step_heads * shape.head_dim * 2 * kv_bytes
    grads = seq * step_heads * shape.head_dim * 2 * grad_bytes  # fp32 dK/dV of the whole sequence, one step

    flops = (6 * shape.n_params + attention_flops_per_token(shape, seq)) * per_layer_gpu
    compute = dense_s + attn_s
    return Estimate(
        local_tokens=tokens, attn_s=attn_s, dense_s=dense_s, comm_s=comm_s, exposed_comm_s=exposed,
        link="NVLink" if intra_node else "network", gathered_kv_bytes=gathered, grad_buffer_bytes=grads,
        attn_flop_share=attention_flops_per_token(shape, seq) / (6 * shape.n_params + attention_flops_per_token(shape, seq)),
        cp_efficiency=compute / (compute + exposed), mfu=flops / (peak * (compute + exposed)),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`l3k cp-plan --model llama3.1-405b --seq 131072 --cp 16 [--tp 8] ...`: print the estimate."""
    p = argparse.ArgumentParser(prog="l3k cp-plan", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default="llama3.1-405b")
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--cp", type=int, default=16)
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--tflops", type=float, default=Hardware.peak_tflops, help="peak dense bf16 TFLOP/s per GPU")
    p.add_argument("--nvlink-gbps", type=float, default=Hardware.nvlink_gbps, help="achieved GB/s (bytes) per GPU")
    p.add_argument("--ib-gbps", type=float, default=Hardware.ib_gbps, help="achieved network GB/s (bytes) per GPU")
    p.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node)
    p.add_argument("--mfu-base", type=float, default=0.41, help="MFU measured at --base-seq with CP=1")
    p.add_argument("--base-seq", type=int, default=8192)
    p.add_argument("--attn-eff", type=float, default=None, help="attention fwd+bwd fraction of peak (default mfu-base)")
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of CP communication hidden (0 = exposed)")
    p.add_argument("--grad-bytes", type=int, default=4, help="dK/dV element size in the reduce-scatter")
    p.add_argument("--kv-heads-per-step", type=int, default=None)
    a = p.parse_args(argv)
    shape = model_shape(a.model)
    hw = Hardware(a.tflops, a.nvlink_gbps, a.ib_gbps, a.gpus_per_node)
    e = estimate(
        shape, a.seq, a.cp, a.tp, hw, a.mfu_base, a.base_seq, a.attn_eff, a.overlap,
        grad_bytes=a.grad_bytes, kv_heads_per_step=a.kv_heads_per_step,
    )  # fmt: skip
    ms, mib = 1e3, 2**20
    print(
        f"{a.model}: seq {a.seq}, CP {a.cp}, TP {a.tp} → {e.local_tokens} local tokens per rank, CP group over {e.link}"
    )
    print("per layer, per GPU, per sequence (fwd + bwd):")
    print(f"  attention compute  {e.attn_s * ms:8.2f} ms   ({e.attn_flop_share:.0%} of model FLOPs)")
    print(f"  other compute      {e.dense_s * ms:8.2f} ms")
    print(f"  K/V all-gather ×2 + dK/dV reduce-scatter {e.comm_s * ms:.2f} ms, exposed {e.exposed_comm_s * ms:.2f} ms")
    print(f"  gathered K/V {e.gathered_kv_bytes / mib:.1f} MiB, fp32 dK/dV buffer {e.grad_buffer_bytes / mib:.1f} MiB")
    print(f"CP efficiency {e.cp_efficiency:.1%}; estimated MFU {e.mfu:.1%} (from {a.mfu_base:.0%} at {a.base_seq})")
    return 0
