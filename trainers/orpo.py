"""ORPO: supervised fine-tuning and preference alignment in one loss, with no reference model
(Hong et al. 2024; docs/algorithms.md).

With P(y|x) the geometric mean of the completion's token probabilities (exp of the per-token
log-prob) and odds(y) = P/(1 − P):

    loss = −logp(y_w)/|y_w|  −  λ · log σ(log odds(y_w) − log odds(y_l))

The first term is SFT on the chosen answer; the second (the odds-ratio term, eq. 7) pushes the
chosen answer's odds above the rejected one's. Since log odds = log P − log(1 − P), everything
is computed from per-token log-probs with a stable log(1 − eˣ). λ is `beta` (0.1, the paper's and
TRL's default). Because the NLL term trains the answer itself, ORPO can align a base model in one
stage (`alignflow stage orpo --parent` a pretrain run or a Hugging Face model)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from .args import Settings
from .base import BaseTrainer
from .dpo import concatenated_logps, preference_metrics


class ORPOArgs(Settings):
    beta: float = Field(0.1, gt=0, description="λ: the weight of the odds-ratio term against the NLL")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012): expm1 near 0, log1p far away."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
              rejected_lengths: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """(losses, chosen_rewards, rejected_rewards, log_odds_ratio) per pair, from sequence
    log-probs [B] and completion lengths [B]. Rewards are β × the per-token log-probs, detached."""
    # At least fp32 (log(1 − eˣ) loses everything in bf16), fp64 kept.
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    chosen = policy_chosen_logps.to(dtype) / chosen_lengths.clamp(min=1)
    rejected = policy_rejected_logps.to(dtype) / rejected_lengths.clamp(min=1)
    log_odds_ratio = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    losses = -chosen - beta * F.logsigmoid(log_odds_ratio)
    return losses, beta * chosen.detach(), beta * rejected.detach(), log_odds_ratio.detach()


class ORPOTrainer(BaseTrainer):
    """ORPO on preference pairs (`collate_pairs` batches); one pair per item."""

    progress_metrics = (("rewards/accuracies", "acc"), ("log_odds_ratio", "log_odds"))

    def __init__(self, model, optimizer, train_loader, val_loader=None, orpo: ORPOArgs | None = None, **kwargs):
        self.orpo = ORPOArgs.build(orpo, **ORPOArgs.take(kwargs))
        super().__init__(model, optimizer, train_loader, val_loader, **kwargs)

    def count_items(self, batch: dict) -> int:
        return batch["chosen_input_ids"].shape[0]

    def compute_loss(self, model, batch):
        chosen, rejected, chosen_lengths, rejected_lengths = concatenated_logps(model, batch)
        losses, chosen_rewards, rejected_rewards, log_odds_ratio = orpo_loss(
            chosen, rejected, chosen_lengths, rejected_lengths, self.orpo.beta)
        metrics = preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        metrics["log_odds_ratio"] = log_odds_ratio.sum()
        metrics["nll_loss"] = (-chosen.detach() / chosen_lengths.clamp(min=1)).sum()
        return losses.sum(), metrics
