"""Checkpoint readers (Meta, Hugging Face, GGUF) that all return Meta-named state dicts plus a ModelConfig.

Meta names are the model's own (`layers.3.attention.wq.weight`), so loading is a strict `load_state_dict` with
`assign=True` into a model built on the meta device: the weights are read once (mmap'd where the format allows)
and never held twice. `load_model(name_or_path)` is the one entry point the generator and CLI use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import LLAMA3_VOCAB, ModelConfig
from .model import Transformer
from .rope import rope_frequencies

# Meta shards: which dim each weight is split along under model parallelism (None: replicated)
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 1, "output": 0}

HF_NAMES = {  # Hugging Face suffix → Meta suffix, inside model.layers.N.
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_NAMES = {  # llama.cpp suffix → Meta suffix, inside blk.N.
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
GGUF_TOP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}


# --------------------------------------------------------------------------------------------- validation
def check_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Check a Meta-named state dict against the model a config builds: same names, same shapes.

    Args:
        state_dict: name → tensor.
        cfg: the config.

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped tensor.
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = [f"missing tensors {missing}"] * bool(missing) + [f"unexpected tensors {unexpected}"] * bool(unexpected)
    problems += [f"mis-shaped tensors [{'; '.join(wrong)}]"] * bool(wrong)
    if problems:
        raise ValueError(f"checkpoint does not match config {cfg.name!r}: " + ", ".join(problems))


def _config(**fields) -> ModelConfig:
    """ModelConfig from fields, its own ValueError/TypeError prefixed so the reader knows the source."""
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint config is not a valid ModelConfig: {e}") from e


# ---------------------------------------------------------------------------------------------- Meta format
def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU hidden size: 2/3 of 4·dim, times the multiplier, rounded up to a multiple (8B: 14336)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def load_meta_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read `params.json` + `consolidated.NN.pth` (mmap'd), merging model-parallel shards.

    Args:
        directory: the checkpoint folder.

    Returns:
        (state dict with Meta names, ModelConfig). Tied embeddings iff the checkpoint has no `output.weight`.

    Raises:
        FileNotFoundError: no params.json or no consolidated.*.pth.
        ValueError: shards disagree on names, or params are invalid.
    """
    directory = Path(directory)
    params = json.loads((directory / "params.json").read_text())
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no consolidated.*.pth")
    parts = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in shards]
    for p, part in zip(shards[1:], parts[1:]):
        if part.keys() != parts[0].keys():
            diff = sorted(set(part) ^ set(parts[0]))
            raise ValueError(f"{p.name}: shard tensor names differ from {shards[0].name}: {diff}")
    state_dict = {}
    for name in parts[0]:
        if name == "rope.freqs":  # Llama 2 stored its RoPE table; the model computes its own
            continue
        kind = name.split(".")[-2]  # layers.0.attention.wq.weight → wq
        dim = SHARD_DIM.get(kind)
        tensors = [part[name] for part in parts]
        state_dict[name] = tensors[0] if len(tensors) == 1 or dim is None else torch.cat(tensors, dim=dim)

    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # older params.json leave it to the tokenizer
        vocab = state_dict["tok_embeddings.weight"].shape[0]
    scaled = bool(params.get("use_scaled_rope", False))
    cfg = _config(
        name=directory.name,
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=vocab,
        ffn_dim=meta_ffn_dim(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 500000.0),
        # Meta's reference code hard-codes factor 8 (Llama 3.1); our own files record the factor
        rope_scaling_factor=params.get("rope_scaling_factor", 8.0) if scaled else None,
        rope_low_freq_factor=params.get("rope_low_freq_factor", 1.0),
        rope_high_freq_factor=params.get("rope_high_freq_factor", 4.0),
        rope_original_context=params.get("rope_original_context", 8192),
        max_seq_len=params.get("max_seq_len", 131072 if scaled else 8192),
        tie_embeddings="output.weight" not in state_dict,
        **{k: params[k] for k in ("bos_id", "eos_ids") if k in params},
    )
    return state_dict, cfg


def save_meta_checkpoint(
    model: torch.nn.Module | dict[str, torch.Tensor], cfg: ModelConfig, directory: str | Path, n_shards: int = 1
) -> Path:
    """Write a Meta-format checkpoint: `params.json` + `consolidated.NN.pth`, split into model-parallel shards.

    Meta's params.json has no FFN size; it is encoded as multiple_of = ffn_dim (with a multiplier when 8/3·dim
    exceeds ffn_dim), which Meta's formula maps back to exactly ffn_dim. Non-Meta keys (rope_scaling_factor,
    bos_id, eos_ids ...) are ignored by Meta's loader and read back by ours.

    Args:
        model: a Transformer or its state dict.
        cfg: its config.
        directory: created if needed.
        n_shards: number of shards; every split dim must divide by it.

    Returns:
        The directory.

    Raises:
        ValueError: a tensor cannot be split into n_shards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if isinstance(model, torch.nn.Module) else model
    base = int(2 * (4 * cfg.dim) / 3)
    params = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": cfg.ffn_dim,
        "ffn_dim_multiplier": cfg.ffn_dim / base if base > cfg.ffn_dim else None,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "use_scaled_rope": cfg.rope_scaling_factor is not None,
        "max_seq_len": cfg.max_seq_len,
        "bos_id": cfg.bos_id,
        "eos_ids": list(cfg.eos_ids),
    }
    if cfg.rope_scaling_factor is not None:
        params |= {
            "rope_scaling_factor": cfg.rope_scaling_factor,
            "rope_low_freq_factor": cfg.rope_low_freq_factor,
            "rope_high_freq_factor": cfg.rope_high_freq_factor,
            "rope_original_context": cfg.rope_original_context,
        }
    assert meta_ffn_dim(cfg.dim, params["multiple_of"], params["ffn_dim_multiplier"]) == cfg.ffn_dim
    shards = [{} for _ in range(n_shards)]
    for name, tensor in state_dict.items():
        dim = SHARD_DIM.get(name.split(".")[-2])
        tensor = tensor.detach().cpu()
        if dim is None:
            pieces = [tensor] * n_shards
        elif tensor.shape[dim] % n_shards:
            raise ValueError(f"n_shards: {name} dim {dim} of size {tensor.shape[dim]} does not split into {n_shards}")
        else:
            pieces = tensor.chunk(n_shards, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    (directory / "params.json").write_text(json.dumps(params, indent=2))
    for i, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    return directory


# ------------------------------------------------------------------------------------ Hugging Face format
def unpermute_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the HF converter's q/k row permutation: per head, rows [re half | im half] → interleaved pairs.

    HF rotates (x[i], x[i + D/2]); Meta rotates (x[2i], x[2i+1]). Rows of head h: HF row j < D/2 is Meta row 2j,
    HF row D/2 + j is Meta row 2j + 1.
    """
    out_dim, in_dim = w.shape
    d = out_dim // n_heads
    return w.view(n_heads, 2, d // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _hf_rope(hf: dict) -> dict:
    """ModelConfig RoPE fields from a config.json (transformers 4: rope_theta + rope_scaling; 5: rope_parameters)."""
    rope = dict(hf.get("rope_scaling") or {}) | dict(hf.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "llama3":
        fields |= {
            "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "rope_high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "rope_original_context": int(rope.get("original_max_position_embeddings", 8192)),
        }
    elif kind != "default":
        raise ValueError(f"config.json: rope type {kind!r} is not supported (only default and llama3)")
    return fields


def load_hf_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read a Hugging Face Llama checkpoint (`config.json` + `*.safetensors`) into Meta names and layout.

    Args:
        directory: the folder save_pretrained wrote.

    Returns:
        (state dict with Meta names and interleaved-RoPE q/k rows, ModelConfig).

    Raises:
        FileNotFoundError: no config.json or no safetensors.
        ValueError: a feature the model lacks (biases, another activation or RoPE type, head_dim ≠ dim / heads),
            or tensor names that are not Llama's.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json: attention_bias/mlp_bias are set; the model has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r}, the model's FFN is SwiGLU (silu)")
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"config.json: head_dim {hf['head_dim']} ≠ hidden_size / num_attention_heads")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors")
    eos = hf.get("eos_token_id")
    tie = bool(hf.get("tie_word_embeddings", False))
    cfg = _config(
        name=directory.name,
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=hf["vocab_size"],
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 8192),
        tie_embeddings=tie,
        **_hf_rope(hf),
        **({"bos_id": hf["bos_token_id"]} if hf.get("bos_token_id") is not None else {}),
        **({"eos_ids": tuple(eos) if isinstance(eos, list) else (eos,)} if eos is not None else {}),
    )
    state_dict, unknown = {}, []
    for f in files:
        for name, tensor in load_file(f).items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
            if m and m.group(2) in HF_NAMES:
                meta = f"layers.{m.group(1)}.{HF_NAMES[m.group(2)]}.weight"
                if m.group(2) == "self_attn.q_proj":
                    tensor = unpermute_hf_rotary(tensor, n_heads)
                elif m.group(2) == "self_attn.k_proj":
                    tensor = unpermute_hf_rotary(tensor, n_kv_heads)
            elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                meta = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}.get(
                    name, "output.weight"
                )
            elif name.endswith("rotary_emb.inv_freq"):  # older transformers saved the RoPE table
                continue
            else:
                unknown.append(name)
                continue
            state_dict[meta] = tensor
    if unknown:
        raise ValueError(f"{directory}: unexpected tensors (not Llama's) {sorted(unknown)}")
    if tie:  # a tied checkpoint may still store lm_head: it must be the embedding
        out = state_dict.pop("output.weight", None)
        if out is not None and not torch.equal(out, state_dict.get("tok_embeddings.weight", out)):
            raise ValueError("config.json ties embeddings but lm_head.weight differs from embed_tokens.weight")
    return state_dict, cfg


# --------------------------------------------------------------------------------------------------- GGUF
def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _fp32_value(x: float) -> float:
    """The shortest decimal of an fp32 metadata value (GGUF stores eps 1e-5 as fp32 9.99999974e-06)."""
    import numpy as np

    return float(str(np.float32(x)))


def _gguf_tensor(t) -> torch.Tensor:
    """One GGUF tensor as fp32 torch, dequantized (F32, F16, BF16, Q8_0, Q4_1 ... whatever gguf.quants reads)."""
    import gguf
    import numpy as np

    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        data = np.array(t.data, dtype=np.float32)
    elif t.tensor_type == gguf.GGMLQuantizationType.F16:
        data = np.array(t.data).astype(np.float32)
    else:
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor {t.name}: type {t.tensor_type.name} cannot be dequantized") from e
    return torch.from_numpy(np.ascontiguousarray(data).reshape(shape))


def _gguf_rope_scaling(reader, head_dim: int, theta: float, arch: str) -> dict:
    """Llama 3.1 RoPE scaling from a GGUF: llama.cpp stores it as a `rope_freqs` tensor of per-pair divisors.

    The factor is their maximum; the low/high factors and original context are Meta's defaults, and the result
    is checked against the stored divisors, so a file scaled otherwise is refused rather than misread.
    """
    kind = _gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    stored = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if kind not in ("none", None) or (stored is None and _gguf_field(reader, f"{arch}.rope.scaling.factor")):
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported (only Llama 3.1's rope_freqs)")
    if stored is None:
        return {}
    divisors = _gguf_tensor(stored).flatten()
    factor = float(divisors.max())
    plain, scaled = rope_frequencies(head_dim, theta), rope_frequencies(head_dim, theta, factor)
    if divisors.shape != plain.shape or not torch.allclose(plain / scaled, divisors, rtol=1e-4):
        raise ValueError("GGUF rope_freqs does not match Llama 3.1 scaling (low 1, high 4, original context 8192)")
    return {"rope_scaling_factor": factor}


def load_gguf_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read a llama-architecture GGUF file, dequantizing every tensor to fp32.

    llama.cpp's converter permutes HF's q/k rows back to interleaved RoPE pairs (its "normal" RoPE mode), so
    GGUF q/k rows are already in Meta's layout and are taken as they are.

    Args:
        path: the .gguf file.

    Returns:
        (fp32 state dict with Meta names, ModelConfig); bos/eos ids come from the file's tokenizer metadata.

    Raises:
        ValueError: another architecture, unknown tensor names, unsupported RoPE scaling or tensor types.
    """
    state_dict, cfg, _ = _load_gguf(path)
    return state_dict, cfg


def _load_gguf(path: str | Path):
    """(state dict, config, GGUFTokenizer or None) from one read of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r}; only 'llama' is supported")
    state_dict, unknown = {}, []
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if m and m.group(2) in GGUF_NAMES:
            state_dict[f"layers.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.weight"] = _gguf_tensor(t)
        elif t.name in GGUF_TOP:
            state_dict[GGUF_TOP[t.name]] = _gguf_tensor(t)
        elif t.name != "rope_freqs.weight":
            unknown.append(t.name)
    if unknown:
        raise ValueError(f"{path}: unexpected GGUF tensors {sorted(unknown)}")

    def meta(key, default=None):
        value = _gguf_field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    dim, n_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    theta = _fp32_value(meta("rope.freq_base", 10000.0))
    if int(meta("rope.dimension_count", dim // n_heads)) != dim // n_heads:
        raise ValueError(f"{path}: partial RoPE (rope.dimension_count ≠ head dim) is not supported")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    bos, eos = _gguf_field(reader, "tokenizer.ggml.bos_token_id"), _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids, tokenizer = None, None
    if tokens is not None and _gguf_field(reader, "tokenizer.ggml.model") == "gpt2":
        from .tokenizer import GGUFTokenizer

        tokenizer = GGUFTokenizer.from_gguf(reader)
        eos_ids = tuple(tokenizer.stop_ids)
    elif eos is not None:
        eos_ids = (int(eos),)
    cfg = _config(
        name=_gguf_field(reader, "general.name") or Path(path).stem,
        dim=dim,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        vocab_size=int(_gguf_field(reader, f"{arch}.vocab_size", len(tokens) if tokens else 0)),
        ffn_dim=int(meta("feed_forward_length")),
        norm_eps=_fp32_value(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_seq_len=int(meta("context_length")),
        tie_embeddings="output.weight" not in state_dict,
        **_gguf_rope_scaling(reader, dim // n_heads, theta, arch),
        **({"bos_id": int(bos)} if bos is not None else {}),
        **({"eos_ids": eos_ids} if eos_ids else {}),
    )
    return state_dict, cfg, tokenizer


# ------------------------------------------------------------------------------------------- entry points
def checkpoint_format(path: str | Path) -> str:
    """ "meta", "hf" or "gguf" for a checkpoint path (a .gguf file, or a folder holding one of the formats).

    Raises:
        FileNotFoundError: the path does not exist or holds no recognised checkpoint.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        if (path / "params.json").is_file():
            return "meta"
        if (path / "config.json").is_file():
            return "hf"
        if len(list(path.glob("*.gguf"))) == 1:
            return "gguf"
    raise FileNotFoundError(f"name_or_path: {str(path)!r} is not a .gguf file nor a Meta / Hugging Face / GGUF folder")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read any supported checkpoint into (Meta-named state dict, ModelConfig); see `checkpoint_format`."""
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "gguf":
        return load_gguf_checkpoint(path if path.is_file() else next(path.glob("*.gguf")))
    return load_meta_checkpoint(path) if kind == "meta" else load_hf_checkpoint(path)


def _default_tokenizer(cfg: ModelConfig, directory: Path):
    """The tokenizer a Meta/HF folder implies: its tiktoken tokenizer.model, Llama 3's, or bytes (debug)."""
    from .tokenizer import ByteTokenizer, Llama3Tokenizer

    for candidate in (directory / "tokenizer.model", directory / "original" / "tokenizer.model"):
        if candidate.is_file() and cfg.vocab_size == LLAMA3_VOCAB:
            return Llama3Tokenizer(candidate)
    if cfg.vocab_size == LLAMA3_VOCAB:
        return Llama3Tokenizer()
    return ByteTokenizer() if cfg.vocab_size >= ByteTokenizer.vocab_size else None


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build the model and its tokenizer from a checkpoint, without ever holding two copies of the weights.

    Args:
        name_or_path: "smollm2-135m" (fetched into the cache on first use), a .gguf file, or a Meta
            (params.json) or Hugging Face (config.json) folder.
        device: where the weights go.
        dtype: the weights' dtype (the GGUF reader dequantizes to fp32 first).

    Returns:
        (Transformer in eval mode, tokenizer): GGUFTokenizer for GGUF files, Llama3Tokenizer for 128256-token
        vocabularies, ByteTokenizer for small ones, None if none fits.

    Raises:
        FileNotFoundError: unknown name or path.
        ValueError: the checkpoint does not match its own config (naming the tensors) or is unsupported.
    """
    if str(name_or_path) == "smollm2-135m":
        from .hub import smollm2_gguf_path

        path, name = smollm2_gguf_path(), "smollm2-135m"
    else:
        path, name = Path(name_or_path), None
    kind = checkpoint_format(path)
    if kind == "gguf":
        state_dict, cfg, tokenizer = _load_gguf(path if path.is_file() else next(path.glob("*.gguf")))
    else:
        state_dict, cfg = load_meta_checkpoint(path) if kind == "meta" else load_hf_checkpoint(path)
        tokenizer = _default_tokenizer(cfg, path)
    if name is not None:
        cfg = cfg.replace(name=name)
    check_state_dict(state_dict, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    for key in list(state_dict):  # one tensor at a time: peak memory stays one checkpoint + one tensor
        state_dict[key] = state_dict[key].to(device=device, dtype=dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.reset_rope()
    return model.eval(), tokenizer
