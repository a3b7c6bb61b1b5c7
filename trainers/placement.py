"""Where the trainer's models run: the policy on its device, replicated by DDP or sharded by
FSDP2 (docs/training.md), compiled when asked; a frozen reference beside it, sharded like the
policy and never given to DDP or an optimizer."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as dist_utils
from . import sharding
from .args import TrainingArgs
from .reference import AdapterDisabled, freeze_reference


def place_policy(model: nn.Module, optimizer: torch.optim.Optimizer, args: TrainingArgs, device: torch.device,
                 scheduler=None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model as the loop drives it (DDP- or FSDP-wrapped, compiled) and the optimizer over its
    parameters: under fsdp a new one of the same kind, since sharding replaces every parameter."""
    model.to(device)
    if args.activation_checkpointing:
        sharding.checkpoint_activations(model)
    if args.needs_process_group and not dist_utils.initialized():
        raise ValueError("strategy fsdp needs a process group: launch with torchrun (--nproc_per_node 1 "
                         "for one process)")
    if args.strategy == "fsdp":
        if scheduler is not None:
            raise ValueError("strategy fsdp replaces the model's parameters, so a scheduler built on them "
                             "would drive a stale optimizer: set args.schedule and let the trainer build it")
        names = {id(p): n for n, p in model.named_parameters()}
        sharding.shard(model, args.precision, args.fsdp_cpu_offload)
        optimizer = sharding.reattach_optimizer(optimizer, model, names)
    elif dist_utils.detect().enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:  # True: the default inductor backend; a string names another backend
        model = torch.compile(model) if args.compile is True else torch.compile(model, backend=args.compile)
    return model, optimizer


def place_reference(ref_model: nn.Module, args: TrainingArgs, device: torch.device) -> nn.Module:
    """A reference model for DPO or GRPO: frozen, on the trainer's device, and under fsdp sharded
    like the policy (forward passes only). The policy seen without its adapter is already all
    of that."""
    if isinstance(ref_model, AdapterDisabled):
        return ref_model
    ref = freeze_reference(ref_model, device=device)
    if args.strategy == "fsdp":
        sharding.shard(ref, args.precision, args.fsdp_cpu_offload)
    return ref
