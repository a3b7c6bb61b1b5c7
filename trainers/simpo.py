"""SimPO and CPO: preference pairs with no reference model (docs/algorithms.md).

Both compare the policy's own log-probs of the chosen (y_w) and rejected (y_l) completions, so
a step holds one model, not two, and nothing is precomputed.

    simpo (Meng et al. 2024, eq. 6): −log σ(β·(logp(y_w)/|y_w| − logp(y_l)/|y_l|) − γ)
        the per-token (length-normalised) margin must clear the target margin γ
    cpo (Xu et al. 2024, eq. 3 + its NLL term): −log σ(β·(logp(y_w) − logp(y_l)))
        on summed log-probs, plus cpo_alpha × the chosen answer's per-token NLL

Either may take ε (label smoothing, as conservative DPO: a share ε of the pairs believed
flipped) and an NLL weight `cpo_alpha` (CPO's 1 by default, SimPO's 0). The defaults are each
variant's: SimPO β = 2, γ = 0.5 (the paper's β, TRL's γ); CPO β = 0.1, cpo_alpha = 1 (TRL's)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from .args import Settings
from .base import BaseTrainer
from .dpo import concatenated_logps, preference_metrics

VARIANT_DEFAULTS = {"simpo": {"beta": 2.0, "gamma": 0.5, "cpo_alpha": 0.0},
                    "cpo": {"beta": 0.1, "gamma": 0.0, "cpo_alpha": 1.0}}


class SimPOArgs(Settings):
    """SimPO's (or CPO's) own settings; unset ones take the variant's defaults."""
    loss_type: Literal["simpo", "cpo"] = Field("simpo", description="simpo: length-normalised margin with γ; "
                                                                    "cpo: summed log-probs plus an NLL term")
    beta: float = Field(2.0, gt=0, description="scale of the log-prob margin (simpo 2.0, cpo 0.1)")
    gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin γ (cpo: 0)")
    cpo_alpha: float = Field(0.0, ge=0, description="weight of the chosen answer's per-token NLL (simpo 0, cpo 1)")
    label_smoothing: float = Field(0.0, ge=0, le=0.5, description="ε: the believed rate of flipped labels")

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, values):
        if isinstance(values, dict):
            variant = values.get("loss_type", "simpo")
            values = {**VARIANT_DEFAULTS.get(variant, {}), **values}
        return values


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, args: SimPOArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards) per pair from sequence log-probs [B] and
    completion lengths [B]. Rewards are β × the scores compared (per token for simpo), detached."""
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if args.loss_type == "simpo":
        chosen, rejected = chosen / chosen_lengths.clamp(min=1), rejected / rejected_lengths.clamp(min=1)
    z = args.beta * (chosen - rejected) - args.gamma
    eps = args.label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if args.cpo_alpha:
        losses = losses + args.cpo_alpha * (-policy_chosen_logps / chosen_lengths.clamp(min=1))
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


class SimPOTrainer(BaseTrainer):
    """SimPO/CPO on preference pairs (`collate_pairs` batches); one pair per item."""

    progress_metrics = (("rewards/accuracies", "acc"), ("rewards/margins", "margin"))

    def __init__(self, model, optimizer, train_loader, val_loader=None, simpo: SimPOArgs | None = None, **kwargs):
        self.simpo = SimPOArgs.build(simpo, **SimPOArgs.take(kwargs))
        super().__init__(model, optimizer, train_loader, val_loader, **kwargs)

    def count_items(self, batch: dict) -> int:
        return batch["chosen_input_ids"].shape[0]

    def compute_loss(self, model, batch):
        chosen, rejected, chosen_lengths, rejected_lengths = concatenated_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, chosen_lengths, rejected_lengths,
                                                              self.simpo)
        return losses.sum(), preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
