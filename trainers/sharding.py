"""FSDP2 sharding and activation checkpointing for decoder-only models: the built-in Llama and
Hugging Face causal LMs alike, found by their repeated decoder layers (docs/training.md).

`strategy: fsdp` shards each decoder layer, then the root (embeddings, final norm, head), with
`torch.distributed.fsdp.fully_shard`: each rank holds 1/N of every weight, gradient and
optimizer state, and gathers a layer's weights only while that layer runs."""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the classes a Hugging Face model names in `_no_split_modules`
    (the blocks it says must stay whole), else the longest ModuleList of one module class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [ml for ml in model.modules() if isinstance(ml, nn.ModuleList) and len(ml) > 0
             and len({type(m) for m in ml}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__}: found no repeated decoder layers to shard or checkpoint "
                         "(no _no_split_modules, no ModuleList of one layer class)")
    return list(max(lists, key=len))


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them: the
    layer's forward runs under `torch.utils.checkpoint` (non-reentrant, RNG state preserved, so
    dropout draws the same mask twice) whenever gradients are being recorded."""
    for layer in decoder_layers(model):
        layer.forward = functools.partial(_checkpointed, layer.forward)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and generation keep their caches and speed
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def shard(model: nn.Module, precision: str, cpu_offload: bool) -> None:
    """fully_shard each decoder layer, then the root, in place. bf16: layers compute in bf16 and
    gradients are reduced in fp32; cpu_offload: parameters, gradients and optimizer state live
    in CPU memory between uses."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options = {}
    if precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every layer of a sharded model unsharded for the length of the block, with no collective
    in its forwards: generation runs a different number of forwards on each rank (each stops
    when its own sequences end), which FSDP's per-forward all-gathers would deadlock on. Every
    rank must enter it; the full weights are held on each rank meanwhile."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    for m in modules:
        m.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for m in modules:
            m.set_reshard_after_forward(True)
            m.reshard()


def reattach_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module,
                       names: dict[int, str]) -> torch.optim.Optimizer:
    """The same optimizer (class, settings, parameter groups) over the sharded parameters:
    fully_shard replaces every Parameter, so one built before sharding would update nothing.
    `names` maps id(parameter) before sharding to its name."""
    if optimizer.state:
        raise ValueError("strategy fsdp: the optimizer already holds state; give the trainer a fresh one")
    sharded = dict(model.named_parameters())
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [sharded[names[id(p)]] for p in group["params"]]} for group in optimizer.param_groups]
    cls = type(optimizer)
    accepted = inspect.signature(cls).parameters  # defaults may hold more (AdamW: decoupled_weight_decay)
    return cls(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})


def original_class(model: nn.Module) -> type:
    """The model's own class: fully_shard swaps it for a subclass `FSDP<Name>(FSDPModule, Name)`."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        return next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule))
    return cls


def _empty_copy(model: nn.Module) -> nn.Module:
    """A new model of the same structure (on the device in use: meta): the model's own class built
    from its config; for a peft model, its base so, with the same adapter injected."""
    cls = original_class(model)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        base = model.get_base_model()
        adapter = model.active_adapter
        return cls(original_class(base)(base.config), model.peft_config[adapter], adapter_name=adapter)
    return cls(model.config)


def gathered_copy(model: nn.Module, is_main: bool) -> nn.Module | None:
    """An unsharded copy of a sharded model with its full weights, on the CPU of rank 0 (None on
    the others). Every rank must call it: the weights are gathered from all of them.

    The copy is built on the meta device and takes the gathered tensors as they are (no second
    allocation, no random init); buffers that are not in the state dict (rotary frequencies)
    are copied from the sharded model, where FSDP leaves them whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    # A dimension that does not divide by the ranks is padded for sharding, and its gathered tensor
    # is a view of the padded storage, which safetensors refuses to save: give it its own.
    full = {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
            for k, v in full.items()}
    with torch.device("meta"):
        plain = _empty_copy(model)
    plain.load_state_dict(full, assign=True)
    for name, buffer in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        module = plain.get_submodule(owner)
        persistent = attr not in module._non_persistent_buffers_set
        module.register_buffer(attr, buffer.detach().to("cpu", copy=True), persistent=persistent)
    if hasattr(plain, "tie_weights"):  # assign=True gave tied names separate tensors
        plain.tie_weights()
    return plain.train(model.training)
