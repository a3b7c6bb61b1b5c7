"""Training loops and algorithms, usable without Prefect (design.md §1, §3).

    from trainers import SFTTrainer, configure_optimizer, create_trainer
"""
from .base import BaseTrainer, EarlyStopping, NonFiniteLossError, logits_of, unwrap
from .checkpoint import CheckpointError, latest_checkpoint
from .optim import configure_optimizer, create_scheduler, get_parameter_groups
from .sft import PretrainTrainer, SFTTrainer

_REGISTRY: dict[str, type[BaseTrainer]] = {}


def register_trainer(name: str, cls: type[BaseTrainer]) -> None:
    """Make `cls` available to `create_trainer(name, ...)`."""
    _REGISTRY[name.lower()] = cls


def get_trainer_class(name: str) -> type[BaseTrainer]:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown trainer {name!r}; registered: {sorted(_REGISTRY)}") from None


def create_trainer(name: str, **kwargs) -> BaseTrainer:
    return get_trainer_class(name)(**kwargs)


register_trainer("pretrain", PretrainTrainer)
register_trainer("sft", SFTTrainer)

__all__ = [
    "BaseTrainer", "SFTTrainer", "PretrainTrainer", "EarlyStopping", "NonFiniteLossError",
    "CheckpointError", "configure_optimizer", "create_scheduler", "get_parameter_groups",
    "create_trainer", "get_trainer_class", "register_trainer", "latest_checkpoint", "logits_of", "unwrap",
]
