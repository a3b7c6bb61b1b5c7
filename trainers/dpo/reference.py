"""DPO's frozen reference as one object: the model (or a function that loads it) and the table of
its log-probs for every pair, scored once before training and kept on disk.

Precomputed (the default), the reference scores every pair of the training and validation
loaders once, before the first step. A pair is looked up by `pair_keys`, the sha256 of its
unpadded chosen and rejected token ids and labels, so the lookup does not depend on shuffling,
batching or sharding. The table is saved as safetensors under `cache_dir`, in a file named after
the reference's weights (plus the autocast dtype it was scored under) and the set of pair keys,
so a later run with the same reference and data loads it instead of scoring again; when the
caller names the weights (`weights_id`, e.g. the parent checkpoint's content hash) such a run
never even loads the reference. Under DDP each rank scores its own shard and the ranks exchange
their rows, so every rank can look up any pair (a shuffling DistributedSampler hands a rank
different pairs each epoch). Once every pair is scored the model is let go, and its memory is
freed unless the caller still holds it.

Not precomputed, the reference runs under no_grad on every batch."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from alignflow.models.files import atomic_write

from .. import checkpoint as ckpt
from .. import distributed as dist_utils
from ..progress import Progress
from ..reference import freeze_reference, reference_fingerprint
from .pairs import SIDES, concatenated_logps, pair_keys


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


def data_fingerprint(keys: list[bytes]) -> str:
    """sha256 of the set of pair keys: independent of order, batching and sharding."""
    return hashlib.sha256(b"".join(sorted(set(keys)))).hexdigest()


class DPOReference:
    """`source`: the reference model, or a function that loads it (called only when needed).
    `place(model)` freezes it on the trainer's device (sharded like the policy under fsdp);
    `scoring` names the autocast dtype it is run under, part of the cache's key. `sides` names
    the two sequences of a batch item it scores (DPO's chosen and rejected; KTO's completion and
    its mismatched KL one)."""

    def __init__(self, source: nn.Module | Callable[[], nn.Module], *, place: Callable[[nn.Module], nn.Module],
                 device: torch.device, scoring: str, cache_dir: Path | None, weights_id: str | None,
                 sharded: bool = False, sides: tuple[str, str] = SIDES):
        self._source, self._place, self.sides = source, place, sides
        self.device, self.scoring, self.cache_dir, self.sharded = device, scoring, cache_dir, sharded
        # The cache's key for the reference: named by the caller, else (when first needed) a hash
        # of its weights.
        self.fingerprint = (hashlib.sha256(f"{scoring}:{weights_id}".encode()).hexdigest()
                            if weights_id is not None else None)
        self.loaded: nn.Module | None = None  # the placed model, while it is held
        self.table: ReferenceLogps | None = None  # every pair's log-probs, once precomputed

    def model(self) -> nn.Module:
        """The reference, loaded (when given as a loader) and placed on first use."""
        if self.loaded is None:
            if self._source is None:
                raise RuntimeError("the reference model was let go after its log-probs were precomputed")
            source, self._source = self._source, None  # keep no second pointer to it
            ref = source if isinstance(source, nn.Module) else source()
            if self.sharded and self.fingerprint is None and self.cache_dir is not None:
                # The cache key hashes the whole weights: before sharding spreads them over ranks.
                self.fingerprint = reference_fingerprint(freeze_reference(ref, device=self.device), self.scoring)
            self.loaded = self._place(ref)
        return self.loaded

    def attach(self, batch: dict) -> dict:
        """The CPU batch (hashing its pairs needs no device synchronisation there) with its
        precomputed log-probs, once there are any."""
        if self.table is None:
            return batch
        ref = self.table.lookup(pair_keys(batch, self.sides))
        first, second = self.sides
        return {**batch, f"ref_{first}_logps": ref[:, 0], f"ref_{second}_logps": ref[:, 1]}

    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The two sides' reference log-probs (DPO: chosen, rejected): the batch's precomputed
        ones, else a no-grad pass."""
        first, second = self.sides
        if f"ref_{first}_logps" in batch:
            return batch[f"ref_{first}_logps"], batch[f"ref_{second}_logps"]
        with torch.no_grad():
            chosen, rejected, _, _ = concatenated_logps(self.model(), batch, self.sides)
        return chosen, rejected

    def precompute(self, loaders: list, autocast: Callable, to_device: Callable[[dict], dict]) -> ReferenceLogps:
        """Score every pair of `loaders` once (or load the scores from the disk cache), then let the
        model go. Every rank must call it at the same point: it exchanges rows between ranks.
        Iterating a shuffling loader draws from the global RNG, so the RNG is restored afterwards
        and training sees the order it would have seen without this pass."""
        if self.table is not None:
            return self.table
        rng = ckpt.rng_state()
        try:
            self.table = self._load_or_score(loaders, autocast, to_device)
        finally:
            ckpt.set_rng_state(rng)
        self.loaded = self._source = None
        return self.table

    def _load_or_score(self, loaders, autocast, to_device) -> ReferenceLogps:
        if self.cache_dir is None:
            return self._score(loaders, autocast, to_device)
        path, fingerprints = self._cache_file(loaders)
        cached = None
        if path.exists():
            try:
                cached = ReferenceLogps.load(path)
            except (SafetensorError, OSError, KeyError) as e:
                warnings.warn(f"ignoring unreadable reference log-prob cache {path}: {e}")
        # Every rank must take the same branch (scoring exchanges rows), so one rank that
        # cannot read the file makes all of them score.
        misses = dist_utils.all_reduce_sum(torch.tensor([float(cached is None)], device=self.device))
        if misses.item() == 0:
            return cached
        table = self._score(loaders, autocast, to_device)
        if dist_utils.detect().is_main:
            table.save(path, fingerprints)
        return table

    def _cache_file(self, loaders) -> tuple[Path, dict[str, str]]:
        """The cache file for this reference (weights and autocast dtype) and set of pairs."""
        if self.fingerprint is None:
            model = self.model()  # under fsdp this hashes the weights before sharding them
            self.fingerprint = self.fingerprint or reference_fingerprint(model, self.scoring)
        local = [k for loader in loaders for batch in loader for k in pair_keys(batch, self.sides)]
        data = data_fingerprint(self._gather_keys(local))
        path = self.cache_dir / f"ref-{self.fingerprint[:16]}-data-{data[:16]}.safetensors"
        return path, {"reference_sha256": self.fingerprint, "data_sha256": data, "scoring": self.scoring}

    def _gather_keys(self, keys: list[bytes]) -> list[bytes]:
        gathered = dist_utils.all_gather_rows(keys_to_tensor(keys).to(self.device)).cpu().numpy()
        return [bytes(k) for k in gathered]

    @torch.no_grad()
    def _score(self, loaders, autocast, to_device) -> ReferenceLogps:
        """This rank scores the pairs of its own loaders; the ranks then share their rows."""
        keys, rows = [], []
        # One pass over every training pair: minutes on a big file (trainers.progress).
        scored = Progress("reference log-probs", total=sum(len(loader) for loader in loaders), unit="batches",
                          quiet=not dist_utils.detect().is_main)
        for loader in loaders:
            for batch in scored.over(loader):
                keys.extend(pair_keys(batch, self.sides))
                with autocast():
                    chosen, rejected, _, _ = concatenated_logps(self.model(), to_device(batch), self.sides)
                rows.append(torch.stack([chosen, rejected], dim=1).float())
        logps = torch.cat(rows) if rows else torch.zeros((0, 2), device=self.device)
        return ReferenceLogps.from_rows(self._gather_keys(keys), dist_utils.all_gather_rows(logps).cpu())
