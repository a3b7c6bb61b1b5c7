"""Counting the bytes one training step needs, tensor by tensor, where the CPU allocator's peak is
not visible (bench/lora_memory.py, bench/reference_free_memory.py).

weights      every parameter of every model the trainer holds (each storage once)
gradients    the trained parameters' size (they exist during each step)
optimizer    the optimizer's state tensors
activations  what autograd saves for backward during one step, parameters excluded
"""
from __future__ import annotations

import torch
from torch import nn


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def held_models(trainer) -> list[nn.Module]:
    """The models a trainer holds: its attributes, and their attributes, that are modules (a
    frozen reference inside a helper object included), each once, none inside another."""
    found = []
    for value in vars(trainer).values():
        for candidate in (value, *(vars(value).values() if hasattr(value, "__dict__") else ())):
            if isinstance(candidate, nn.Module) and all(candidate is not m for m in found):
                found.append(candidate)
    inner = {id(sub) for m in found for sub in m.modules() if sub is not m}
    return [m for m in found if id(m) not in inner]


def step_bytes(trainer, batch: dict) -> dict:
    """One warm-up step (the optimizer state exists after it), then one counted step."""
    trainer.training_step([batch])
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.training_step([batch])
    models = held_models(trainer)
    params = [p for m in models for p in m.parameters()]
    param_ptrs = {p.data_ptr() for p in params}
    trained = [p for p in params if p.requires_grad]
    optimizer = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    result = {"models": len(models), "weights": nbytes(params), "gradients": nbytes(trained),
              "optimizer": nbytes(optimizer), "activations": nbytes(t for t in kept if t.data_ptr() not in param_ptrs),
              "trained_parameters": sum(p.numel() for p in trained)}
    result["counted"] = sum(result[k] for k in ("weights", "gradients", "optimizer", "activations"))
    return result
