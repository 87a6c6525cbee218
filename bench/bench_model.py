"""End to end: a Llama 3.2-1B-shaped training step and batch-1 decode, this project's model vs plain PyTorch.

The peer is the same model (same config, the same weights loaded by name) written in plain PyTorch:
F.rms_norm, F.silu, SDPA; run eager and under torch.compile. Training step = forward, cross-entropy in fp32
(F.cross_entropy on fp32 logits for the plain model, this project's cross_entropy op on the bf16 logits for its
own), backward (no optimizer), bf16 weights. Decode = one token against a cache already holding 4096
tokens; this project's model is timed eager and replayed from a CUDA graph, the compiled peer uses
mode="reduce-overhead" (CUDA graphs too).

  N = matmul parameters = n_layers·(2·dim² + 2·dim·kv_dim + 3·dim·ffn) + vocab·dim
  train FLOPs = tokens·(6·N + 6·n_layers·dim·S)         (attention causal: half of 12·n_layers·dim·S)
  decode FLOPs = 2·N + 4·n_layers·dim·L;  decode bytes = 2·N + 2·n_layers·L·kv_dim·2 (weights, K/V cache)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from llama3_kernels import ops
from llama3_kernels.bench.bench_attention import sm90_skip
from llama3_kernels.bench.harness import OURS, PEAK_TFLOPS, Case, Context, Impl, compiled, env_set
from llama3_kernels.ops._common import switched_off

FAMILY = "model"
CACHED = 4096  # tokens already in the KV cache when the timed decode step runs


def _model_api():
    from llama3_kernels.model import Transformer, get_config

    return Transformer, get_config


def model_skip() -> str | None:
    try:
        _model_api()
    except Exception as e:  # the model package may not exist yet in a partial checkout
        return f"llama3_kernels.model not importable ({type(e).__name__}: {str(e)[:80]})"
    return None


class PlainLlama(nn.Module):
    """The same Llama 3 decoder in plain PyTorch, with Meta parameter names so state dicts load as they are."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c = cfg
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(_PlainBlock(c) for _ in range(c.n_layers))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(c.dim))
        self.output = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        """fp32 cos/sin tables on the weights' device (call again after .to(dtype))."""
        from llama3_kernels.model.rope import rope_frequencies, rope_tables

        c = self.cfg
        freqs = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling_factor, c.rope_low_freq_factor,
                                 c.rope_high_freq_factor, c.rope_original_context)  # fmt: skip
        self.rope_cos, self.rope_sin = rope_tables(freqs.to(self.tok_embeddings.weight.device), c.max_seq_len)

    def setup_cache(self, max_len: int) -> None:
        """A batch-1 KV cache per layer in SDPA's layout [1, Hkv, L, D]."""
        c, w = self.cfg, self.tok_embeddings.weight
        for layer in self.layers:
            shape = (1, c.n_kv_heads, max_len, c.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
            layer.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] → logits [B, S, vocab]. With `pos` ([1] long; B = S = 1): decode against the cache."""
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device) if pos is None else pos
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [S, D/2]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, pos)
        x = F.rms_norm(h, (h.shape[-1],), self.norm.weight, self.cfg.norm_eps)
        return self.output(x) if self.output is not None else F.linear(x, self.tok_embeddings.weight)


class _PlainBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.attention_norm, self.ffn_norm = nn.Module(), nn.Module()
        self.attention_norm.weight = nn.Parameter(torch.ones(c.dim))
        self.ffn_norm.weight = nn.Parameter(torch.ones(c.dim))
        self.attention = nn.Module()
        kv = c.n_kv_heads * c.head_dim
        for name, (i, o) in {"wq": (c.dim, c.dim), "wk": (c.dim, kv), "wv": (c.dim, kv), "wo": (c.dim, c.dim)}.items():
            setattr(self.attention, name, nn.Linear(i, o, bias=False))
        self.feed_forward = nn.Module()
        for name, (i, o) in {"w1": (c.dim, c.ffn_dim), "w2": (c.ffn_dim, c.dim), "w3": (c.dim, c.ffn_dim)}.items():
            setattr(self.feed_forward, name, nn.Linear(i, o, bias=False))
        self.register_buffer("k_cache", None, persistent=False)  # set by PlainLlama.setup_cache
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, h, cos, sin, pos):
        from llama3_kernels.model.rope import apply_rope

        c, a, f = self.c, self.attention, self.feed_forward
        b, s, _ = h.shape
        x = F.rms_norm(h, (c.dim,), self.attention_norm.weight, c.norm_eps)
        q = apply_rope(a.wq(x).view(b, s, c.n_heads, c.head_dim), cos, sin).transpose(1, 2)  # [B, Hq, S, D]
        k = apply_rope(a.wk(x).view(b, s, c.n_kv_heads, c.head_dim), cos, sin).transpose(1, 2)  # [B, Hkv, S, D]
        v = a.wv(x).view(b, s, c.n_kv_heads, c.head_dim).transpose(1, 2)
        if pos is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # decode: write slot `pos`, attend over the cache with a mask (static shapes for CUDA graphs)
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
            mask = (torch.arange(self.k_cache.shape[2], device=h.device) <= pos).view(1, 1, 1, -1)  # [1, 1, 1, L]
            o = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        h = h + a.wo(o.transpose(1, 2).reshape(b, s, c.dim))
        x = F.rms_norm(h, (c.dim,), self.ffn_norm.weight, c.norm_eps)
        return h + f.w2(F.silu(f.w1(x)) * f.w3(x))


def matmul_params(c) -> int:
    kv = c.n_kv_heads * c.head_dim
    return c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * c.ffn_dim) + c.vocab_size * c.dim


def cuda_graphed(fn):
    """Capture fn (static inputs) in a CUDA graph after a warm-up on a side stream; returns a replay that
    returns the graph's output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out  # the captured output, refreshed by the replay (the harness checks it for NaN)

    return replay


def _config(ctx: Context):
    _, get_config = _model_api()
    return get_config("debug") if ctx.cpu else get_config("llama3.2-1b")


def _models(ctx: Context, cfg, dtype):
    """(ours, plain) on the device with the same weights; ours is None when the model API is missing."""
    transformer, _ = _model_api()
    with torch.device(ctx.device):
        ours = transformer(cfg).to(dtype)
        plain = PlainLlama(cfg).to(dtype)
    plain.load_state_dict(ours.state_dict(), strict=True)
    ours.reset_rope()
    plain.reset_rope()
    ours.requires_grad_(False)
    plain.requires_grad_(False)
    return ours, plain


def _train_inputs(ctx, cfg, b, s, dtype):
    def make():
        ours, plain = _models(ctx, cfg, dtype)
        ours.requires_grad_(True)
        plain.requires_grad_(True)
        tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), device=ctx.device)
        return {"ours": ours, "plain": plain, "x": tokens[:, :-1], "y": tokens[:, 1:]}

    return make


def _plain_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _ours_loss(logits, targets):
    return ops.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _train_step(model_key: str, compile_it: bool, env: dict[str, str] | None = None):
    """env: variables set around each step (the opt-in kernels, e.g. L3K_FLASH_FWD_SM90=1). The loss is this
    project's cross-entropy for its model and F.cross_entropy on fp32 logits for the plain one (same values)."""
    loss_fn = _ours_loss if model_key == "ours" else _plain_loss

    def make(i):
        model = i[model_key]
        fwd = compiled(model) if compile_it else model
        params = [p for p in model.parameters() if p.requires_grad]
        x, y = i["x"], i["y"]

        def step():
            with env_set(env):
                logits = fwd(x)
                return torch.autograd.grad(loss_fn(logits, y), params)

        return step

    return make


def _decode_inputs(ctx, cfg, cached, length, dtype):
    def make():
        ours, plain = _models(ctx, cfg, dtype)
        ours.fuse_projections()  # what the Generator does (plain keeps its three q/k/v and two w1/w3 GEMMs)
        ours.setup_cache(1, length)
        plain.setup_cache(length)
        for mine, theirs in zip(ours.layers, plain.layers):  # the same random history in both caches
            for name in ("k_cache", "v_cache"):
                cache = getattr(mine.attention, name)
                cache.normal_()
                getattr(theirs, name).copy_(cache.transpose(1, 2))  # [1, L, Hkv, D] → [1, Hkv, L, D]
        token = torch.randint(0, cfg.vocab_size, (1, 1), device=ctx.device)
        return {
            "ours": ours, "plain": plain, "token": token,
            "positions": torch.full((1, 1), cached, dtype=torch.long, device=ctx.device),
            "cache_seqlens": torch.full((1,), cached + 1, dtype=torch.int32, device=ctx.device),
            "pos": torch.full((1,), cached, dtype=torch.long, device=ctx.device),
        }  # fmt: skip

    return make


GRAPH_KERNELS = (
    "decode_gemv",
    "decode_gemv_rope_cache",
    "rope_kv_cache",
    "decode_attn",
)  # a fused decode step's ops; references sync
FP8_KERNELS = ("rms_norm_fp8_fwd", "swiglu_fp8_fwd", "fp8_rowwise_mm")


def _ours_decode(graph: bool, fp8: bool = False, env: dict[str, str] | None = None):
    """env: variables set around each step, the capture included (L3K_PDL=0 drops a launch attribute: a graph keeps
    what capture saw)."""

    def make(i):
        model, tok, positions, lens = i["ours"], i["token"], i["positions"], i["cache_seqlens"]
        if fp8:  # the paper's serving path: inner layers' FFNs in row-wise FP8 (same weights, same cache history)
            from llama3_kernels.model.fp8 import quantize_model_fp8

            model = quantize_model_fp8(copy.deepcopy(model))
        if graph:
            from llama3_kernels.ops._common import has_kernel

            missing = [k for k in GRAPH_KERNELS + (FP8_KERNELS if fp8 else ()) if not has_kernel(k)]
            if missing:  # a failed capture can leave the stream unusable for every later row: don't try
                raise RuntimeError(f"no CUDA graph: kernels not built ({', '.join(missing)}), references sync")

        def step():
            with env_set(env), torch.inference_mode():
                return model(tok, positions, cache_seqlens=lens)

        return cuda_graphed(step) if graph else step

    return make


def _no_pdl_skip() -> str | None:
    """The no-PDL column only means something while the default column has PDL: bench/device_check.sh sets
    L3K_PDL=0 (for the whole run) when PDL's tests fail."""
    return "PDL is off in this run (L3K_PDL=0)" if switched_off("L3K_PDL") else None


def _plain_decode(compile_it: bool):
    def make(i):
        model, tok, pos = i["plain"], i["token"], i["pos"]
        fwd = compiled(model, mode="reduce-overhead") if compile_it else model

        def step():
            with torch.inference_mode():
                return fwd(tok, pos)

        return step

    return make


def fused_dq_skip() -> str | None:
    """The dQ-kernel column only means something while the default column fuses dQ (bench/device_check.sh sets
    L3K_BWD_FUSED_DQ=0 for the whole run when the fused dQ's tests fail)."""
    return "the fused dQ is off in this run (L3K_BWD_FUSED_DQ=0)" if switched_off("L3K_BWD_FUSED_DQ") else None


def cases(ctx: Context) -> list[Case]:
    skip = model_skip()
    if skip is None:
        cfg = _config(ctx)
    else:  # rows still listed, every impl marked skipped with the reason
        cfg = None
    dtype = torch.bfloat16
    b, s = (2, 64) if ctx.cpu else ((1, 2048) if ctx.quick else (2, 4096))
    cached = min(CACHED, 96) if ctx.cpu else CACHED
    length = cached + (32 if ctx.cpu else 64)  # cache capacity: the cached tokens, the new one, slack
    comp = ctx.compile_skip()
    name = cfg.name if cfg else "llama3.2-1b"
    out = []
    n = matmul_params(cfg) if cfg else None
    impls = [
        Impl(OURS, _train_step("ours", False), ours=True, skip=skip),
        Impl(
            f"{OURS} + sm90 wgmma attention (opt-in)",
            _train_step("ours", False, {"L3K_FLASH_FWD_SM90": "1", "L3K_FLASH_BWD_SM90": "1"}),
            ours=True,
            skip=skip or sm90_skip(ctx.needs_cuda()),
        ),  # fmt: skip
        Impl(f"{OURS} + torch.compile", _train_step("ours", True), ours=True, skip=skip or comp, compiles=True),
        Impl(
            f"{OURS} (dQ kernel, deterministic)",
            _train_step("ours", False, {"L3K_BWD_FUSED_DQ": "0"}),
            ours=True,
            skip=skip or ctx.needs_cuda() or fused_dq_skip(),
        ),  # fmt: skip
        Impl("plain PyTorch eager (SDPA, F.rms_norm)", _train_step("plain", False), skip=skip),
        Impl("plain PyTorch torch.compile", _train_step("plain", True), skip=skip or comp, compiles=True),
    ]
    flops = b * s * (6.0 * n + 6.0 * cfg.n_layers * cfg.dim * s) if cfg else None
    out.append(Case(FAMILY, "train step", "fwd+bwd", f"{name} {b}x{s} tokens", "bf16",
                    _train_inputs(ctx, cfg, b, s, dtype) if cfg else (lambda: None), impls, flops=flops,
                    formula="FLOPs = tokens·(6·N + 6·n_layers·dim·S), N = matmul params; no optimizer",
                    peak=PEAK_TFLOPS["bf16"], unit="tokens", items=float(b * s), host_bound=True))  # fmt: skip
    kv = cfg.n_kv_heads * cfg.head_dim if cfg else 0
    # FP8 FFNs in all but the first and last layer: those weights move 1 byte each instead of 2
    fp8_decode_bytes = (2.0 * n + 2.0 * cfg.n_layers * cached * kv * 2
                        - (cfg.n_layers - 2) * 3.0 * cfg.dim * cfg.ffn_dim) if cfg else None  # fmt: skip
    impls = [
        Impl(f"{OURS} (CUDA graph)", _ours_decode(True), ours=True, skip=skip or ctx.needs_cuda()),
        Impl(
            f"{OURS} (CUDA graph, no PDL)",
            _ours_decode(True, env={"L3K_PDL": "0"}),
            ours=True,
            skip=skip or ctx.needs_cuda() or _no_pdl_skip(),
        ),
        Impl(f"{OURS} eager", _ours_decode(False), ours=True, skip=skip),
        Impl(
            f"{OURS} FP8 FFN" + ("" if ctx.cpu else " (CUDA graph)"),
            _ours_decode(not ctx.cpu, fp8=True),
            ours=True,
            skip=skip,
            bytes=fp8_decode_bytes,
        ),
        Impl("plain PyTorch eager (SDPA, F.rms_norm)", _plain_decode(False), skip=skip),
        Impl("plain PyTorch torch.compile (reduce-overhead)", _plain_decode(True), skip=skip or comp, compiles=True),
    ]
    out.append(Case(FAMILY, "decode step", "decode", f"{name} B=1 cache={cached}", "bf16",
                    _decode_inputs(ctx, cfg, cached, length, dtype) if cfg else (lambda: None), impls,
                    bytes=(2.0 * n + 2.0 * cfg.n_layers * cached * kv * 2) if cfg else None,
                    flops=(2.0 * n + 4.0 * cfg.n_layers * cfg.dim * cached) if cfg else None,
                    formula="bytes = 2·N + 2·n_layers·L·kv_dim·2; FLOPs = 2·N + 4·n_layers·dim·L",
                    peak=PEAK_TFLOPS["bf16"], unit="tokens", items=1.0, host_bound=True))  # fmt: skip
    return out
