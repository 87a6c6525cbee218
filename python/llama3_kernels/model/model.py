"""A thin Llama 3 decoder whose norms, activations and attention all go through llama3_kernels.ops.

Parameter names are Meta's (tok_embeddings, layers.N.attention.wq, feed_forward.w1 …), so Meta checkpoints
load as they are. The same module trains (padded or document-masked with cu_seqlens, or with a plugged-in
attention such as context parallelism) and decodes against a preallocated KV cache with static shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3_kernels import ops
from llama3_kernels.model.config import ModelConfig
from llama3_kernels.model.rope import rope_frequencies, rope_tables, rotate_pairs

AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _rotate(x: Tensor, rot: Tensor) -> Tensor:
    """RoPE through ops.rope (one read and one write of x each way); under torch.compile the real-arithmetic form,
    which Inductor fuses with its neighbours where a custom op would stay opaque."""
    return rotate_pairs(x, rot) if torch.compiler.is_compiling() else ops.rope(x, rot)


@torch.no_grad()
def _stacked_linear(*parts: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output rows are the parts' rows, in order (fused projections)."""
    w = torch.cat([p.weight for p in parts])  # [Σ out, in]
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    fused.weight.copy_(w)
    return fused


class RMSNorm(nn.Module):
    """RMSNorm; given a residual it also returns the updated stream h = x + residual (one fused op)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """GQA self-attention with RoPE; an optional per-layer KV cache [max_batch, max_len, Hkv, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.wqkv: nn.Linear | None = None  # set by fuse(): [wq; wk; wv] as one GEMM
        self.stack_qkv_for_grad = True  # with autograd on: wq, wk, wv concatenated into one GEMM per call
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def fuse(self) -> None:
        """Replace wq, wk, wv by one Linear wqkv = [wq; wk; wv] (inference: 1 GEMM instead of 3 per step)."""
        if self.wqkv is None:
            self.wqkv = _stacked_linear(self.wq, self.wk, self.wv)  # [(Hq + 2 Hkv) D, dim]
            self.wq = self.wk = self.wv = None

    def decode(
        self, x: Tensor, norm: RMSNorm, residual: Tensor | None, rot: Tensor, positions: Tensor, cache_seqlens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """A fused model's decode step from the block input: norm, q/k/v projection, RoPE and both cache writes in
        one op (ops.rms_norm_qkv_rope_cache), attention over the cache, then wo (the decode GEMV for a few rows).
        Returns (attention output, the residual stream h)."""
        b, s, _ = x.shape
        q, h = ops.rms_norm_qkv_rope_cache(
            x, norm.weight, norm.eps, self.wqkv.weight, rot, positions, self.k_cache, self.v_cache, self.n_heads,
            residual,
        )  # fmt: skip
        out = ops.decode_attention(q, self.k_cache[:b], self.v_cache[:b], cache_seqlens)
        return ops.decode_linear(out.reshape(b, s, self.n_heads * self.head_dim), self.wo.weight), h

    def _qkv(self, x: Tensor, rot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, S, Hq, D] and k [B, S, Hkv, D] rotated, v [B, S, Hkv, D]."""
        b, s, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is None and self.stack_qkv_for_grad and torch.is_grad_enabled():
            # training: one GEMM for q, k, v forward and one each for dX and dW backward, instead of three each and
            # two adds of dX (wk, wv are narrow: N = Hkv·D); the weights stay three parameters
            w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])  # [(Hq + 2 Hkv) D, dim]
            q, k, v = F.linear(x, w).view(b, s, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=2)
            return _rotate(q, rot), _rotate(k, rot), v
        if self.wqkv is None:
            q = self.wq(x).view(b, s, hq, d)
            k = self.wk(x).view(b, s, hkv, d)
            v = self.wv(x).view(b, s, hkv, d)
            return _rotate(q, rot), _rotate(k, rot), v
        qkv = self.wqkv(x).view(b, s, hq + 2 * hkv, d)
        qk = _rotate(qkv[:, :, : hq + hkv], rot)  # q and k rotated in one pass
        return qk[:, :, :hq], qk[:, :, hq:], qkv[:, :, hq + hkv :]

    def forward(
        self,
        x: Tensor,
        rot: Tensor,
        cache_index: tuple[Tensor, Tensor] | None,
        cu_seqlens: Tensor | None,
        max_seqlen: int | None,
        attn_fn: AttnFn | None,
        cache_seqlens: Tensor | None,
    ) -> Tensor:
        b, s, _ = x.shape  # (a fused model's decode step goes through TransformerBlock._decode instead)
        q, k, v = self._qkv(x, rot)  # [B, S, Hq, D], [B, S, Hkv, D] x 2
        if cache_index is not None:  # cache[b, positions[b, i]] = k[b, i]: static shapes, graph-capturable
            self.k_cache[cache_index] = k
            self.v_cache[cache_index] = v
        if cache_seqlens is not None:  # decode (or chunked prefill): attend over the cache, new tokens included
            out = ops.decode_attention(q, self.k_cache[:b], self.v_cache[:b], cache_seqlens)
        elif attn_fn is not None:
            out = attn_fn(q, k, v)
        elif cu_seqlens is not None:  # packed documents: varlen attention over the flattened batch
            out = ops.flash_attention(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),  # [B*S, H, D]
                causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            ).view(b, s, self.n_heads, self.head_dim)  # [B*S, Hq, D] -> [B, S, Hq, D]  # fmt: skip
        else:
            out = ops.flash_attention(q, k, v, causal=True)  # [B, S, Hq, D]
        return self.wo(out.reshape(b, s, self.n_heads * self.head_dim))  # [B, S, Hq*D] -> [B, S, dim]


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w13: nn.Linear | None = None  # set by fuse(): [w1; w3] as one GEMM

    def fuse(self) -> None:
        """Replace w1, w3 by one Linear w13 = [w1; w3] (gate rows first); swiglu reads its two halves."""
        if self.w13 is None:
            self.w13 = _stacked_linear(self.w1, self.w3)  # [2F, dim]
            self.w1 = self.w3 = None

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            return self.w2(ops.swiglu(self.w13(x)))  # [.., 2F]: gate half, then up half
        return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block. It carries (delta, h): the residual stream h and the branch output not yet added,
    so each add fuses into the next norm (rms_norm(delta, w, residual=h) returns (normed, h + delta))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)  # the FP8 path swaps in a norm that quantizes
        self.feed_forward = FeedForward(cfg)

    def forward(self, delta: Tensor | None, h: Tensor, *attn_args) -> tuple[Tensor, Tensor]:
        rot, cache_index, _, _, _, cache_seqlens = attn_args
        if cache_seqlens is not None and cache_index is not None and self.attention.wqkv is not None:
            return self._decode(delta, h, rot, cache_index[1], cache_seqlens)
        x, h = (self.attention_norm(h), h) if delta is None else self.attention_norm(delta, h)
        delta = self.attention(x, *attn_args)
        x, h = self.ffn_norm(delta, h)
        return self.feed_forward(x), h

    def _decode(self, delta, h, rot, positions, cache_seqlens) -> tuple[Tensor, Tensor]:
        """A decode step of a fused model: each norm and the SwiGLU run inside the GEMV that consumes them
        (ops.rms_norm_qkv_rope_cache, rms_norm_linear, swiglu_linear), and RoPE with the cache writes inside the
        q/k/v GEMV: 5 kernels a layer for a few rows. Same values as forward's path."""
        ff = self.feed_forward
        x, residual = (h, None) if delta is None else (delta, h)
        delta, h = self.attention.decode(x, self.attention_norm, residual, rot, positions, cache_seqlens)
        if type(self.ffn_norm) is RMSNorm and isinstance(ff, FeedForward) and ff.w13 is not None:
            gate_up, h = ops.rms_norm_linear(delta, self.ffn_norm.weight, self.ffn_norm.eps, ff.w13.weight, h)
            return ops.swiglu_linear(gate_up, ff.w2.weight), h
        x, h = self.ffn_norm(delta, h)  # FP8 FFN (quantize_model_fp8): its own fused norm + quantization
        return self.feed_forward(x), h


class Transformer(nn.Module):
    """The Llama 3 decoder. Construct on the meta device and then `to_empty` + `init_weights()`, or
    `load_state_dict(sd, assign=True)` (the RoPE tables are rebuilt on first use)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # fp32 cos/sin [max_seq_len, D/2]; not in the state dict
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------------------ weights and tables
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) weights (output projections wo/w2 scaled by 1/sqrt(2 n_layers)), unit norms, RoPE."""
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            for norm in (layer.attention_norm, layer.ffn_norm):
                nn.init.ones_(norm.weight)
            for name, mod in (*layer.attention.named_children(), *layer.feed_forward.named_children()):
                if isinstance(mod, nn.Linear):
                    scale = 1.0 / math.sqrt(2 * self.cfg.n_layers) if name in ("wo", "w2") else 1.0
                    nn.init.normal_(mod.weight, std=std * scale)
        nn.init.ones_(self.norm.weight)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        """(Re)compute the fp32 RoPE tables on the embedding's device."""
        c = self.cfg
        freqs = rope_frequencies(
            c.head_dim, c.rope_theta, c.rope_scaling_factor, c.rope_low_freq_factor, c.rope_high_freq_factor,
            c.rope_original_context,
        ).to(self.tok_embeddings.weight.device)  # fmt: skip
        self.rope_cos, self.rope_sin = rope_tables(freqs, c.max_seq_len)

    def _apply(self, fn, recurse=True):
        # .to(device/dtype), .cuda(), .half(), to_empty(): rebuild the tables, so that they stay fp32 and
        # never hold the uninitialized memory that to_empty leaves
        super()._apply(fn, recurse)
        if not self.tok_embeddings.weight.is_meta:
            self.reset_rope()
        return self

    def _check_rope(self) -> None:
        # load_state_dict(assign=True) into a meta-built model swaps in real weights but leaves meta tables
        if self.rope_cos.is_meta and not self.tok_embeddings.weight.is_meta:
            self.reset_rope()

    @torch.no_grad()
    def fuse_projections(self) -> Transformer:
        """Inference: per layer one [wq; wk; wv] GEMM and one [w1; w3] GEMM, RoPE on q and k in one pass.

        A batch-1 decode step then launches 5 kernels a layer instead of 17: one GEMV for q/k/v (with RoPE and
        the two cache writes as its epilogue, `ops.rms_norm_qkv_rope_cache`) and one for w1/w3, and each norm and
        the SwiGLU inside the GEMV that consumes it (ops.rms_norm_linear / swiglu_linear), which is what a
        CUDA-graph decode pays for at a few us a kernel. The state dict then holds wqkv / w13 instead of
        wq, wk, wv / w1, w3: fuse after loading weights (`quantize_model_fp8` takes a fused model too), and do
        not train a fused model. Idempotent; returns self.
        """
        for layer in self.layers:
            layer.attention.fuse()
            if isinstance(layer.feed_forward, FeedForward):
                layer.feed_forward.fuse()
        return self

    # ---------------------------------------------------------------------------------------- KV cache
    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate a zeroed KV cache per layer, [max_batch, max_seq_len, Hkv, D] each for k and v.

        While a cache is set up, every forward writes its k/v at `positions` (use under inference mode).

        Raises:
            ValueError if max_seq_len exceeds the config's or a size is not positive.
        """
        if max_batch <= 0:
            raise ValueError(f"max_batch: expected a positive int, got {max_batch}")
        if not 0 < max_seq_len <= self.cfg.max_seq_len:
            raise ValueError(f"max_seq_len: expected 1..{self.cfg.max_seq_len} (the config's), got {max_seq_len}")
        w = self.tok_embeddings.weight
        dtype, device = dtype or w.dtype, device or w.device
        shape = (max_batch, max_seq_len, self.cfg.n_kv_heads, self.cfg.head_dim)
        for layer in self.layers:
            layer.attention.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.attention.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def clear_cache(self) -> None:
        """Drop the KV caches (forward then no longer writes them)."""
        for layer in self.layers:
            layer.attention.k_cache = layer.attention.v_cache = None

    @property
    def cache_shape(self) -> tuple[int, ...] | None:
        """(max_batch, max_seq_len, Hkv, D) of the current cache, or None."""
        k = self.layers[0].attention.k_cache
        return None if k is None else tuple(k.shape)

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        attn_fn: AttnFn | None = None,
        *,
        cache_seqlens: Tensor | None = None,
        last_index: Tensor | None = None,
    ) -> Tensor:
        """Logits of a batch of token sequences.

        Args:
            tokens: [B, S] int64.
            positions: [B, S] int64 RoPE positions (and KV-cache slots); default 0..S-1 in every row.
            cu_seqlens: int32 [N + 1] document offsets over the flattened B*S tokens: attention stays
                within each document (varlen flash attention).
            max_seqlen: longest document, to skip a host sync.
            attn_fn: replaces the attention call: attn_fn(q [B,S,Hq,D], k [B,S,Hkv,D], v) -> [B,S,Hq,D],
                with RoPE already applied (context parallelism plugs in here).
            cache_seqlens: int32 [B], decode against the KV cache: the valid cache length per row after
                this step's tokens are written (so positions[b] = cache_seqlens[b] - S ... - 1).
            last_index: int64 [B]; when given, only the logits at tokens[b, last_index[b]] are computed.
        Returns:
            logits [B, S, vocab] (or [B, 1, vocab] with last_index) in the model's dtype.
        Raises:
            ValueError naming the argument on shape or mode mismatches.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected [B, S], got shape {tuple(tokens.shape)}")
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)  # [B, S]
        elif positions.shape != tokens.shape:
            raise ValueError(
                f"positions: expected shape {tuple(tokens.shape)} like tokens, got {tuple(positions.shape)}"
            )
        if cache_seqlens is not None and self.layers[0].attention.k_cache is None:
            raise ValueError("cache_seqlens: no KV cache; call setup_cache() first")
        self._check_rope()
        rot = torch.complex(self.rope_cos[positions], self.rope_sin[positions])  # [B, S, D/2] complex64
        cache_index = None  # (rows [B, 1], positions [B, S]): where each token's k/v go in the cache
        if self.layers[0].attention.k_cache is not None:  # positions made dense once, not per layer
            cache_index = (torch.arange(b, device=tokens.device).unsqueeze(1), positions.contiguous())
        h = self.tok_embeddings(tokens)  # [B, S, dim]
        delta = None
        for layer in self.layers:
            delta, h = layer(delta, h, rot, cache_index, cu_seqlens, max_seqlen, attn_fn, cache_seqlens)
        if last_index is not None:
            rows = torch.arange(b, device=tokens.device)
            delta, h = delta[rows, last_index].unsqueeze(1), h[rows, last_index].unsqueeze(1)  # [B, 1, dim]
        if cache_seqlens is not None:  # decode: the final norm inside the LM head's GEMV
            head = self.output.weight if self.output is not None else self.tok_embeddings.weight
            return ops.rms_norm_linear(delta, self.norm.weight, self.norm.eps, head, residual=h)[0]
        x, _ = self.norm(delta, h)  # modules called as such: FSDP2 gathers their weights in forward hooks
        return self.output(x) if self.output is not None else F.linear(x, self.tok_embeddings.weight)
