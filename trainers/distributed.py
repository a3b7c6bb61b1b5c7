"""Process-group helpers. `torchrun` tells each process who it is through environment
variables; everything here reads them, so the same script runs alone or under torchrun."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistInfo:
    """What torchrun set, or a single process when it set nothing."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def setup(device: torch.device) -> DistInfo:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA)."""
    info = detect()
    if device.type == "cuda" and device.index is not None:  # a bare "cuda" means the current one
        torch.cuda.set_device(device)  # nccl and DDP use the current device
    # Under torchrun even alone: FSDP shards over a process group of one (its CPU offload).
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if (info.enabled or launched) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def default_device(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def initialized() -> bool:
    """A process group has been joined (torchrun started us, or a caller did it)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place; a no-op in a single process."""
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device | str) -> dict[str, float]:
    """Each named number summed over ranks, all in one collective (fp64), read back by name."""
    names = list(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in names])
    return dict(zip(names, all_reduce_sum(stacked).tolist()))


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(value):
    """Rank 0's `value` on every rank (a string, a number: what pickles safely between our own
    processes); `value` itself in a single process."""
    if not initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if initialized():
        dist.barrier()


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker whose results are written, skipping interpreter teardown.

    Destroying DDP's reducer and the gloo process group at exit sometimes aborts ("terminate
    called without an active exception", pytorch/pytorch#179291) or hangs in a destructor, with
    or without destroy_process_group; after the final barrier nothing is left to clean up."""
    barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (ranks may hold different counts)."""
    if not initialized():
        return t
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])
