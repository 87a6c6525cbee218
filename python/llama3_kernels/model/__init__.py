"""The Llama 3 model: config table, decoder, RoPE, FP8 inference path (checkpoints and tokenizers alongside)."""

from llama3_kernels.model.config import CONFIGS, ModelConfig, get_config
from llama3_kernels.model.model import Transformer

__all__ = ["CONFIGS", "ModelConfig", "Transformer", "get_config"]
