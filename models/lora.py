"""LoRA adapters through peft, on the built-in model and on transformers models alike.

A LoRA stage trains low-rank matrices beside frozen weights: `add_adapter` wraps the parent in a
peft model whose only trainable parameters are the adapter's (plus `modules_to_save` copies).
peft injects the adapter into the parent's own layers, so the wrapped model still maps
input_ids to logits, and `disable_adapter()` turns it back into the parent for a forward pass:
that is DPO's and GRPO's reference, with no second copy of the weights (docs/training.md).

The stage hands on a plain model, never the adapter: `adapter_state` copies the adapter out
(peft's own file layout, for users who want it alone), then `merge` folds W + (alpha/r)·B·A into
the base weights and unwraps them. QLoRA (the base loaded in 4-bit NF4, models.hf_io) merges
into the parent loaded again unquantized (`with_adapter`). `AdapterPolicy` is a stage's whole
answer to "what trains, and what is handed on": every weight, LoRA or QLoRA, per its `lora`
section (`LoRAConfig`)."""
from __future__ import annotations

import os
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from .files import atomic_write

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRAConfig(BaseModel):
    """A LoRA adapter (peft) trained on the frozen parent instead of every weight. The stage's
    output is the merged model (plus adapter/); DPO's and GRPO's reference is the policy with
    its adapter switched off."""
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default

    r: int = Field(16, ge=1, description="rank of the update B·A")
    alpha: float = Field(32.0, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(
        None, description="module names to adapt (e.g. [q_proj, v_proj]); default: every linear layer but the head")
    modules_to_save: list[str] | None = Field(None, description="modules trained in full beside the adapter "
                                                                 "(e.g. [lm_head])")
    quantize: Literal["none", "4bit"] = Field("none", description="4bit: QLoRA, the frozen base's linear layers "
                                                                  "in 4-bit NF4 (bitsandbytes; transformers models)")


class AdapterPolicy:
    """What a stage trains of its model and what it hands on, from its `lora` section: None is
    full fine-tuning; a LoRAConfig trains an adapter on the frozen parent (QLoRA: on its linear
    layers loaded in 4 bits) and hands on the parent with the adapter merged."""

    def __init__(self, lora: LoRAConfig | None):
        self.lora = lora

    @property
    def quantize(self) -> str | None:
        """How the parent is loaded to train on: "4bit" for QLoRA, else as it is (None)."""
        return self.lora.quantize if self.lora is not None and self.lora.quantize != "none" else None

    def attach(self, model: nn.Module, seed: int, base: str | None, head: str | None = None) -> nn.Module:
        """The model to train: `model` itself, or `model` with a fresh adapter (see add_adapter).
        `head`: a new output layer (a reward model's `score`), trained in full beside the adapter
        and never adapted itself: its random weights are what must learn."""
        if self.lora is None:
            return model
        c = self.lora
        targets = c.target_modules or [name for name in linear_targets(model) if name != head]
        in_full = [*(c.modules_to_save or []), *([head] if head and head not in (c.modules_to_save or []) else [])]
        return add_adapter(model, r=c.r, alpha=c.alpha, dropout=c.dropout, target_modules=targets,
                           modules_to_save=in_full or None, seed=seed, base=base)

    def hand_off(self, model: nn.Module, load_parent: Callable[[], nn.Module]
                 ) -> tuple[nn.Module, tuple[dict, object] | None]:
        """(the plain model to save, the adapter's state or None): the adapter merged into the
        weights; under QLoRA into the parent's own weights (`load_parent()`, unquantized), not
        their 4-bit rounding."""
        if not is_adapted(model):
            return model, None
        adapter = adapter_state(model)
        if self.quantize:
            model = with_adapter(load_parent(), *adapter)
        return merge(model), adapter

    def describe(self, model: nn.Module) -> str:
        """`, LoRA r=16 alpha=32: 0.12M trained` for the stage's start line ("" in full)."""
        if self.lora is None:
            return ""
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kind = "QLoRA (4-bit base)" if self.quantize else "LoRA"
        return f", {kind} r={self.lora.r} alpha={self.lora.alpha:g}: {trained / 1e6:.2f}M trained"


def linear_targets(model: nn.Module) -> list[str]:
    """Names (last component) of every linear layer but the output head: the attention and MLP
    projections, what peft calls "all-linear". The head stays frozen: its vocabulary-sized
    adapter would cost more than it brings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not head and name}
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers for LoRA to adapt")
    return sorted(names)


def add_adapter(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | None = None,
                modules_to_save: list[str] | None = None, seed: int = 0, base: str | None = None) -> nn.Module:
    """`model` with a fresh LoRA adapter, its base weights frozen. A is drawn from `seed` (its own
    generator state, so the draw does not depend on what ran before in this process), B is zero:
    at step 0 the adapted model equals the parent exactly. `base`: where the parent lives,
    recorded in the adapter's config."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: norms and embeddings to fp32, all frozen
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = target_modules or linear_targets(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        modules_to_save=modules_to_save, base_model_name_or_path=base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as e:  # peft names the module it could not match
            raise ValueError(f"lora.target_modules {targets}: {e}") from e


def is_adapted(model: nn.Module) -> bool:
    """A peft model: it can merge its adapter and switch it off."""
    return hasattr(model, "merge_and_unload") and hasattr(model, "disable_adapter")


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], object]:
    """(the adapter's tensors under peft's saved names, on the CPU; its peft config): what peft's
    save_pretrained writes, copied before `merge` folds the adapter away."""
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return state, model.peft_config[model.active_adapter]


def save_adapter(directory: str, state: dict[str, torch.Tensor], config) -> None:
    """adapter_config.json + adapter_model.safetensors, as peft writes them (loadable with
    `PeftModel.from_pretrained(parent_model, directory)`)."""
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, ADAPTER_WEIGHTS), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config.save_pretrained(directory)  # peft's own JSON (adds peft_version)


def with_adapter(model: nn.Module, state: dict[str, torch.Tensor], config) -> nn.Module:
    """`model` (the parent, unquantized) carrying the adapter `adapter_state` copied out: how a
    QLoRA stage gets a model to merge, since folding B·A into 4-bit weights would round it away."""
    from peft import get_peft_model, set_peft_model_state_dict

    adapted = get_peft_model(model, config)
    result = set_peft_model_state_dict(adapted, state)
    if result.unexpected_keys:
        raise ValueError(f"the adapter does not fit the parent: {result.unexpected_keys[:3]}")
    return adapted


def merge(model: nn.Module) -> nn.Module:
    """The parent's own model class with W + (alpha/r)·B·A in every adapted layer (and the trained
    copies of `modules_to_save`), the adapter gone. Changes `model` in place."""
    return model.merge_and_unload()


def base_of(model: nn.Module) -> nn.Module:
    """The model peft wrapped (its layers carry the adapter), or `model` itself."""
    return model.get_base_model() if is_adapted(model) else model


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `merge(model)` would have (W + (alpha/r)·B·A in every adapted layer, the
    trained copy of each of `modules_to_save`, peft's names gone) without changing `model`: the
    weights an inference engine serves while the adapter trains. For a model without an adapter,
    its own tensors. Read through the modules, not `state_dict()`, so inside
    `trainers.sharding.gathered` it holds the full weights of a sharded model. Tied tensors (the
    embedding and the head) appear under each name, as in `state_dict()`."""
    model = base_of(model)
    deltas = {f"{_plain_name(prefix)}.weight": delta for prefix, module in model.named_modules()
              if (delta := _lora_delta(module)) is not None}
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if _peft_internal(prefix):
            continue
        tensors = [*module.named_parameters(recurse=False, remove_duplicate=False),
                   *((n, b) for n, b in module.named_buffers(recurse=False, remove_duplicate=False)
                     if n not in module._non_persistent_buffers_set)]
        for name, tensor in tensors:
            key = _plain_name(f"{prefix}.{name}" if prefix else name)
            value = tensor.detach()
            out[key] = value + deltas[key].to(value.dtype) if key in deltas else value
    return out


def _peft_internal(prefix: str) -> bool:
    """Modules whose tensors are not the merged model's: the adapter's own and the frozen originals
    that `modules_to_save` copies replace."""
    parts = prefix.split(".")
    return any(p.startswith("lora_") or p == "original_module" for p in parts)


def _plain_name(name: str) -> str:
    """peft's name of a tensor -> the merged model's: `x.base_layer.weight` and
    `x.modules_to_save.default.weight` are `x.weight`."""
    parts = name.split(".")
    plain, i = [], 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
        elif parts[i] == "modules_to_save":
            i += 2  # and the adapter's name
        else:
            plain.append(parts[i])
            i += 1
    return ".".join(plain)


def _lora_delta(module: nn.Module) -> torch.Tensor | None:
    """(alpha/r)·B·A of a LoRA layer's active adapters (peft's own formula); None for any other
    module."""
    from peft.tuners.lora import LoraLayer

    base = getattr(module, "base_layer", None)
    if not isinstance(module, LoraLayer) or base is None or isinstance(base, LoraLayer):
        return None
    deltas = [module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A]
    return sum(deltas) if deltas else None
