"""Optimizers with the usual two parameter groups, and the learning-rate schedules.

Weight decay pulls weights toward zero. That is a useful prior for matrices, but for biases,
norm gains and other 1-D parameters it only fights the scale the network needs, so they go
into a group with `weight_decay=0` (the GPT-2/nanoGPT/HF convention)."""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _norm_param_ids(model: nn.Module) -> set[int]:
    """Parameters owned by normalisation layers, including ones we do not know by type
    (RMSNorm classes are usually hand-written), found by class name."""
    ids = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower():
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def get_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decay group, no-decay group]; parameters shared between modules appear once."""
    norm_ids = _norm_param_ids(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or id(p) in norm_ids:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fast_path_kwargs(cls: type, params: list[torch.Tensor]) -> dict:
    """fused kernels when every parameter is on a device that has them, else foreach."""
    accepted = inspect.signature(cls).parameters
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if on_cuda and "fused" in accepted:
        return {"fused": True}
    if "foreach" in accepted:
        return {"foreach": True}
    return {}


def configure_optimizer(
    model: nn.Module,
    optimizer_type: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.9,
    nesterov: bool = False,
    fast_path: bool = True,
) -> torch.optim.Optimizer:
    """Build AdamW/Adam/SGD over the decay and no-decay groups of `model`.

    `fast_path` picks fused (CUDA) or foreach kernels; turn it off to get the plain
    per-parameter loop when comparing against a reference implementation."""
    groups = get_parameter_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    kind = optimizer_type.lower()
    if kind == "adamw":
        cls, kwargs = torch.optim.AdamW, {"betas": tuple(betas), "eps": eps}
    elif kind == "adam":
        # Adam's weight decay is L2 added to the gradient, not decoupled; kept for parity
        # with older recipes that asked for it.
        cls, kwargs = torch.optim.Adam, {"betas": tuple(betas), "eps": eps}
    elif kind == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": momentum, "nesterov": nesterov}
    else:
        raise ValueError(f"optimizer_type must be 'adamw', 'adam' or 'sgd', got {optimizer_type!r}")
    if fast_path:
        kwargs.update(_fast_path_kwargs(cls, params))
    return cls(groups, lr=lr, **kwargs)


# --- learning-rate schedules: multipliers of the base LR, one call per optimizer step ---

def _with_warmup(warmup_steps: int, after: Callable[[int], float]) -> Callable[[int], float]:
    """Linear warmup to the peak over `warmup_steps`, then `after(step)`."""
    return lambda step: (step + 1) / warmup_steps if step < warmup_steps else after(step)


def _progress(step: int, start: int, end: int) -> float:
    """How far `step` is from `start` to `end`, 0 to 1 (held at 1 past the end)."""
    return min(1.0, (step - start) / max(1, end - start))


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    def after(step: int) -> float:
        progress = _progress(step, warmup_steps, total_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return _with_warmup(warmup_steps, after)


def linear_with_warmup(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    return _with_warmup(warmup_steps, lambda step: 1 - (1 - min_lr_ratio) * _progress(step, warmup_steps, total_steps))


def constant_with_warmup(warmup_steps: int, total_steps: int = 0, min_lr_ratio: float = 1.0) -> Callable[[int], float]:
    return _with_warmup(warmup_steps, lambda step: 1.0)


def warmup_stable_decay(
    warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0, decay_fraction: float = 0.2
) -> Callable[[int], float]:
    """WSD: warm up, hold the peak, then decay linearly over the last `decay_fraction`."""
    decay_steps = max(1, int(round(total_steps * decay_fraction)))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    return _with_warmup(warmup_steps, lambda step: 1.0 if step < decay_start else
                        1 - (1 - min_lr_ratio) * _progress(step, decay_start, total_steps))


SCHEDULES = {
    "cosine": cosine_with_warmup,
    "linear": linear_with_warmup,
    "constant": constant_with_warmup,
    "wsd": warmup_stable_decay,
}


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr_ratio: float = 0.1,
    **kwargs,
) -> LambdaLR:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return LambdaLR(optimizer, SCHEDULES[name](warmup_steps, total_steps, min_lr_ratio, **kwargs))
