"""GRPO's maths as pure functions (docs/algorithms.md): group-relative (or leave-one-out)
advantages, the k3 KL estimate, the importance ratio per token or per sequence (GSPO), the
clipped surrogate (or CISPO's truncated weight) per token, and how each loss type sums and
normalises it.

Per-token tensors are [B, T] over completion tokens; `advantages` is [B]."""
from __future__ import annotations

from typing import Literal, get_args

import torch

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]
ScaleRewards = Literal["group", "batch", "none"]
Advantage = Literal["group", "rloo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
LOSS_TYPES, SCALE_REWARDS = get_args(GRPOLossType), get_args(ScaleRewards)
ADVANTAGES, IMPORTANCE_SAMPLING_LEVELS = get_args(Advantage), get_args(ImportanceSamplingLevel)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     advantage: str = "group") -> torch.Tensor:
    """A_i = (r_i − baseline_i) / (std + 1e-4), unbiased std; rewards [N] are laid out as
    consecutive groups of `group_size`. The baseline is the mean of r_i's group ("group", GRPO)
    or the mean of the group's other G−1 rewards ("rloo", RLOO's leave-one-out baseline, which
    makes A_i = G/(G−1)·(r_i − group mean)). "group" scaling divides by each group's std,
    "batch" by the std of all N rewards, "none" not at all (Dr. GRPO: dividing by the std
    up-weights prompts whose rewards barely vary, the too easy and the too hard)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {advantage!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    if advantage == "group":
        centred = groups - groups.mean(dim=1, keepdim=True)
    else:
        if group_size < 2:
            raise ValueError("advantage 'rloo' needs groups of at least 2: a leave-one-out baseline of no rewards")
        others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
        centred = groups - others
    if scale_rewards == "none":
        return centred.flatten()
    std = groups.std(dim=1, keepdim=True) if scale_rewards == "group" else rewards.std()
    return (centred / (std + 1e-4)).flatten()


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) on tokens sampled from π_θ: unbiased and ≥ 0."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def importance_ratio(logps, old_logps, completion_mask=None, level: str = "token") -> torch.Tensor:
    """ρ [B, T]: exp(logp − old_logp) per token ("token"), or per sequence ("sequence", GSPO):
    exp of the mean log-ratio over the sequence's active tokens, the same value at each of its
    positions. The sequence ratio's gradient reaches every active token of the sequence."""
    log_ratio = logps - old_logps
    if level == "token":
        return torch.exp(log_ratio)
    if level != "sequence":
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")
    if completion_mask is None:
        raise ValueError("importance_sampling_level 'sequence' averages over the completion mask; pass it")
    mask = completion_mask.to(log_ratio.dtype)
    per_sequence = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(per_sequence).expand_as(log_ratio)


def truncated_is_weights(old_logps: torch.Tensor, engine_logps: torch.Tensor,
                         cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling (TIS): w = min(π_old / π_engine, cap) per token, detached,
    and where the cap bound (as 0/1). The rollouts were sampled by an inference engine whose
    probabilities differ from the trainer's own for the same weights (other kernels, another
    precision); weighting each token's surrogate by w corrects the gradient towards the trainer's
    sampling policy π_old, and the cap bounds the variance a token the engine found unlikely
    would add."""
    ratio = torch.exp(old_logps.detach() - engine_logps)
    return ratio.clamp(max=cap), (ratio > cap).to(ratio.dtype)


def grpo_token_losses(logps, old_logps, ref_logps, advantages, epsilon_low: float, epsilon_high: float,
                      beta: float, loss_type: str = "dapo", completion_mask=None,
                      importance_sampling_level: str = "token",
                      tis_weights=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, T] and per-token statistics (clip indicators, KL) for the metrics.

    `completion_mask` is read only by importance_sampling_level "sequence". `tis_weights` [B, T]
    (`truncated_is_weights`) multiply the surrogate, not the KL term: the KL estimate is of the
    trainer's own policy against the reference."""
    ratio = importance_ratio(logps, old_logps, completion_mask, importance_sampling_level)
    adv = advantages[:, None]
    if loss_type == "cispo":
        # CISPO (MiniMax-M1): the importance weight, truncated above at 1+ε_high and detached,
        # times A·logp: every token keeps a gradient, ρ > 1+ε_high contributes (1+ε_high)·A·∇logp.
        cap = 1 + epsilon_high
        losses = -ratio.clamp(max=cap).detach() * adv * logps
        low = torch.zeros_like(ratio, dtype=torch.bool)  # no lower bound on the weight
        high = (ratio > cap) & (adv != 0)  # truncated where it changes the gradient
    else:
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        losses = -torch.min(ratio * adv, clipped * adv)
        # The clip only binds on the side where it lowers the objective: below 1−ε for negative
        # advantages, above 1+ε for positive ones.
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
    if tis_weights is not None:
        losses = losses * tis_weights
    stats = {"clip_ratio/low": low.float(), "clip_ratio/high": high.float(),
             "clip_ratio/region": (low | high).float()}
    if beta != 0 and ref_logps is not None:
        kl = kl_k3(logps, ref_logps)
        losses = losses + beta * kl
        stats["kl"] = kl.detach()
    return losses, stats


def loss_sum(token_losses: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The batch's loss before normalisation, in the unit `loss_items` counts."""
    masked = token_losses * mask
    if loss_type == "grpo":  # per-sequence token means, summed over sequences
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if loss_type == "bnpo":  # this batch's token mean, one item
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type in ("dr_grpo", "dapo", "cispo"):
        return masked.sum()
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def loss_items(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> int:
    """How many items `loss_sum` sums over: the batch's normaliser for each loss type."""
    if loss_type in ("dapo", "cispo"):
        return int(mask.sum())
    if loss_type == "bnpo":
        return 1
    if loss_type == "grpo":
        return mask.shape[0]
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' normalises by max_completion_length; pass it")
        return mask.shape[0] * max_completion_length
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, beta: float = 0.04, loss_type: str = "dapo",
              max_completion_length: int | None = None, num_items: float | None = None,
              importance_sampling_level: str = "token", tis_weights=None):
    """Clipped surrogate (CISPO's truncated weight for loss_type "cispo") + β·KL (k3),
    normalised per `loss_type` (docs/algorithms.md), with the importance ratio per token or per
    sequence (GSPO) as `importance_sampling_level` says.

    Per-token tensors are [B, T] over completion tokens, `advantages` [B]. `num_items`
    overrides the normaliser, in the unit of `loss_items`; for dapo and cispo it is the active
    tokens of the whole generation batch (all accumulation steps and ranks) divided by the world size.
    The KL term is skipped when beta == 0 or ref_logps is None. `tis_weights`: the truncated
    importance-sampling correction of an engine's rollouts (`truncated_is_weights`).
    Returns (loss, metrics): kl (when computed) and the clip ratios, as means over active tokens.
    """
    mask = completion_mask.to(logps.dtype)
    losses, stats = grpo_token_losses(logps, old_logps, ref_logps, advantages, epsilon_low, epsilon_high, beta,
                                      loss_type, completion_mask, importance_sampling_level, tis_weights)
    denom = num_items if num_items is not None else loss_items(mask, loss_type, max_completion_length)
    loss = loss_sum(losses, mask, loss_type) / denom
    n_tokens = mask.sum().clamp(min=1)
    return loss, {k: (v * mask).sum() / n_tokens for k, v in stats.items()}
