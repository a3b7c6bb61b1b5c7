"""Trainers by name: create_trainer("sft", ...), get_trainer_class("dpo")."""
from __future__ import annotations

from .base import BaseTrainer

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
