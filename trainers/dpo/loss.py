"""The DPO family's losses, as pure functions of sequence log-probs (docs/algorithms.md).

With the policy's and the frozen reference's log-probs of the chosen (y_w) and rejected (y_l)
completions, each side's log-ratio is Δ_w = logp_θ(y_w) − logp_ref(y_w) (and Δ_l likewise), and
Δ = Δ_w − Δ_l. Every loss below pushes Δ up; β sets how far from the reference that may go."""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
LOSS_TYPES = get_args(DPOLossType)


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
