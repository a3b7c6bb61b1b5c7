"""Training loops and algorithms, usable without Prefect (design.md §1, §3).

    from trainers import SFTTrainer, configure_optimizer, create_trainer
"""
from .base import BaseTrainer, EarlyStopping, NonFiniteLossError, logits_of, unwrap
from .checkpoint import CheckpointError, latest_checkpoint
from .optim import configure_optimizer, create_scheduler, get_parameter_groups
from .sft import PretrainTrainer, SFTTrainer

from .registry import create_trainer, get_trainer_class, register_trainer

register_trainer("pretrain", PretrainTrainer)
register_trainer("sft", SFTTrainer)

__all__ = [
    "BaseTrainer", "SFTTrainer", "PretrainTrainer", "EarlyStopping", "NonFiniteLossError",
    "CheckpointError", "configure_optimizer", "create_scheduler", "get_parameter_groups",
    "create_trainer", "get_trainer_class", "register_trainer", "latest_checkpoint", "logits_of", "unwrap",
]
