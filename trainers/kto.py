"""KTO: alignment from unpaired feedback (a completion marked desirable or not), against a frozen
reference (Ethayarajh et al. 2024; docs/algorithms.md).

For a completion y of prompt x with log-ratio Δ = logp_θ(y|x) − logp_ref(y|x) and the reference
point z₀, an estimate of KL(π_θ ‖ π_ref) taken from mismatched pairs (x, y'), as TRL does:

    z₀ = max(0, mean over the micro-batch's items on every rank of [logp_θ(y'|x) − logp_ref(y'|x)]),
         detached (it sets the point rewards are measured from; no gradient flows through it)
    desirable:   w_d · (1 − σ(β·(Δ − z₀)))
    undesirable: w_u · (1 − σ(β·(z₀ − Δ)))

Each batch item carries two sequences: the completion itself and a KL one, its prompt with the
completion of another row (stages/formats.py fixes the partner when the data is read, so the
reference can score both once before training, like DPO's pairs: `ReferenceTrainer`). The KL
sequence is run through the policy under no_grad."""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field
from torch import nn

from . import distributed as dist_utils
from .args import Settings
from .dpo.pairs import collate_pairs
from .dpo.trainer import ReferenceTrainer
from .scoring import label_sequence_logps

SIDES = ("completion", "kl")


class KTOArgs(Settings):
    """KTO's own settings (the loop's are `TrainingArgs`); defaults are the paper's and TRL's."""
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    desirable_weight: float = Field(1.0, gt=0, description="w_d: weight of a desirable completion's loss")
    undesirable_weight: float = Field(1.0, gt=0, description="w_u: weight of an undesirable completion's loss")
    precompute_ref_log_probs: bool = Field(True, description="score the reference once before training")


def collate_feedback(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Items of `completion_input_ids`/`completion_labels`, `kl_input_ids`/`kl_labels` and a
    bool `label` -> the two sides padded to one width (`collate_pairs`) plus `label` [B]."""
    batch = collate_pairs(items, pad_id, sides=SIDES)
    batch["label"] = torch.tensor([bool(item["label"]) for item in items], dtype=torch.bool)
    return batch


def side_logps(model: nn.Module, batch: dict, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence log-probs, completion lengths) of one side of the batch."""
    return label_sequence_logps(model, batch[f"{side}_labels"], input_ids=batch[f"{side}_input_ids"],
                                attention_mask=batch[f"{side}_attention_mask"])


def kl_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z₀: the mean log-ratio of the mismatched pairs over every rank's micro-batch, ≥ 0, detached."""
    gap = (policy_kl_logps - ref_kl_logps).detach().double()
    totals = dist_utils.all_reduce_sum(torch.stack([gap.sum(), torch.tensor(float(len(gap)), dtype=torch.float64,
                                                                             device=gap.device)]))
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).to(policy_kl_logps.dtype)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, rewards) per item: sequence log-probs [B], `desirable` bool [B], the reference
    point z₀ (a scalar). Rewards are β·Δ, detached."""
    logratios = policy_logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))
    return losses, beta * logratios.detach()


def by_label(values: torch.Tensor, desirable: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(sum, count) of `values` over the desirable items and over the undesirable ones."""
    values = values.detach()
    return {"chosen": ((values * desirable).sum(), desirable.sum()),
            "rejected": ((values * ~desirable).sum(), (~desirable).sum())}


class KTOTrainer(ReferenceTrainer):
    """KTO on unpaired feedback (`collate_feedback` batches); one completion per item. The
    reference is held as DPO's is (`ReferenceTrainer`), its two sides the completion and the KL
    sequence. Logged: `kl` (z₀), and per label (desirable as `chosen`, undesirable as
    `rejected`, TRL's names) the mean reward and log-prob."""

    sides = SIDES
    progress_metrics = (("rewards/chosen", "reward+"), ("rewards/rejected", "reward-"), ("kl", "kl"))

    def __init__(self, model: nn.Module, ref_model: nn.Module | Callable[[], nn.Module],
                 optimizer, train_loader, val_loader=None, kto: KTOArgs | None = None, **kwargs):
        self.kto = KTOArgs.build(kto, **KTOArgs.take(kwargs))
        super().__init__(model, ref_model, optimizer, train_loader, val_loader,
                         precompute=self.kto.precompute_ref_log_probs, **kwargs)

    def compute_loss(self, model, batch):
        ref_logps, ref_kl_logps = self.reference.logps(batch)
        with torch.no_grad():  # z₀ is detached: no activations kept for the KL sequences
            policy_kl_logps, _ = side_logps(model, batch, "kl")
        kl = kl_reference_point(policy_kl_logps, ref_kl_logps)
        policy_logps, _ = side_logps(model, batch, "completion")
        desirable = batch["label"]
        losses, rewards = kto_loss(policy_logps, ref_logps, desirable, kl, self.kto.beta,
                                   self.kto.desirable_weight, self.kto.undesirable_weight)
        metrics = {"kl": kl.detach() * len(losses)}
        for label, pair in by_label(rewards, desirable).items():
            metrics[f"rewards/{label}"] = pair
        for label, pair in by_label(policy_logps, desirable).items():
            metrics[f"logps/{label}"] = pair
        return losses.sum(), metrics
