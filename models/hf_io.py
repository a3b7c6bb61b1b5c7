"""Models on disk in the Hugging Face layout: the built-in model (config.json + model.safetensors,
loadable by transformers' LlamaForCausalLM too), any transformers causal LM, and reward models
(transformers' `...ForSequenceClassification` with one label)."""

import json
import os
import sys

import torch
from safetensors.torch import load_file
from safetensors.torch import save_model as save_safetensors

from .config import ModelConfig
from .dtypes import DTYPES
from .files import atomic_write, write_json_atomic
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
        os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_safetensors(model, tmp, metadata={"format": "pt"})
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


# ---- any causal LM: the built-in one, or one of transformers' (AutoModelForCausalLM) ----

GENERATION_CONFIG_NAME = "generation_config.json"
# How a directory's model is loaded (its manifest says): the built-in class, transformers'
# AutoModelForCausalLM, or AutoModelForSequenceClassification (a reward model: one scalar per sequence).
BUILTIN, TRANSFORMERS, REWARD = "builtin", "transformers", "reward"


def is_reward_model(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def model_kind(model: torch.nn.Module) -> str:
    return BUILTIN if isinstance(model, LlamaForCausalLM) else REWARD if is_reward_model(model) else TRANSFORMERS


def _bars_only_on_a_terminal() -> None:
    """transformers' "Loading weights"/"Writing model shards" bars are noise in a log file or
    Prefect's logs."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def needs_remote_code(directory: str, file: str = CONFIG_NAME) -> bool:
    """The model's (or, with file=tokenizer_config.json, the tokenizer's) class is code shipped
    in the directory (`auto_map`): transformers would run it with trust_remote_code."""
    try:
        with open(os.path.join(directory, file)) as f:
            return "auto_map" in json.load(f)
    except (OSError, ValueError):
        return False


def trusted_directory(directory: str, trust_remote_code: bool) -> str:
    """`directory`, absolute, refused when its model is code from its repository not trusted."""
    directory = os.path.abspath(directory)
    if needs_remote_code(directory) and not trust_remote_code:
        raise ValueError(f"the model in {directory} needs code from its repository (auto_map in config.json); "
                         "set hf.trust_remote_code: true if you trust it")
    return directory


def load_model(directory: str, kind: str = TRANSFORMERS, device: str | torch.device = "cpu", dtype: str = "float32",
               attn_implementation: str = "sdpa", trust_remote_code: bool = False,
               quantize: str | None = None, as_reward_model: bool = False) -> torch.nn.Module:
    """The model saved in `directory`: the built-in class, or transformers' AutoModelForCausalLM with
    weights in `dtype` and the given attention kernel ('sdpa', 'eager', 'flash_attention_2').
    quantize="4bit": its linear layers in 4-bit NF4 (bitsandbytes, double quantization; they
    compute in `dtype`), as QLoRA trains on a frozen base. A reward model (kind "reward") loads
    with AutoModelForSequenceClassification; `as_reward_model` loads a causal LM (the built-in
    one too: its files are Llama's) as one, its head replaced by a new scalar `score` drawn from
    the torch RNG (seed it first)."""
    if as_reward_model or kind == REWARD:
        return load_reward_model(directory, device, dtype, attn_implementation, trust_remote_code, quantize)
    if kind == BUILTIN:
        if quantize:
            raise ValueError(f"{directory} holds the built-in model: 4-bit quantization (QLoRA) applies to "
                             "transformers models only")
        return load_pretrained(directory, device=device, dtype=DTYPES[dtype] if dtype != "float32" else None)
    directory = trusted_directory(directory, trust_remote_code)
    from transformers import AutoModelForCausalLM

    _bars_only_on_a_terminal()
    placement = {"quantization_config": four_bit(DTYPES[dtype]), "device_map": {"": str(device)}} if quantize else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype],
                                                     attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code, use_safetensors=True,
                                                     **placement)
    except Exception as e:  # transformers raises many types; the user needs the directory
        raise ValueError(f"cannot load a causal LM from {directory}: {e}") from e
    return ready_to_train(model, device, quantize)


def ready_to_train(model: torch.nn.Module, device: str | torch.device, quantize: str | None) -> torch.nn.Module:
    # Training forwards must not fill a KV cache nobody reads (fp32 under autocast, copied per
    # layer: 3-7% of a step, bench/hf_vs_builtin.py); generation asks for one explicitly.
    model.config.use_cache = False
    if quantize and torch.device(device).type == "cpu":
        keep_4bit_weights_differentiable(model)
    return model if quantize else model.to(device)  # a quantized model is placed as it loads


def is_reward_directory(directory: str) -> bool:
    """Its config.json names a sequence-classification class (a reward model's)."""
    try:
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            classes = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(c.endswith("ForSequenceClassification") for c in classes)


def load_reward_model(directory: str, device: str | torch.device = "cpu", dtype: str = "float32",
                      attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                      quantize: str | None = None) -> torch.nn.Module:
    """A scalar reward model from `directory`: a reward model's own, or a causal LM's body under a
    new one-label head (num_labels=1: one score per sequence, read at its last token)."""
    directory = trusted_directory(directory, trust_remote_code)
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    _bars_only_on_a_terminal()
    placement = {"quantization_config": four_bit(DTYPES[dtype]), "device_map": {"": str(device)}} if quantize else {}
    verbosity = hf_logging.get_verbosity()
    if not is_reward_directory(directory):  # its load report, "score.weight MISSING", is the point here
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=1, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, use_safetensors=True, **placement)
    except Exception as e:  # transformers raises many types; the user needs the directory
        raise ValueError(f"cannot load a sequence-classification (reward) model from {directory}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return ready_to_train(model, device, quantize)


def keep_4bit_weights_differentiable(model: torch.nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights in place the first
    time it runs in eval mode without gradients (a reference pass, an evaluation), and from then on
    multiplies through a kernel autograd cannot differentiate: every later training step would
    silently lose the gradient through the frozen layers. Turn that repacking off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def four_bit(compute_dtype: torch.dtype):
    """transformers' settings for QLoRA's frozen base: NF4 weights, double quantization."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("lora.quantize: 4bit needs bitsandbytes: pip install 'alignflow[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def fit_vocabulary(model: torch.nn.Module, tokenizer, added: int = 0, source: str = "the model") -> None:
    """Grow the embeddings by the `added` tokens alignflow itself gave the tokenizer (the padding
    token of `ensure_pad_token`), and record the padding id where a config keeps it. A tokenizer
    with more tokens of its own than the model has rows is refused: those ids (often BOS and EOS)
    would get untrained rows and train silently on them. More rows than tokens is fine (Qwen
    rounds its embedding up). `source`: the directory, for the message."""
    rows = model.get_input_embeddings().num_embeddings if model_kind(model) != BUILTIN else None
    if rows is not None and len(tokenizer) - added > rows:
        own = len(tokenizer) - added
        beyond = sorted(i for i in set(tokenizer.all_special_ids) if rows <= i < own)
        named = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} {i}" for i in beyond[:5]) + (
            ", ..." if len(beyond) > 5 else "")
        raise ValueError(f"{source}: the model has {rows} embedding rows (vocab_size {rows}) but its tokenizer has "
                         f"{own} tokens, so ids {rows}-{own - 1}{f' ({named})' if named else ''} have no embedding; "
                         "the tokenizer files do not belong to this model: use the tokenizer it was trained with")
    if rows is not None and len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # The new rows start at the mean of the others, not at random: a policy and its
        # reference (loaded separately), or a run and its resumption, must start identical.
        with torch.no_grad():
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
                if embedding is not None:
                    embedding.weight[rows:] = embedding.weight[:rows].mean(0)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "pad_token_id"):
            config.pad_token_id = tokenizer.pad_token_id


def save_model(model: torch.nn.Module, directory: str, max_shard_size: str = "5GB") -> None:
    """Weights (safetensors; shards with model.safetensors.index.json above `max_shard_size` for
    transformers models), config.json and generation_config.json, in Hugging Face's layout."""
    if model_kind(model) == BUILTIN:
        save_pretrained(model, directory)
        c = model.config
        ids = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
        ids = {k: v for k, v in ids.items() if v is not None}
        write_json_atomic(os.path.join(directory, GENERATION_CONFIG_NAME), ids)
        return
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"expected a transformers model (unwrap compile/DDP first), got {type(model).__name__}")
    _bars_only_on_a_terminal()
    training_setting, model.config.use_cache = model.config.use_cache, True  # as inference expects it
    try:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    finally:
        model.config.use_cache = training_setting
