"""Reward model: a scalar score per sequence, trained on preference pairs (docs/algorithms.md).

The model is a Hugging Face `...ForSequenceClassification` with `num_labels=1`; its head scores
the rightmost token that is not `config.pad_token_id`, the last real token of a padded row
(TRL's reward models are the same). With r_c, r_r the rewards of the chosen and rejected
sequences of a pair:

    loss = −log σ(r_c − r_r − margin)  + coef · (r_c + r_r)²

Bradley-Terry on the reward difference (Ouyang et al. 2022, eq. 1), with Llama 2's per-pair
margin (Touvron et al. 2023, eq. 2) when the data carries one, and TRL's centring term
(`center_rewards_coefficient`, Eisenstein et al. 2023, eq. 2) when set. Per pair, so the loop's
sum over pairs divided by the step's pair count is TRL's batch mean."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .args import Settings
from .base import BaseTrainer
from .dpo import collate_pairs, concatenated_inputs
from .dpo.pairs import SIDES
from .modules import unwrap


class RewardArgs(Settings):
    """The reward model's own settings (the loop's are `TrainingArgs`)."""
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="coefficient that pulls the rewards towards mean zero: adds coef·(r_c + r_r)² per "
                                "pair (Eisenstein et al. 2023, eq. 2; TRL's recommended value 0.01). None: off")


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair losses [B] from the rewards [B] of each pair's chosen and rejected sequences:
    −log σ(r_c − r_r − margin), plus coef·(r_c + r_r)² when centring."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.ndim != 1:
        raise ValueError(f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
                         f"{tuple(rejected_rewards.shape)} must be 1-D and of equal length")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"margin {tuple(margin.shape)} must have one value per pair {tuple(diff.shape)}")
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


def collate_ranked_pairs(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """`collate_pairs` (right-padded chosen_/rejected_ input_ids, attention_mask, labels) plus
    `margin` (float32 [B]) when the items carry a `margin` key: all of them or none."""
    batch = collate_pairs(items, pad_id)
    has = [i for i, item in enumerate(items) if "margin" in item]
    if not has:
        return batch
    if len(has) != len(items):
        missing = next(i for i, item in enumerate(items) if "margin" not in item)
        raise ValueError(f"pair {missing}: no margin, while pair {has[0]} has one (give every pair a margin, "
                         "or none)")
    margins = []
    for i, item in enumerate(items):
        value = item["margin"]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"pair {i}: margin must be a number, got {value!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"pair {i}: margin must be finite, got {value}")
        margins.append(value)
    batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    return batch


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar reward [N] (fp32) of each row of a padded batch, from a Hugging Face
    `...ForSequenceClassification` model with `num_labels=1` (plain, compiled, DDP- or
    FSDP-wrapped: it is just called). Its head scores each row's rightmost token that is not
    `config.pad_token_id`, so the padded positions (attention_mask 0) are set to that id first,
    whatever id the collate padded with. A real last token equal to the pad id (pad = eos) is
    skipped the same way padded or alone."""
    config = getattr(unwrap(model), "config", None)
    if config is None:
        raise TypeError(f"sequence_rewards needs a Hugging Face ...ForSequenceClassification model (num_labels=1), "
                        f"got {type(unwrap(model)).__name__} without a config")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad_id = text_config.pad_token_id
    if pad_id is None:
        raise ValueError("the reward model's config.pad_token_id is None: its head finds each row's last token by "
                         "the pad id, so set model.config.pad_token_id (e.g. to the tokenizer's pad_token_id)")
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    if logits.ndim != 2 or logits.shape[-1] != 1:
        raise ValueError(f"a reward model gives one score per sequence (num_labels=1, logits [N, 1]); got logits "
                         f"of shape {tuple(logits.shape)}")
    return logits[:, 0].float()


class RewardTrainer(BaseTrainer):
    """A reward model on preference pairs (`collate_ranked_pairs` batches); one pair per item.
    `reward` (a `RewardArgs`) or its fields as keywords."""

    progress_metrics = (("rewards/accuracies", "acc"), ("rewards/margins", "margin"))

    def __init__(self, model, optimizer, train_loader, val_loader=None, reward: RewardArgs | None = None, **kwargs):
        self.reward = RewardArgs.build(reward, **RewardArgs.take(kwargs))
        super().__init__(model, optimizer, train_loader, val_loader, **kwargs)

    def count_items(self, batch: dict) -> int:
        return batch["chosen_input_ids"].shape[0]

    def compute_loss(self, model, batch):
        # One forward over the chosen rows then the rejected rows.
        inputs = concatenated_inputs(batch, SIDES)
        rewards = sequence_rewards(model, inputs["input_ids"], inputs["attention_mask"])
        n = batch["chosen_input_ids"].shape[0]
        chosen, rejected = rewards[:n], rewards[n:]
        losses = reward_loss(chosen, rejected, batch.get("margin"), self.reward.center_rewards_coefficient)
        chosen, rejected = chosen.detach(), rejected.detach()
        return losses.sum(), {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "rewards/margins": (chosen - rejected).sum(),
        }
