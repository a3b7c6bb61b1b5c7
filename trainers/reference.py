"""The frozen reference model of DPO and GRPO, and the table of reference log-probs that DPO
precomputes once instead of running the reference every step (docs/algorithms.md)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from alignflow.models.files import atomic_write


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


def data_fingerprint(keys: list[bytes]) -> str:
    """sha256 of the set of pair keys: independent of order, batching and sharding."""
    return hashlib.sha256(b"".join(sorted(set(keys)))).hexdigest()


def keys_to_tensor(keys: list[bytes]) -> torch.Tensor:
    """Pair keys as uint8 [N, 32], the form safetensors and collectives carry."""
    return torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 32).copy())


class ReferenceLogps:
    """Reference (chosen, rejected) log-probs by pair key: `keys` uint8 [N, 32], `logps` fp32 [N, 2]."""

    def __init__(self, keys: torch.Tensor, logps: torch.Tensor):
        self.keys, self.logps = keys, logps
        self.index = {bytes(k): i for i, k in enumerate(keys.numpy())}

    @classmethod
    def from_rows(cls, keys: list[bytes], logps: torch.Tensor) -> "ReferenceLogps":
        """De-duplicated (a DistributedSampler repeats pairs to even out shards) and sorted."""
        rows = dict(zip(keys, logps))
        ordered = sorted(rows)
        logps = torch.stack([rows[k] for k in ordered]) if ordered else torch.zeros((0, 2))
        return cls(keys_to_tensor(ordered), logps)

    def lookup(self, keys: list[bytes]) -> torch.Tensor:
        try:
            return self.logps[[self.index[k] for k in keys]]
        except KeyError:
            raise KeyError("a batch holds a pair the reference did not score before training; the "
                           "loaders must yield the same pairs every epoch") from None

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic: a crash mid-write never leaves a file that looks complete.
        atomic_write(path, lambda tmp: save_file({"keys": self.keys, "logps": self.logps}, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> "ReferenceLogps":
        tensors = load_file(str(path))
        return cls(tensors["keys"], tensors["logps"])
