"""The Llama 3 model: config table, decoder, RoPE, FP8 inference path, checkpoints and tokenizers.

Checkpoint and tokenizer names are imported on first use (they pull in optional packages such as gguf).
"""

import importlib

from llama3_kernels.model.config import CONFIGS, ModelConfig, get_config
from llama3_kernels.model.fp8 import quantize_model_fp8
from llama3_kernels.model.model import Transformer

_LAZY = {
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "save_meta_checkpoint": "checkpoint",
    "ByteTokenizer": "tokenizer",
    "Llama3Tokenizer": "tokenizer",
    "GGUFTokenizer": "tokenizer",
}

__all__ = ["CONFIGS", "ModelConfig", "Transformer", "get_config", "quantize_model_fp8", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"llama3_kernels.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'llama3_kernels.model' has no attribute {name!r}")
