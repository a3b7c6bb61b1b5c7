"""The DPO family's losses, as pure functions of sequence log-probs (docs/algorithms.md says
where each formula comes from).

With the policy's and the frozen reference's log-probs of the chosen (y_w) and rejected (y_l)
completions, each side's log-ratio is Δ_w = logp_θ(y_w) − logp_ref(y_w) (and Δ_l likewise), and
Δ = Δ_w − Δ_l. Every loss below is a function of one pair (only `aot`/`aot_pair` look across the
micro-batch: they sort); β sets how far from the reference the policy may go. A list of loss
types is their weighted sum (`loss_weights`, default 1 each), as MPO combines sigmoid, bco_pair
and sft; `rpo_alpha` adds α·(the chosen completion's per-token NLL), as RPO does."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, get_args

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                      "aot_pair", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"]
LOSS_TYPES = get_args(DPOLossType)
# TRL 1.16 calls the unpaired AOT loss `aot_unpaired`; older TRL (and this issue) `aot_pair`.
ALIASES = {"aot_unpaired": "aot_pair"}
# ε (label_smoothing) means something only to these; the others refuse it rather than ignore it.
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")
# EXO's target distribution is [1 − ε, ε]; at ε = 0 its KL is infinite, so it uses the paper's 1e-3.
EXO_DEFAULT_EPSILON = 1e-3
# These need each side's completion token count.
NEEDS_LENGTHS = ("sigmoid_norm", "sft")


@dataclass(frozen=True)
class Pairs:
    """One micro-batch's sequence log-probs [B] and completion token counts [B] (or None)."""
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_logratios - self.rejected_logratios

    def per_token_delta(self) -> torch.Tensor:
        """Each side's log-ratio divided by its completion length, chosen minus rejected."""
        return (self.chosen_logratios / self.chosen_lengths.clamp(min=1)
                - self.rejected_logratios / self.rejected_lengths.clamp(min=1))


@dataclass(frozen=True)
class Knobs:
    beta: float
    label_smoothing: float
    discopop_tau: float


def smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z); logsigmoid, not log(sigmoid): no log(0) for large |z|."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(p: Pairs, k: Knobs) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); with ε, conservative DPO (cDPO, Mitchell 2023)."""
    return smoothed_sigmoid(k.beta * p.delta, k.label_smoothing)


def hinge(p: Pairs, k: Knobs) -> torch.Tensor:
    """SLiC's hinge on the log-ratio margin (Zhao et al. 2023): relu(1 − βΔ)."""
    return torch.relu(1.0 - k.beta * p.delta)


def ipo(p: Pairs, k: Knobs) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): (Δ − 1/(2β))², Δ per token when lengths are given (as
    TRL does, confirmed by the authors), summed log-ratios otherwise."""
    delta = p.delta if p.chosen_lengths is None else p.per_token_delta()
    return (delta - 1.0 / (2.0 * k.beta)) ** 2


def robust(p: Pairs, k: Knobs) -> torch.Tensor:
    """rDPO (Chowdhury et al. 2024): an unbiased estimate of the clean loss when labels flip with
    probability ε: [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)."""
    z, eps = k.beta * p.delta, k.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def exo_pair(p: Pairs, k: Knobs) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 16, K = 2): KL(q‖p) from q = softmax over the pair of β·log-ratios,
    i.e. [σ(βΔ), σ(−βΔ)], to the labels' p = [1 − ε, ε]."""
    eps = k.label_smoothing or EXO_DEFAULT_EPSILON
    z = k.beta * p.delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair(p: Pairs, k: Knobs) -> torch.Tensor:
    """NCA (Chen et al. 2024): each side's own reward r = β·Δ_side against zero, so the chosen
    answer's likelihood is pushed up, not only the margin: −log σ(r_w) − ½log σ(−r_w) − ½log σ(−r_l)."""
    r_w, r_l = k.beta * p.chosen_logratios, k.beta * p.rejected_logratios
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def bco_pair(p: Pairs, k: Knobs) -> torch.Tensor:
    """BCO's paired form (Jung et al. 2024), as TRL: chosen classified good, rejected bad, each
    on its own reward (TRL's paired form has no running reward shift δ): −log σ(r_w) − log σ(−r_l)."""
    r_w, r_l = k.beta * p.chosen_logratios, k.beta * p.rejected_logratios
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


def sppo_hard(p: Pairs, k: Knobs) -> torch.Tensor:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities (1 for the chosen, 0 for the
    rejected): (Δ_w − 1/(2β))² + (Δ_l + 1/(2β))²."""
    target = 0.5 / k.beta
    return (p.chosen_logratios - target) ** 2 + (p.rejected_logratios + target) ** 2


def aot(p: Pairs, k: Knobs) -> torch.Tensor:
    """AOT (Melnyk et al. 2024), paired: the sorted policy margins logp_θ(y_w) − logp_θ(y_l) must
    dominate the sorted reference margins, quantile by quantile across the micro-batch."""
    policy = torch.sort(p.policy_chosen - p.policy_rejected, dim=0).values
    ref = torch.sort(p.ref_chosen - p.ref_rejected, dim=0).values
    return smoothed_sigmoid(k.beta * (policy - ref), k.label_smoothing)


def aot_pair(p: Pairs, k: Knobs) -> torch.Tensor:
    """AOT, unpaired: the sorted chosen log-ratios must dominate the sorted rejected ones."""
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return smoothed_sigmoid(k.beta * (chosen - rejected), k.label_smoothing)


def apo_zero(p: Pairs, k: Knobs) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): the chosen answers are better than the
    model's own, so raise the chosen likelihood and lower the rejected: 1 − σ(βΔ_w) + σ(βΔ_l)."""
    return 1.0 - torch.sigmoid(k.beta * p.chosen_logratios) + torch.sigmoid(k.beta * p.rejected_logratios)


def apo_down(p: Pairs, k: Knobs) -> torch.Tensor:
    """APO-down (eq. 8): the chosen answers are worse than the model's own, so lower both, the
    rejected more: σ(βΔ_w) + 1 − σ(βΔ)."""
    return torch.sigmoid(k.beta * p.chosen_logratios) + 1.0 - torch.sigmoid(k.beta * p.delta)


def discopop(p: Pairs, k: Knobs) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): the logistic and the exponential loss of z = βΔ,
    blended by σ(z/τ): (1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·e^−z."""
    z = k.beta * p.delta
    mix = torch.sigmoid(z / k.discopop_tau)
    return (1.0 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)


def sigmoid_norm(p: Pairs, k: Knobs) -> torch.Tensor:
    """DPO on per-token log-ratios (length-normalised), as TRL: −log σ(β·(Δ_w/|y_w| − Δ_l/|y_l|))."""
    return -F.logsigmoid(k.beta * p.per_token_delta())


def sft(p: Pairs, k: Knobs) -> torch.Tensor:
    """The chosen completion's per-token NLL, −logp_θ(y_w)/|y_w|. TRL averages over the batch's
    tokens; here, as every loss above, it is per pair, so each pair weighs the same."""
    return -p.policy_chosen / p.chosen_lengths.clamp(min=1)


LOSSES: dict[str, Callable[[Pairs, Knobs], torch.Tensor]] = {
    fn.__name__: fn for fn in (sigmoid, hinge, ipo, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_pair,
                               apo_zero, apo_down, discopop, sigmoid_norm, sft)}
assert tuple(LOSSES) == LOSS_TYPES


def loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """One loss type or a list, aliases resolved."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    return tuple(ALIASES.get(name, name) for name in types)


def check_loss_config(beta: float, loss_type: str | Sequence[str], label_smoothing: float,
                      loss_weights: Sequence[float] | None = None, rpo_alpha: float | None = None,
                      discopop_tau: float = 0.05) -> None:
    types = loss_types(loss_type)
    if not types:
        raise ValueError("loss_type is an empty list; name at least one, e.g. sigmoid")
    unknown = [name for name in types if name not in LOSSES]
    if unknown:
        raise ValueError(f"unknown DPO loss_type {unknown[0]!r}; valid: {', '.join(LOSS_TYPES)}")
    if len(set(types)) != len(types):
        raise ValueError(f"loss_type {list(types)} names a loss twice; give it one weight in loss_weights instead")
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(f"loss_weights has {len(loss_weights)} weights for {len(types)} loss types {list(types)}; "
                         "give one per type")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if rpo_alpha is not None and rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be ≥ 0, got {rpo_alpha}")
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    if label_smoothing != 0.0 and not any(name in SMOOTHED for name in types):
        raise ValueError(f"label_smoothing applies to {', '.join(SMOOTHED)} only, not {' + '.join(types)}")
    # Beyond 0.5 the labels would be believed mostly wrong: swap chosen and rejected instead.
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for {' + '.join(types)}, got {label_smoothing}")
    if "robust" in types and label_smoothing == 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5) for 'robust' (it divides by 1 − 2ε), got 0.5")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    rpo_alpha: float | None = None,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards), one value per pair.

    Inputs are sequence log-probs [B] (sums over completion tokens) and, for the per-token loss
    types (ipo, sigmoid_norm, sft, and rpo_alpha), completion token counts [B]. The loss of a
    pair is Σ_k w_k·loss_k + α·(−logp_θ(y_w)/|y_w|). Rewards are β·(logp_θ − logp_ref) per side
    (unnormalised for every loss type), detached."""
    types = loss_types(loss_type)
    check_loss_config(beta, types, label_smoothing, loss_weights, rpo_alpha, discopop_tau)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    per_token = [name for name in types if name in NEEDS_LENGTHS] + (["rpo_alpha"] if rpo_alpha else [])
    if per_token and chosen_lengths is None:
        raise ValueError(f"{', '.join(per_token)} need chosen_lengths and rejected_lengths (completion token counts)")
    pairs = Pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths, rejected_lengths)
    knobs = Knobs(beta, label_smoothing, discopop_tau)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    losses = sum(weight * LOSSES[name](pairs, knobs) for name, weight in zip(types, weights))
    if rpo_alpha:
        losses = losses + rpo_alpha * sft(pairs, knobs)
    chosen_rewards = beta * pairs.chosen_logratios.detach()
    rejected_rewards = beta * pairs.rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
