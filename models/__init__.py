"""Llama model, sampling, HF-format checkpoints and tokenizer for alignflow.

Depends only on torch, safetensors, tokenizers and pydantic, so every stage and
tool can import it without pulling in the pipeline.
"""

from .config import PRESETS, ModelConfig, flops_per_token, get_preset
from .generate import Generation, generate, generate_text
from .hf_io import load_pretrained, save_pretrained
from .llama import KVCache, LlamaForCausalLM
from .tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    Tokenizer,
    render_chat,
    train_tokenizer,
)

__all__ = [
    "ModelConfig",
    "PRESETS",
    "get_preset",
    "flops_per_token",
    "LlamaForCausalLM",
    "KVCache",
    "generate",
    "generate_text",
    "Generation",
    "save_pretrained",
    "load_pretrained",
    "Tokenizer",
    "train_tokenizer",
    "render_chat",
    "PAD",
    "BOS",
    "EOS",
    "SYSTEM",
    "USER",
    "ASSISTANT",
    "SPECIAL_TOKENS",
]
