"""Group Relative Policy Optimization (docs/algorithms.md), one file per part:

    loss.py     the maths, pure functions: advantages (group, RLOO), KL, the importance ratio (token,
                sequence/GSPO), the clipped surrogate (or CISPO's truncated weight), normalisation
    rollout.py  prompt batches, and the completion tokens' log-probs and targets on rollouts
    trainer.py  `GRPOArgs` and `GRPOTrainer`: generate, score (trainers.rewards), optimise
"""
from .loss import (ADVANTAGES, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALE_REWARDS, group_advantages, grpo_loss,
                   grpo_token_losses, importance_ratio, kl_k3, loss_items, loss_sum, truncated_is_weights)
from .rollout import collate_prompts, completion_logps, completion_targets, repeat_each
from .trainer import GRPOArgs, GRPOTrainer, RolloutArgs

__all__ = ["ADVANTAGES", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_TYPES", "SCALE_REWARDS", "group_advantages", "grpo_loss",
           "grpo_token_losses", "importance_ratio", "kl_k3", "loss_items", "loss_sum", "truncated_is_weights",
           "collate_prompts", "completion_logps", "completion_targets", "repeat_each", "GRPOArgs", "RolloutArgs",
           "GRPOTrainer"]
