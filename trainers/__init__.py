"""Training loops and algorithms, usable without Prefect (docs/training.md, docs/algorithms.md).

    from alignflow.trainers import SFTTrainer, configure_optimizer, create_trainer
"""
from .args import TrainingArgs
from .base import BaseTrainer, NonFiniteLossError
from .early_stopping import EarlyStopping
from .modules import logits_of, unwrap
from .checkpoint import CheckpointError, latest_checkpoint
from .dpo import DPOArgs, DPOTrainer, dpo_loss
from .grpo import GRPOArgs, GRPOTrainer, group_advantages, grpo_loss
from .orpo import ORPOArgs, ORPOTrainer
from .optim import configure_optimizer, create_scheduler, get_parameter_groups
from .registry import create_trainer, get_trainer_class, register_trainer
from .reward import RewardArgs, RewardTrainer, collate_ranked_pairs, reward_loss, sequence_rewards
from .rewards import get_reward, register_reward
from .sft import PretrainTrainer, SFTTrainer
from .simpo import SimPOArgs, SimPOTrainer

register_trainer("pretrain", PretrainTrainer)
register_trainer("sft", SFTTrainer)
register_trainer("dpo", DPOTrainer)
register_trainer("grpo", GRPOTrainer)

__all__ = [
    "TrainingArgs", "DPOArgs", "GRPOArgs", "BaseTrainer", "SFTTrainer", "PretrainTrainer", "EarlyStopping", "NonFiniteLossError",
    "CheckpointError", "configure_optimizer", "create_scheduler", "get_parameter_groups",
    "create_trainer", "get_trainer_class", "register_trainer", "latest_checkpoint", "logits_of", "unwrap",
    "DPOTrainer", "dpo_loss", "SimPOArgs", "SimPOTrainer", "ORPOArgs", "ORPOTrainer", "GRPOTrainer", "group_advantages", "grpo_loss", "get_reward", "register_reward",
    "RewardArgs", "RewardTrainer", "collate_ranked_pairs", "reward_loss", "sequence_rewards",
]
