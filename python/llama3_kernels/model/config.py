"""One typed config for every Llama 3 size, plus a table of named sizes (a tiny debug model included).

Sizes follow the published configs: Meta's params.json for Llama 3 / 3.1 / 3.2, Hugging Face's config.json
for SmolLM2-135M (the same architecture: RMSNorm, GQA, RoPE, SwiGLU, tied embeddings).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LLAMA3_VOCAB = 128256
LLAMA3_BOS = 128000
LLAMA3_STOP_IDS = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


@dataclass
class ModelConfig:
    """A Llama 3 decoder's hyperparameters.

    rope_scaling_factor None means plain RoPE; a number turns on the Llama 3.1 frequency scaling
    (8 for Llama 3.1, 32 for Llama 3.2 1B/3B) with the low/high frequency factors and original context.
    """

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    bos_id: int = LLAMA3_BOS
    eos_ids: tuple[int, ...] = LLAMA3_STOP_IDS

    def __post_init__(self) -> None:
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field}: expected a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads: dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"n_heads: RoPE needs an even head dim, got {self.head_dim}")
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            raise ValueError(
                f"rope_scaling_factor: expected None or a positive float, got {self.rope_scaling_factor!r}"
            )
        self.eos_ids = tuple(self.eos_ids)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _llama31(name: str, dim: int, n_layers: int, n_heads: int, ffn_dim: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=8,
        vocab_size=LLAMA3_VOCAB,
        ffn_dim=ffn_dim,
        rope_scaling_factor=8.0,
        max_seq_len=131072,
    )


def _llama32(name: str, dim: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=8,
        vocab_size=LLAMA3_VOCAB,
        ffn_dim=8192,
        rope_scaling_factor=32.0,
        max_seq_len=131072,
        tie_embeddings=True,
    )


CONFIGS: dict[str, ModelConfig] = {
    # byte-level debug model (ByteTokenizer: 256 bytes + bos 256 + eos 257, vocab padded to 512)
    "debug": ModelConfig(
        name="debug",
        dim=256,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        ffn_dim=768,
        max_seq_len=1024,
        bos_id=256,
        eos_ids=(257,),
    ),
    "llama3.2-1b": _llama32("llama3.2-1b", 2048, 16, 32),
    "llama3.2-3b": _llama32("llama3.2-3b", 3072, 28, 24),
    "llama3-8b": ModelConfig(
        name="llama3-8b",
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=LLAMA3_VOCAB,
        ffn_dim=14336,
    ),
    "llama3.1-8b": _llama31("llama3.1-8b", 4096, 32, 32, 14336),
    "llama3.1-70b": _llama31("llama3.1-70b", 8192, 80, 64, 28672),
    "llama3.1-405b": _llama31("llama3.1-405b", 16384, 126, 128, 53248),
    # SmolLM2-135M(-Instruct): <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2
    "smollm2-135m": ModelConfig(
        name="smollm2-135m",
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        vocab_size=49152,
        ffn_dim=1536,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_embeddings=True,
        bos_id=1,
        eos_ids=(0, 2),
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named config (a fresh copy), optionally with fields overridden.

    Args:
        name: a key of CONFIGS, e.g. "debug", "llama3.2-1b", "llama3.1-8b", "smollm2-135m".
        overrides: fields to change, e.g. max_seq_len=4096.
    Returns:
        A ModelConfig.
    Raises:
        KeyError naming the unknown config and the known ones.
    """
    if name not in CONFIGS:
        raise KeyError(f"name: unknown model config {name!r}; known: {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)
