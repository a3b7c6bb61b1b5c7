"""The frozen reference model of DPO and GRPO (design.md §2)."""
from __future__ import annotations

import torch
from torch import nn


def freeze_reference(model: nn.Module, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> nn.Module:
    """Eval mode (no dropout), no gradients, optionally cast (bf16 halves its memory).

    The result is never wrapped in DDP and never given to an optimizer: the trainers keep it
    outside `self.model` and `self.params`."""
    model.eval()
    model.requires_grad_(False)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model
