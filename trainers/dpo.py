"""Direct Preference Optimization (docs/algorithms.md).

Batches (what `collate_pairs` builds), all right-padded [B, L] int64 tensors:

    chosen_input_ids, chosen_attention_mask, chosen_labels,
    rejected_input_ids, rejected_attention_mask, rejected_labels

Labels sit in the input's own positions (Hugging Face convention) with −100 on the prompt and
on padding, so `logp(y|x)` sums only the completion's tokens. A batch may also carry
`ref_chosen_logps` / `ref_rejected_logps` (fp32 [B]); when present they are used instead of
running the reference model. That is how precomputed reference log-probs reach the loss.

Precomputed reference log-probs: before the first step (`on_train_begin`, or a first `evaluate`), the
reference scores every pair of the training and validation loaders once. A pair is looked up
by `pair_keys`, the sha256 of its unpadded chosen and rejected token ids and labels, so the
lookup does not depend on shuffling, batching or sharding. The table is saved as safetensors
under `ref_cache_dir` in a file named after the reference's weights (plus the autocast setting
it was scored under) and the set of pair keys, so a later run with the same reference and data
loads it instead of scoring again. Under DDP each rank scores its own shard and the ranks
exchange their rows, so every rank can look up any pair (a shuffling DistributedSampler hands
a rank different pairs each epoch).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors import SafetensorError
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .args import Settings
from .base import BaseTrainer
from .logprobs import IGNORE_INDEX, sequence_logps
from .modules import logits_of
from .reference import ReferenceLogps, data_fingerprint, freeze_reference, keys_to_tensor, reference_fingerprint

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
LOSS_TYPES = get_args(DPOLossType)
SIDES = ("chosen", "rejected")


# ---- the loss ----

def check_loss_config(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        # Beyond 0.5 the labels would be believed mostly wrong: swap chosen and rejected instead.
        raise ValueError(f"label_smoothing must be in [0, 0.5] for 'sigmoid', got {label_smoothing}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust' (it divides by 1 − 2ε), "
                         f"got {label_smoothing}")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to 'sigmoid' and 'robust' only, not {loss_type!r}")


class DPOArgs(Settings):
    """DPO's own settings (the loop's are `TrainingArgs`)."""
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    loss_type: DPOLossType = "sigmoid"
    label_smoothing: float = Field(0.0, description="ε: the believed rate of flipped labels (sigmoid, robust)")
    precompute_ref_log_probs: bool = Field(True, description="score the reference once before training")

    @model_validator(mode="after")
    def _consistent(self) -> "DPOArgs":
        check_loss_config(self.beta, self.loss_type, self.label_smoothing)
        return self


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards), one value per pair.

    Inputs are sequence log-probs [B] (sums over completion tokens). With
    Δ = [logp_θ(y_w) − logp_ref(y_w)] − [logp_θ(y_l) − logp_ref(y_l)]:
      sigmoid: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)   (ε = label_smoothing: conservative DPO)
      ipo:     (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²  (Δ_w, Δ_l: each side's log-ratio; the
               lengths are completion token counts; without lengths the log-ratios are used
               unnormalised, i.e. (Δ − 1/(2β))²)
      hinge:   relu(1 − βΔ)
      robust:  [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1−2ε)
    Rewards are β·(logp_θ − logp_ref) per side (unnormalised for every loss type), detached."""
    check_loss_config(beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    eps = label_smoothing

    if loss_type == "ipo":
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("ipo needs both chosen_lengths and rejected_lengths, or neither")
        if chosen_lengths is not None:
            chosen_logratios_per_token = chosen_logratios / chosen_lengths
            rejected_logratios_per_token = rejected_logratios / rejected_lengths
            delta = chosen_logratios_per_token - rejected_logratios_per_token
        else:
            delta = chosen_logratios - rejected_logratios
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        z = beta * (chosen_logratios - rejected_logratios)
        if loss_type == "sigmoid":
            # logsigmoid rather than log(sigmoid(z)): no overflow or log(0) for large |z|.
            losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        elif loss_type == "hinge":
            losses = torch.relu(1.0 - z)
        else:  # robust: an unbiased estimate of the clean loss when labels flip with probability ε
            losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


# ---- batches ----

def _pad_rows(rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate_pairs(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Preference pairs -> a DPO batch (see the module docstring).

    Each item holds `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`,
    `rejected_labels` (lists or 1-D tensors; labels −100 on the prompt). Both sides are padded
    to one common width so the trainer's concatenated forward pass needs no further padding."""
    batch_sides = {}
    for side in SIDES:
        ids = [torch.as_tensor(item[f"{side}_input_ids"], dtype=torch.long) for item in items]
        labels = [torch.as_tensor(item[f"{side}_labels"], dtype=torch.long) for item in items]
        for i, (x, y) in enumerate(zip(ids, labels)):
            if x.shape != y.shape or x.ndim != 1:
                raise ValueError(f"pair {i}: {side}_input_ids {tuple(x.shape)} and {side}_labels "
                                 f"{tuple(y.shape)} must be 1-D and of equal length")
            # Position 0 is never a target (nothing precedes it), so it cannot be the completion.
            if not (y[1:] != IGNORE_INDEX).any():
                raise ValueError(f"pair {i}: the {side} completion has no label token")
        batch_sides[side] = (ids, labels)
    width = max(len(x) for ids, _ in batch_sides.values() for x in ids)
    batch = {}
    for side, (ids, labels) in batch_sides.items():
        batch[f"{side}_input_ids"] = _pad_rows(ids, width, pad_id)
        batch[f"{side}_attention_mask"] = _pad_rows([torch.ones_like(x) for x in ids], width, 0)
        batch[f"{side}_labels"] = _pad_rows(labels, width, IGNORE_INDEX)
    return batch


def concatenated_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows [2B, L], for one forward pass over both.

    Sides of different widths are right-padded to the wider one; the pad value is irrelevant
    there because the mask hides those positions and their label is −100."""
    width = max(batch[f"{side}_input_ids"].shape[1] for side in SIDES)
    out = {}
    for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        halves = [batch[f"{side}_{key}"] for side in SIDES]
        out[key] = torch.cat([F.pad(h, (0, width - h.shape[1]), value=value) for h in halves])
    return out


def concatenated_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    """(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) from one forward pass."""
    inputs = concatenated_inputs(batch)
    logits = logits_of(model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
    logps, lengths = sequence_logps(logits, inputs["labels"])
    n = batch["chosen_input_ids"].shape[0]
    return logps[:n], logps[n:], lengths[:n], lengths[n:]


def pair_keys(batch: dict) -> list[bytes]:
    """sha256 of each pair's unpadded chosen and rejected token ids and labels (CPU batch).

    The labels are part of the key because they decide which tokens are scored."""
    sides = [tuple(batch[f"{side}_{k}"].cpu().numpy() for k in ("input_ids", "labels", "attention_mask"))
             for side in SIDES]
    keys = []
    for i in range(len(batch["chosen_input_ids"])):
        h = hashlib.sha256()
        for ids, labels, mask in sides:
            real = mask[i].astype(bool)
            h.update(int(real.sum()).to_bytes(8, "little"))  # length prefix: no ambiguous joins
            h.update(ids[i][real].astype("int64").tobytes())
            h.update(labels[i][real].astype("int64").tobytes())
        keys.append(h.digest())
    return keys


def check_separate(model: nn.Module, ref_model: nn.Module) -> None:
    policy_params = {id(p) for p in model.parameters()}
    if any(id(p) in policy_params for p in ref_model.parameters()):
        # Freezing the reference would freeze these policy weights too.
        raise ValueError("ref_model shares parameters with the policy; pass a separate copy "
                         "(load the parent checkpoint again, or copy.deepcopy the policy)")


# ---- the trainer ----

class DPOTrainer(BaseTrainer):
    """DPO on preference pairs; one pair is one item of the loss normalisation.

    `ref_model` is frozen, moved to the trainer's device, and kept out of the optimizer and of
    DDP. With `precompute_ref_log_probs` it scores the data once before training (see the
    module docstring) and is then let go, so its memory is freed once nothing else holds it; the
    loaders must be finite, re-iterable and yield the same pairs every epoch. Otherwise it runs
    under no_grad on every batch. `ref_cache_dir` defaults to `save_dir/ref_logps`; with neither
    set the scores stay in memory only.

    `ref_model` may also be a function that loads the reference. With precomputed log-probs
    and `ref_weights_id` (a hash that names its weights, such as the parent checkpoint's
    content hash) it is called only when the cache has no scores for these weights and pairs:
    a resumed or repeated run never loads the reference."""

    def __init__(self, model: nn.Module, ref_model: nn.Module | Callable[[], nn.Module],
                 optimizer: torch.optim.Optimizer, train_loader, val_loader=None, dpo: DPOArgs | None = None, *,
                 ref_cache_dir: str | Path | None = None, ref_weights_id: str | None = None, **kwargs):
        self.dpo = DPOArgs.build(dpo, **DPOArgs.take(kwargs))
        if isinstance(ref_model, nn.Module):
            check_separate(model, ref_model)
        super().__init__(model, optimizer, train_loader, val_loader, **kwargs)
        if ref_cache_dir is None and self.save_dir is not None:
            ref_cache_dir = self.save_dir / "ref_logps"
        self.ref_cache_dir = Path(ref_cache_dir) if ref_cache_dir is not None else None
        # The cache's key for the reference: named by the caller, else a hash of its weights.
        self._ref_fingerprint = (hashlib.sha256(f"{self._scoring()}:{ref_weights_id}".encode()).hexdigest()
                                 if ref_weights_id is not None else None)
        self._ref_source = ref_model  # a module, or a function that loads one; dropped once used
        self.ref_model: nn.Module | None = None
        self.ref_logps: ReferenceLogps | None = None
        if not self.dpo.precompute_ref_log_probs:
            self.reference()

    def reference(self) -> nn.Module:
        """The reference model, loaded (when given as a loader) and frozen on first use."""
        if self.ref_model is None:
            if self._ref_source is None:
                raise RuntimeError("the reference model was let go after its log-probs were precomputed")
            source, self._ref_source = self._ref_source, None  # keep no second pointer to it
            ref = source if isinstance(source, nn.Module) else source()
            if self.sharded and self._ref_fingerprint is None and self.dpo.precompute_ref_log_probs:
                # The cache key hashes the whole weights: before sharding spreads them over ranks.
                self._ref_fingerprint = reference_fingerprint(freeze_reference(ref, device=self.device),
                                                              self._scoring())
            self.ref_model = self.frozen_reference(ref)
        return self.ref_model

    # ---- BaseTrainer hooks ----

    def count_items(self, batch: dict) -> int:
        return batch["chosen_input_ids"].shape[0]

    def count_tokens(self, batch: dict) -> int:
        return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())

    def on_train_begin(self) -> None:
        if self.dpo.precompute_ref_log_probs:
            self.precompute_reference_logps()

    def evaluate(self) -> dict[str, float]:
        self.on_train_begin()  # a no-op once scored: evaluation may come first
        return super().evaluate()

    def to_device(self, batch: dict) -> dict:
        """Attach the precomputed reference log-probs while the batch is still on the CPU, where
        hashing its pairs needs no device synchronisation."""
        if self.ref_logps is not None:
            ref = self.ref_logps.lookup(pair_keys(batch))
            batch = {**batch, "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
        return super().to_device(batch)

    def compute_loss(self, model, batch):
        # Reference first: its no-grad activations are freed before the policy's are kept for backward.
        ref_chosen, ref_rejected = self.reference_logps(batch)
        policy_chosen, policy_rejected, chosen_lengths, rejected_lengths = concatenated_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.dpo.beta, loss_type=self.dpo.loss_type,
            label_smoothing=self.dpo.label_smoothing, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen.detach().sum(),
            "logps/rejected": policy_rejected.detach().sum(),
        }
        return losses.sum(), metrics

    # ---- the reference ----

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's precomputed values when it carries them, else a live no-grad pass."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            chosen, rejected, _, _ = concatenated_logps(self.reference(), batch)
        return chosen, rejected

    def precompute_reference_logps(self) -> ReferenceLogps:
        """Score the training and validation pairs once (or load them from the disk cache).

        Every rank must call it at the same point (it exchanges rows between ranks):
        `on_train_begin` does. Iterating a shuffling loader draws from the global RNG, so the
        RNG is restored afterwards and training sees the order it would have seen without
        this pass."""
        if self.ref_logps is not None:
            return self.ref_logps
        rng = ckpt.rng_state()
        try:
            self.ref_logps = self._load_or_score_reference()
        finally:
            ckpt.set_rng_state(rng)
        # Every pair now carries its reference log-probs: let the model go (its memory is freed
        # unless the caller still holds it).
        self.ref_model = self._ref_source = None
        return self.ref_logps

    def _loaders(self) -> list:
        return [loader for loader in (self.train_loader, self.val_loader) if loader is not None]

    def _load_or_score_reference(self) -> ReferenceLogps:
        if self.ref_cache_dir is None:
            return self._score_reference()
        path, fingerprints = self._cache_file()
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
        table = self._score_reference()
        if self.is_main:
            table.save(path, fingerprints)
        return table

    def _scoring(self) -> str:
        return str(self.amp_dtype) if self.use_amp else "float32"

    def _cache_file(self) -> tuple[Path, dict[str, str]]:
        """The cache file for this reference (weights and autocast dtype) and set of pairs."""
        scoring = self._scoring()
        if self._ref_fingerprint is None:
            model = self.reference()  # under fsdp this hashes the weights before sharding them
            self._ref_fingerprint = self._ref_fingerprint or reference_fingerprint(model, scoring)
        ref = self._ref_fingerprint
        local = [k for loader in self._loaders() for batch in loader for k in pair_keys(batch)]
        data = data_fingerprint(self._gather_keys(local))
        path = self.ref_cache_dir / f"ref-{ref[:16]}-data-{data[:16]}.safetensors"
        return path, {"reference_sha256": ref, "data_sha256": data, "scoring": scoring}

    def _gather_keys(self, keys: list[bytes]) -> list[bytes]:
        gathered = dist_utils.all_gather_rows(keys_to_tensor(keys).to(self.device)).cpu().numpy()
        return [bytes(k) for k in gathered]

    @torch.no_grad()
    def _score_reference(self) -> ReferenceLogps:
        """This rank scores the pairs of its own loaders; the ranks then share their rows."""
        keys, rows = [], []
        for loader in self._loaders():
            for batch in loader:
                keys.extend(pair_keys(batch))
                with self.autocast():
                    chosen, rejected, _, _ = concatenated_logps(self.reference(), super().to_device(batch))
                rows.append(torch.stack([chosen, rejected], dim=1).float())
        logps = torch.cat(rows) if rows else torch.zeros((0, 2), device=self.device)
        return ReferenceLogps.from_rows(self._gather_keys(keys), dist_utils.all_gather_rows(logps).cpu())
