"""Save/load in the Hugging Face layout: config.json + model.safetensors."""

import json
import os

import torch
from safetensors.torch import load_file, save_model

from .config import ModelConfig
from .files import atomic_write
from .llama import LlamaForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model: LlamaForCausalLM, directory: str) -> list[str]:
    # A torch.compile/DDP wrapper would prefix every key and HF could no longer load it.
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(
            f"expected a bare LlamaForCausalLM (unwrap compile/DDP first), got {type(model).__name__}"
        )
    os.makedirs(directory, exist_ok=True)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)

    # Weights first, so a config.json on disk always sits next to complete weights.
    weights = atomic_write(
        os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_model(model, tmp, metadata={"format": "pt"})
    )
    return [weights, atomic_write(os.path.join(directory, CONFIG_NAME), write_config)]


def load_config(directory: str) -> ModelConfig:
    path = os.path.abspath(os.path.join(directory, CONFIG_NAME))
    try:
        with open(path) as f:
            return ModelConfig.from_hf_dict(json.load(f))
    except Exception as e:
        raise ValueError(f"cannot load model config {path}: {e}") from e


def load_pretrained(
    directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LlamaForCausalLM:
    config = load_config(directory)
    path = os.path.abspath(os.path.join(directory, WEIGHTS_NAME))
    # Build on the meta device and adopt the loaded tensors: no wasted random init.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    try:
        state = load_file(path, device=str(device))
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as e:
        raise ValueError(f"cannot load model weights {path}: {e}") from e
    return model.to(dtype=dtype) if dtype is not None else model
