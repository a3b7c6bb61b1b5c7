"""What the trainers need to know about a model: where its logits are, and the user's module
inside the wrappers (torch.compile, DDP) the trainer puts around it."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def logits_of(output: Any) -> torch.Tensor:
    """Models return logits directly or an object carrying `.logits` (Hugging Face)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model
