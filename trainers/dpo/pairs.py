"""DPO's batches: preference pairs padded side by side, one forward pass over both sides, and
each pair's key for the reference log-prob cache.

A batch (what `collate_pairs` builds) holds right-padded [B, L] int64 tensors:

    chosen_input_ids, chosen_attention_mask, chosen_labels,
    rejected_input_ids, rejected_attention_mask, rejected_labels

Labels sit in the input's own positions (Hugging Face convention) with −100 on the prompt and
on padding, so `logp(y|x)` sums only the completion's tokens. A batch may also carry
`ref_chosen_logps` / `ref_rejected_logps` (fp32 [B]): the reference's log-probs, precomputed
(reference_cache.py), used instead of running the reference model."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ..logprobs import IGNORE_INDEX
from ..scoring import label_sequence_logps

SIDES = ("chosen", "rejected")

def _pad_rows(rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate_pairs(items: list[dict], pad_id: int = 0, sides: tuple[str, str] = SIDES) -> dict[str, torch.Tensor]:
    """Preference pairs -> a DPO batch (see the module docstring).

    Each item holds `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`,
    `rejected_labels` (lists or 1-D tensors; labels −100 on the prompt). Both sides are padded
    to one common width so the trainer's concatenated forward pass needs no further padding.
    `sides` names the two sequences of an item otherwise (KTO's completion and its KL one)."""
    batch_sides = {}
    for side in sides:
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


def concatenated_inputs(batch: dict, sides: tuple[str, str] = SIDES) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows [2B, L], for one forward pass over both.

    Sides of different widths are right-padded to the wider one; the pad value is irrelevant
    there because the mask hides those positions and their label is −100."""
    width = max(batch[f"{side}_input_ids"].shape[1] for side in sides)
    out = {}
    for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        halves = [batch[f"{side}_{key}"] for side in sides]
        out[key] = torch.cat([F.pad(h, (0, width - h.shape[1]), value=value) for h in halves])
    return out


def concatenated_logps(model: nn.Module, batch: dict, sides: tuple[str, str] = SIDES) -> tuple[torch.Tensor, ...]:
    """(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) from one forward pass."""
    inputs = concatenated_inputs(batch, sides)
    logps, lengths = label_sequence_logps(model, inputs["labels"], input_ids=inputs["input_ids"],
                                          attention_mask=inputs["attention_mask"])
    n = batch[f"{sides[0]}_input_ids"].shape[0]
    return logps[:n], logps[n:], lengths[:n], lengths[n:]


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                       policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums every pairwise method logs (the loop divides them by the pair count): its
    rewards per side, how often the chosen one wins, the margin, and the policy's log-probs,
    whose joint fall is likelihood displacement."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": policy_chosen.detach().sum(),
        "logps/rejected": policy_rejected.detach().sum(),
    }


def pair_keys(batch: dict, sides: tuple[str, str] = SIDES) -> list[bytes]:
    """sha256 of each pair's unpadded chosen and rejected token ids and labels (CPU batch).

    The labels are part of the key because they decide which tokens are scored."""
    arrays = [tuple(batch[f"{side}_{k}"].cpu().numpy() for k in ("input_ids", "labels", "attention_mask"))
              for side in sides]
    keys = []
    for i in range(len(batch[f"{sides[0]}_input_ids"])):
        h = hashlib.sha256()
        for ids, labels, mask in arrays:
            real = mask[i].astype(bool)
            h.update(int(real.sum()).to_bytes(8, "little"))  # length prefix: no ambiguous joins
            h.update(ids[i][real].astype("int64").tobytes())
            h.update(labels[i][real].astype("int64").tobytes())
        keys.append(h.digest())
    return keys
