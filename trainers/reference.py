"""The frozen reference model of DPO and GRPO: frozen in place, seen as the policy without its
adapter (LoRA), and fingerprinted by its weights. Placing it beside the policy is placement.py's;
DPO's precomputed log-probs are trainers/dpo/reference.py's."""
from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor


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


class AdapterDisabled(nn.Module):
    """The reference as the policy with its adapter switched off (peft's `disable_adapter()`): a
    LoRA policy starts as its parent plus a zero update, so without the adapter it *is* the
    parent, and no second copy of the weights is needed.

    It owns no parameters: the policy is kept outside the module tree, so freezing or moving
    this view never touches the policy. Each forward runs the policy in eval mode (no
    dropout, as a frozen reference) and restores its mode afterwards."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        if not hasattr(policy, "disable_adapter"):
            raise TypeError(f"{type(policy).__name__} has no adapter to disable (expected a peft model)")
        self.__dict__["policy"] = policy  # not registered: not a submodule, its parameters not ours

    def forward(self, *args, **kwargs):
        policy, was_training = self.policy, self.policy.training
        policy.eval()
        try:
            with policy.disable_adapter():
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)

    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors this reference computes with: the policy's frozen parameters and buffers."""
        trained = {n for n, p in self.policy.named_parameters(remove_duplicate=False) if p.requires_grad}
        return {n: t for n, t in self.policy.state_dict().items() if n not in trained}


def reference_fingerprint(model: nn.Module, scoring: str) -> str:
    """sha256 of the reference's weights (names, dtypes, shapes, bytes) and of how it is run."""
    h = hashlib.sha256(scoring.encode())
    weights = model.weights() if isinstance(model, AdapterDisabled) else model.state_dict()
    for name, t in sorted(weights.items()):
        if isinstance(t, DTensor):  # a sharded LoRA policy's base: the whole tensor (every rank calls this)
            t = t.full_tensor()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
