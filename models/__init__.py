"""Models, tokenizers, chat rendering, sampling and Hugging Face-format I/O for alignflow.

Depends on torch, safetensors, tokenizers, transformers and pydantic, never on the pipeline,
so every stage and tool can import it."""

from .chat import ChatTemplateError, prompt_ids, render_chat, render_examples, stop_ids
from .config import PRESETS, ModelConfig, flops_per_token, get_preset
from .generate import Generation, generate, generate_text
from .hf_io import (BUILTIN, REWARD, TRANSFORMERS, fit_vocabulary, is_reward_model, load_model, load_pretrained,
                    model_kind, save_model, save_pretrained)
from .llama import KVCache, LlamaForCausalLM
from .tokenizer import (ASSISTANT, BOS, EOS, PAD, SPECIAL_TOKENS, SYSTEM, USER, Tokenizer, ensure_pad_token,
                        load_tokenizer, train_tokenizer)

__all__ = [
    "ModelConfig", "PRESETS", "get_preset", "flops_per_token",
    "LlamaForCausalLM", "KVCache",
    "generate", "generate_text", "Generation",
    "save_pretrained", "load_pretrained", "load_model", "save_model", "fit_vocabulary", "model_kind",
    "is_reward_model", "BUILTIN", "TRANSFORMERS", "REWARD",
    "Tokenizer", "train_tokenizer", "load_tokenizer", "ensure_pad_token",
    "render_chat", "render_examples", "prompt_ids", "stop_ids", "ChatTemplateError",
    "PAD", "BOS", "EOS", "SYSTEM", "USER", "ASSISTANT", "SPECIAL_TOKENS",
]
