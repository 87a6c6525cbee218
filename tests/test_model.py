"""The Llama 3 model against an independent plain-PyTorch implementation written here (complex RoPE,
repeat_interleave + scaled_dot_product_attention), plus document masking, the attention hook, the KV
cache, meta-device construction, config sizes and the FP8 inference path."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llama3_kernels import ops
from llama3_kernels.model import CONFIGS, ModelConfig, Transformer, fp8, get_config
from llama3_kernels.model.fp8 import RMSNormFP8, quantize_model_fp8
from llama3_kernels.model.model import FeedForward, RMSNorm
from llama3_kernels.model.rope import rope_frequencies

SMALL = dict(max_seq_len=128)  # short RoPE tables keep the tests fast


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- independent reference
def meta_apply_scaling(freqs, factor, low=1.0, high=4.0, old_context=8192):
    """Llama 3.1's published frequency scaling, element by element as in Meta's reference code."""
    low_wavelen, high_wavelen = old_context / low, old_context / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def ref_forward(sd, cfg: ModelConfig, tokens, positions=None):
    """Straightforward fp32 Llama 3 forward from a Meta-named state dict (no library ops)."""
    b, s = tokens.shape
    hd, hq, hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    positions = torch.arange(s).expand(b, s) if positions is None else positions
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).double() / hd))
    if cfg.rope_scaling_factor is not None:
        freqs = meta_apply_scaling(freqs, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                                   cfg.rope_high_freq_factor, cfg.rope_original_context)  # fmt: skip
    cis = torch.polar(torch.ones(b, s, hd // 2, dtype=torch.float64), positions[..., None].double() * freqs)
    cis = cis.to(torch.complex64)[:, :, None, :]  # [B, S, 1, D/2]

    def rope(x):  # [B, S, H, D] as complex pairs (x[2i], x[2i+1])
        return torch.view_as_real(torch.view_as_complex(x.reshape(b, s, -1, hd // 2, 2)) * cis).flatten(-2)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = sd["tok_embeddings.weight"][tokens]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        a = norm(x, sd[p + "attention_norm.weight"])
        q = rope((a @ sd[p + "attention.wq.weight"].T).view(b, s, hq, hd)).transpose(1, 2)
        k = rope((a @ sd[p + "attention.wk.weight"].T).view(b, s, hkv, hd)).transpose(1, 2)
        v = (a @ sd[p + "attention.wv.weight"].T).view(b, s, hkv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        x = x + o @ sd[p + "attention.wo.weight"].T
        f = norm(x, sd[p + "ffn_norm.weight"])
        gate, up = f @ sd[p + "feed_forward.w1.weight"].T, f @ sd[p + "feed_forward.w3.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "feed_forward.w2.weight"].T
    out_w = sd["tok_embeddings.weight"] if cfg.tie_embeddings else sd["output.weight"]
    return norm(x, sd["norm.weight"]) @ out_w.T


def random_model(cfg: ModelConfig, gen: torch.Generator) -> Transformer:
    """A model with O(1) activations: random weights scaled by 1/sqrt(fan_in), norms near 1."""
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # embeddings too: tied logits stay O(1)
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return model


def tokens_like(cfg, b, s, gen):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=gen)


# ------------------------------------------------------------------------------------- model math
@pytest.mark.parametrize(
    "changes",
    [{}, {"tie_embeddings": True, "rope_scaling_factor": 8.0, "rope_original_context": 64}, {"n_kv_heads": 4}],
    ids=["debug", "tied-scaled", "mha"],
)
def test_matches_independent_reference(changes, gen):
    cfg = get_config("debug", **SMALL, **changes)
    model = random_model(cfg, gen)
    tokens = tokens_like(cfg, 3, 37, gen)
    with torch.no_grad():
        got = model(tokens)
        want = ref_forward(model.state_dict(), cfg, tokens)
    assert got.shape == (3, 37, cfg.vocab_size) and got.dtype == torch.float32
    assert want.abs().max() > 1.0, "activations should be O(1) for the comparison to mean something"
    assert (got - want).abs().max().item() <= 1e-5


def test_explicit_positions_and_last_index(gen):
    cfg = get_config("debug", **SMALL)
    model = random_model(cfg, gen)
    tokens = tokens_like(cfg, 2, 19, gen)
    positions = torch.stack([torch.arange(19) + 7, torch.arange(19) + 40])  # offset rows
    with torch.no_grad():
        got = model(tokens, positions)
        want = ref_forward(model.state_dict(), cfg, tokens, positions)
        last = model(tokens, positions, last_index=torch.tensor([18, 4]))
    assert (got - want).abs().max().item() <= 1e-5
    assert last.shape == (2, 1, cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], torch.stack([got[0, 18], got[1, 4]]), atol=1e-5, rtol=0)


def test_rope_scaling_matches_published_formula():
    for head_dim, theta, factor in ((128, 500000.0, 8.0), (64, 500000.0, 32.0), (128, 500000.0, 32.0)):
        base = 1.0 / (theta ** (torch.arange(0, head_dim, 2).double() / head_dim))
        want = meta_apply_scaling(base, factor)
        got = rope_frequencies(head_dim, theta, factor)
        assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
        wavelen = 2 * math.pi / base
        torch.testing.assert_close(got[wavelen < 2048].double(), base[wavelen < 2048], rtol=1e-6, atol=0)  # kept
        torch.testing.assert_close(got[wavelen > 8192].double(), base[wavelen > 8192] / factor, rtol=1e-6, atol=0)
        mid = (wavelen >= 2048) & (wavelen <= 8192)
        assert mid.any() and ((got[mid] < base[mid]) & (got[mid] > base[mid] / factor)).all()
    torch.testing.assert_close(rope_frequencies(64, 100000.0, None).double(),
                               1.0 / 100000.0 ** (torch.arange(0, 64, 2).double() / 64), rtol=1e-6, atol=0)  # fmt: skip


def test_document_mask_equals_separate_documents(gen):
    cfg = get_config("debug", **SMALL)
    model = random_model(cfg, gen)
    b, s = 2, 23
    doc_lens = [[9, 1, 13], [23]]  # per row; documents never cross rows here
    tokens = tokens_like(cfg, b, s, gen)
    positions = torch.cat([torch.arange(n) for row in doc_lens for n in row]).view(b, s)
    offsets = torch.tensor([0, *torch.tensor([n for row in doc_lens for n in row]).cumsum(0).tolist()])
    with torch.no_grad():
        got = model(tokens, positions, cu_seqlens=offsets.int(), max_seqlen=23)  # [B, S, V]
        flat, start = tokens.flatten(), 0
        for n in [n for row in doc_lens for n in row]:
            want = model(flat[start : start + n][None])[0]  # the document alone
            torch.testing.assert_close(got.flatten(0, 1)[start : start + n], want, atol=1e-5, rtol=0)
            start += n
        plain = model(tokens, positions)
    assert (plain[0, 9:] - got[0, 9:]).abs().max() > 1e-3, "the mask must change later documents"


def test_attn_fn_hook(gen):
    cfg = get_config("debug", **SMALL)
    model = random_model(cfg, gen)
    tokens = tokens_like(cfg, 2, 13, gen)
    calls = []

    def attn(q, k, v):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return ops.flash_attention(q, k, v, causal=True)

    with torch.no_grad():
        torch.testing.assert_close(model(tokens, attn_fn=attn), model(tokens), atol=1e-6, rtol=0)
        zeroed = model(tokens, attn_fn=lambda q, k, v: torch.zeros_like(q))
    hd = cfg.head_dim
    assert calls == [((2, 13, 4, hd), (2, 13, 2, hd), (2, 13, 2, hd))] * cfg.n_layers
    assert (zeroed - model(tokens)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- KV cache
def test_decode_with_cache_equals_full_forward(gen):
    cfg = get_config("debug", **SMALL)
    model = random_model(cfg, gen)
    full = copy.deepcopy(model)  # no cache
    lens = [5, 11, 8]  # left-aligned prompts of different lengths, padded on the right
    b, s, steps = len(lens), max(lens), 6
    seqs = [tokens_like(cfg, 1, n, gen)[0].tolist() for n in lens]
    padded = torch.tensor([q + [0] * (s - len(q)) for q in seqs])
    model.setup_cache(4, 32)  # max_batch larger than the batch
    assert model.cache_shape == (4, 32, cfg.n_kv_heads, cfg.head_dim)
    with torch.inference_mode():
        logits = model(padded, last_index=torch.tensor(lens) - 1)[:, 0]  # prefill [B, V]
        pos = torch.tensor(lens)
        for step in range(steps + 1):
            for i in range(b):
                want = full(torch.tensor([seqs[i]]))[0, -1]
                torch.testing.assert_close(logits[i], want, atol=1e-5, rtol=0, msg=f"row {i} step {step}")
            if step == steps:
                break
            nxt = torch.randint(0, cfg.vocab_size, (b,), generator=gen)
            for i in range(b):
                seqs[i].append(int(nxt[i]))
            logits = model(nxt[:, None], pos[:, None], cache_seqlens=(pos + 1).int())[:, 0]
            pos = pos + 1
    model.clear_cache()
    assert model.cache_shape is None


def _kernel_ops(model, *args, **kwargs) -> int:
    """Ops of one forward that launch a kernel on a GPU (views, reshapes and allocations excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"view", "_unsafe_view", "unsqueeze", "expand", "t", "transpose", "unflatten", "view_as_complex",
            "view_as_real", "detach", "alias", "slice", "select", "squeeze", "as_strided", "reshape", "flatten",
            "empty", "new_empty", "empty_strided", "item", "min", "max", "lift_fresh", "detach_"}  # fmt: skip
    # (item/min/max: the CPU path's range check of cache_seqlens, which the CUDA path skips)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.overloadpacket.__name__ not in free
            return func(*args, **(kwargs or {}))

    with Count():
        model(*args, **kwargs)
    return Count.n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections_match_and_launch_fewer_ops(dtype, gen):
    cfg = get_config("debug", n_layers=3, **SMALL)
    model = random_model(cfg, gen).to(dtype)
    fused = copy.deepcopy(model).fuse_projections()
    assert fused.fuse_projections() is fused  # idempotent
    keys = set(fused.state_dict())
    assert "layers.0.attention.wqkv.weight" in keys and "layers.2.feed_forward.w13.weight" in keys
    assert not any(k.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) for k in keys)
    w = fused.layers[1].attention.wqkv.weight
    a = model.layers[1].attention
    assert torch.equal(w, torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
    tokens = tokens_like(cfg, 2, 19, gen)
    with torch.no_grad():
        want, got = model(tokens).float(), fused(tokens).float()
    # the same products summed in the same order per output column: equal up to the GEMM's blocking
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=0)

    # a batch-1 decode step (what a CUDA graph replays): 12 fewer kernel launches per layer, 5 left (q/k/v and
    # w1/w3 GEMMs fused; RoPE of q and of k (ops.rope) and the two cache writes run in the q/k/v GEMV's epilogue;
    # both norms and the SwiGLU run inside the GEMVs that consume them)
    for m in (model, fused):
        m.setup_cache(1, 32)
    step = dict(cache_seqlens=torch.tensor([1], dtype=torch.int32))
    with torch.inference_mode():
        n_plain = _kernel_ops(model, tokens[:1, :1], **step)
        n_fused = _kernel_ops(fused, tokens[:1, :1], **step)
        torch.testing.assert_close(fused(tokens[:1, :1], **step).float(), model(tokens[:1, :1], **step).float(),
                                   atol=tol * float(want.abs().max()), rtol=0)  # fmt: skip
    for a, b in zip(model.layers, fused.layers):  # the step wrote the same k and v into both caches
        for name in ("k_cache", "v_cache"):
            mine, theirs = getattr(b.attention, name), getattr(a.attention, name)
            torch.testing.assert_close(mine, theirs, atol=tol * float(theirs.abs().max()), rtol=0)
    assert n_plain - n_fused == 12 * cfg.n_layers, (n_plain, n_fused)


def test_stacked_qkv_under_autograd_matches_separate_projections(gen):
    """With autograd on (training), wq, wk, wv run as one concatenated GEMM: the same loss and the same gradients
    of the three weights (and of everything else) as three separate projections, up to the GEMM's blocking."""
    cfg = get_config("debug", n_layers=2, **SMALL)
    model = random_model(cfg, gen)
    tokens = tokens_like(cfg, 2, 19, gen)
    results = []
    for stacked in (True, False):
        m = copy.deepcopy(model)
        for layer in m.layers:
            layer.attention.stack_qkv_for_grad = stacked
        loss = F.cross_entropy(m(tokens).flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys() and "layers.1.attention.wk.weight" in grads_a
    for name, g in grads_a.items():
        torch.testing.assert_close(g, grads_b[name], atol=1e-5 * float(grads_b[name].abs().max()), rtol=0, msg=name)


def test_fp8_quantization_of_a_fused_model(gen):
    cfg = get_config("debug", n_layers=4, **SMALL)
    model = random_model(cfg, gen).to(torch.bfloat16)
    fused = copy.deepcopy(model).fuse_projections()
    quantize_model_fp8(model)
    quantize_model_fp8(fused)
    for i in model.fp8_layers:
        a, b = model.layers[i].feed_forward, fused.layers[i].feed_forward
        assert torch.equal(a.w13.view(torch.uint8), b.w13.view(torch.uint8)) and torch.equal(a.w13_scale, b.w13_scale)
    tokens = tokens_like(cfg, 1, 9, gen)
    with torch.no_grad():
        want = model(tokens).float()
        torch.testing.assert_close(fused(tokens).float(), want, atol=2e-2 * float(want.abs().max()), rtol=0)


def test_fused_fp8_decode_step_equals_full_forward(gen):
    """A decode step of a fused model with FP8 FFNs (TransformerBlock._decode: the fused rms_norm_linear for q/k/v,
    the FP8 layers' own norm + FFN) gives the logits the full forward gives at that position."""
    cfg = get_config("debug", n_layers=4, **SMALL)
    model = quantize_model_fp8(random_model(cfg, gen).fuse_projections())
    assert model.fp8_layers == [1, 2]
    tokens = tokens_like(cfg, 2, 7, gen)
    with torch.no_grad():
        want = model(tokens)[:, -1]  # no cache: the training-style path
    model.setup_cache(2, 16)
    with torch.inference_mode():
        model(tokens[:, :-1])  # prefill writes the cache
        pos = torch.full((2, 1), tokens.shape[1] - 1)
        got = model(tokens[:, -1:], pos, cache_seqlens=torch.full((2,), tokens.shape[1], dtype=torch.int32))[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)


def test_cache_errors():
    model = Transformer(get_config("debug", **SMALL))
    with pytest.raises(ValueError, match="cache_seqlens"):
        model(torch.zeros(1, 1, dtype=torch.long), cache_seqlens=torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, 129)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------ construction, configs
def test_meta_construction_and_assign_load(gen):
    cfg = get_config("debug", **SMALL)
    src = random_model(cfg, gen)
    tokens = tokens_like(cfg, 2, 9, gen)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters()) and model.rope_cos.is_meta
    model.load_state_dict(src.state_dict(), assign=True)  # the tensors are taken, not copied
    assert model.tok_embeddings.weight.data_ptr() == src.tok_embeddings.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), src(tokens), atol=0, rtol=0)
    assert set(src.state_dict()) == set(CONFIG_KEYS(cfg))

    with torch.device("meta"):
        fresh = Transformer(cfg)
    fresh.to_empty(device="cpu")
    assert torch.equal(fresh.rope_cos, src.rope_cos)  # rebuilt by to_empty, not left uninitialized
    fresh.load_state_dict(src.state_dict())  # copy in place, as a trainer resuming would
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), src(tokens), atol=0, rtol=0)
        fresh.init_weights()
        out = fresh(tokens)
    assert torch.isfinite(out).all() and (out - src(tokens)).abs().max() > 0


def CONFIG_KEYS(cfg):
    keys = ["tok_embeddings.weight", "norm.weight"] + ([] if cfg.tie_embeddings else ["output.weight"])
    for i in range(cfg.n_layers):
        keys += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        keys += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        keys += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    return keys


@pytest.mark.parametrize(
    "name,params",
    [("llama3.2-1b", 1.236e9), ("llama3.2-3b", 3.213e9), ("llama3.1-8b", 8.030e9), ("llama3.1-70b", 70.554e9),
     ("llama3.1-405b", 405.853e9), ("smollm2-135m", 134.5e6), ("debug", 1836288)],
)  # fmt: skip
def test_config_sizes(name, params):
    with torch.device("meta"):
        model = Transformer(get_config(name))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 2e-3, f"{name}: {n}"
    assert set(model.state_dict()) == set(CONFIG_KEYS(model.cfg))


def test_configs_table():
    assert get_config("llama3.1-8b").rope_scaling_factor == 8.0 and get_config("llama3-8b").rope_scaling_factor is None
    assert get_config("llama3.2-1b").rope_scaling_factor == 32.0 and get_config("llama3.2-1b").tie_embeddings
    s = get_config("smollm2-135m")
    assert (s.rope_theta, s.rope_scaling_factor, s.tie_embeddings, s.head_dim) == (100000.0, None, True, 64)
    d = get_config("debug")
    assert (d.dim, d.n_layers, d.n_heads, d.n_kv_heads, d.ffn_dim, d.vocab_size, d.max_seq_len) == (
        256, 2, 4, 2, 768, 512, 1024)  # fmt: skip
    assert get_config("debug", max_seq_len=64).max_seq_len == 64 and CONFIGS["debug"].max_seq_len == 1024
    with pytest.raises(KeyError, match="llama3-9b"):
        get_config("llama3-9b")
    with pytest.raises(ValueError, match="n_kv_heads"):
        get_config("debug", n_kv_heads=3)


def test_bf16_keeps_fp32_rope(gen):
    cfg = get_config("debug", **SMALL)
    model = random_model(cfg, gen)
    tokens = tokens_like(cfg, 2, 11, gen)
    with torch.no_grad():
        want = model(tokens)
        model.to(torch.bfloat16)
        got = model(tokens)
    assert got.dtype == torch.bfloat16 and model.rope_cos.dtype == torch.float32
    # bf16 weights and activations: logits of O(3) agree to a few bf16 ulps of the largest
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


# ---------------------------------------------------------------------------------------------- FP8
def e4m3_rowwise(x, amax_ub):
    """Row-wise e4m3 round trip written out: scale = max(min(amax, ub), tiny) / 448."""
    scale = x.abs().amax(-1, keepdim=True).clamp(max=amax_ub).clamp(min=1 / 512) / 448.0
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def test_fp8_ffn_wiring_matches_explicit_math(gen):
    cfg = get_config("debug", n_layers=3, **SMALL)
    model = random_model(cfg, gen)
    ff, norm = model.layers[1].feed_forward, model.layers[1].ffn_norm
    w1, w2, w3 = (w.weight.detach().clone() for w in (ff.w1, ff.w2, ff.w3))
    nw = norm.weight.detach().clone()
    quantize_model_fp8(model)
    assert model.fp8_layers == [1]
    assert isinstance(model.layers[0].feed_forward, FeedForward) and isinstance(
        model.layers[2].feed_forward, FeedForward
    )
    layer = model.layers[1]
    assert layer.feed_forward.w13.dtype == torch.float8_e4m3fn and layer.feed_forward.w13.shape == (2 * 768, 256)
    assert layer.ffn_norm.weight is norm.weight  # the norm parameter is shared, not copied

    x, res = torch.randn(2, 7, 256, generator=gen), torch.randn(2, 7, 256, generator=gen)
    with torch.no_grad():
        (xq, xs), h = layer.ffn_norm(x, res)
        got = layer.feed_forward((xq, xs))
    hh = x + res
    y = hh * torch.rsqrt(hh.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * nw
    gate = e4m3_rowwise(y, 1200.0) @ e4m3_rowwise(w1, math.inf).T
    up = e4m3_rowwise(y, 1200.0) @ e4m3_rowwise(w3, math.inf).T
    want = e4m3_rowwise(F.silu(gate) * up, 1200.0) @ e4m3_rowwise(w2, math.inf).T
    torch.testing.assert_close(h, hh, atol=0, rtol=0)
    # fp32 summation order can flip an intermediate's e4m3 rounding (or its row scale) by one step, which moves a
    # whole output row slightly: a step is ≤ 1/8 of one of 768 intermediates, well under 2% of the row's norm,
    # while a wiring error (swapped w1/w3, a lost scale) is an O(1) change
    row_err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert row_err.max() < 0.02 and (got - want).norm() / want.norm() < 0.01, row_err.max()
    # against the unquantized FFN: four e4m3 roundings (3 mantissa bits) leave a few percent rms error
    exact = (F.silu(y @ w1.T) * (y @ w3.T)) @ w2.T
    assert (got - exact).norm() / exact.norm() < 0.08


def test_fp8_activation_amax_bound(gen):
    norm = RMSNormFP8(RMSNorm(64, 1e-5))
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.weight[5] = 1e4  # an outlier channel: normalized values ~1e4 in column 5
    x = torch.randn(3, 64, generator=gen)
    x[:, 5] = 1 + x[:, 5].abs()  # |x| >= 1 there: normalized values >= 1e4 / rms(x) > 1200
    xq, scale = norm(x)
    torch.testing.assert_close(scale, torch.full((3,), 1200.0 / 448.0))  # amax clamped at 1200
    assert (xq[:, 5].float().abs() == 448).all()  # the outlier saturates instead of crushing the row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_model_close_to_unquantized(dtype, gen):
    cfg = get_config("debug", n_layers=4, **SMALL)
    model = random_model(cfg, gen).to(dtype)
    tokens = tokens_like(cfg, 2, 21, gen)
    with torch.no_grad():
        want = model(tokens).float()
        quantize_model_fp8(model)
        got = model(tokens)
    assert model.fp8_layers == [1, 2] and got.dtype == dtype
    ff = model.layers[1].feed_forward
    w13, scale = ff.w13.clone(), ff.w13_scale.clone()
    model.to(torch.float16)  # casts the 16-bit parts only: FP8 weights and fp32 scales are kept bit for bit
    assert ff.w13.dtype == torch.float8_e4m3fn and torch.equal(ff.w13.view(torch.uint8), w13.view(torch.uint8))
    assert torch.equal(ff.w13_scale, scale) and ff.out_dtype == torch.float16
    with torch.no_grad():
        assert model(tokens).dtype == torch.float16
    # random weights are a harsh case (no redundancy); measured ~4-5% relative rms change on logits
    assert (got.float() - want).norm() / want.norm() < 0.10
    with pytest.raises(ValueError, match="meta"):
        with torch.device("meta"):
            quantize_model_fp8(Transformer(cfg))


def test_ffn_activation_amax_and_skip_layers(gen):
    """Per layer, max |normed FFN input| and |swiglu output| recomputed by hand; skipped layers stay 16-bit."""
    cfg = get_config("debug", n_layers=4, **SMALL)
    model = random_model(cfg, gen)
    tokens = tokens_like(cfg, 2, 9, gen)
    seen = []
    hooks = [layer.feed_forward.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for layer in model.layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    expected = []
    for layer, x in zip(model.layers, seen, strict=True):
        ff = layer.feed_forward
        a = F.silu(ff.w1(x)) * ff.w3(x)
        expected.append(max(x.abs().max().item(), a.abs().max().item()))
    amax = fp8.ffn_activation_amax(model, tokens)
    assert amax == pytest.approx(expected, rel=1e-5)
    bound = sorted(amax)[1]  # two or three layers above it
    outliers = fp8.outlier_layers(model, tokens, bound)
    assert outliers == [i for i, a in enumerate(amax) if a > bound] and len(outliers) >= 2
    with pytest.raises(ValueError, match="skip_layers"):
        quantize_model_fp8(model, skip_layers=[4])
    quantize_model_fp8(model, skip_first_last=False, skip_layers=outliers)
    assert model.fp8_layers == [i for i in range(4) if i not in outliers]
    assert all(isinstance(model.layers[i].feed_forward, FeedForward) for i in outliers)
    with pytest.raises(ValueError, match="already FP8"):
        fp8.ffn_activation_amax(model, tokens)


# ------------------------------------------------------------------------------------------- GPU
def _bf16_errors(cfg, gen, device, cu_seqlens=None):
    """Max errors against the fp32 model of (logits, layer-0 wq grad, last w2 grad): the bf16 model on `device`
    and, as the yardstick of PyTorch's own bf16 error, the bf16 model on the CPU (fp32 references inside)."""
    model = random_model(cfg, gen)
    tokens = tokens_like(cfg, 2, 77, gen)
    targets = tokens_like(cfg, 2, 77, gen)
    positions = None
    if cu_seqlens is not None:  # documents over the flattened batch, positions restart in each
        starts = cu_seqlens[:-1].long()
        seg = torch.bucketize(torch.arange(2 * 77), cu_seqlens[1:].long(), right=True)
        positions = (torch.arange(2 * 77) - starts[seg]).view(2, 77)

    def run(m, dev):
        kw = {}
        if cu_seqlens is not None:
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            kw = dict(positions=positions.to(dev), cu_seqlens=cu_seqlens.to(dev), max_seqlen=longest)
        logits = m(tokens.to(dev), **kw)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.to(dev).flatten()).backward()
        grads = (m.layers[0].attention.wq.weight.grad, m.layers[-1].feed_forward.w2.weight.grad)
        return [t.detach().cpu().double() for t in (logits, *grads)]

    want = run(model, "cpu")
    low = run(copy.deepcopy(model).to(torch.bfloat16), "cpu")
    got = run(copy.deepcopy(model).to(device).to(torch.bfloat16), device)
    err = lambda a: [(x - w).abs().max().item() for x, w in zip(a, want)]  # noqa: E731
    return err(got), err(low)


@pytest.mark.cuda
@pytest.mark.parametrize("varlen", [False, True])
def test_cuda_bf16_model_within_twice_pytorch_bf16_error(gen, varlen):
    """Forward and backward of the bf16 model on the GPU (kernels) against the fp32 model: no worse than twice
    the error of the same bf16 model on the CPU."""
    cu = torch.tensor([0, 30, 77, 100, 154], dtype=torch.int32) if varlen else None
    got, low = _bf16_errors(get_config("debug", **SMALL), gen, "cuda", cu)
    for name, g, bound in zip(("logits", "wq grad", "w2 grad"), got, low):
        assert g <= 2 * bound + 1e-4, f"{name}: error {g:.3g} > twice PyTorch's bf16 error {bound:.3g}"
