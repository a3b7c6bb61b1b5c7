"""Supervised fine-tuning of the parent checkpoint on chat-formatted examples, packed several to
a row with `data.packing`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from alignflow.trainers import SFTTrainer

from ..algorithm import Algorithm
from ..formats import CONVERSATIONS
from ..settings import DataConfig, StageConfig
from .pretrain import LANGUAGE_MODEL_HEADLINE

if TYPE_CHECKING:
    from ..run import StageRun


class SFTDataConfig(DataConfig):
    packing: bool = Field(False, description="several examples per row of max_length tokens, each attending "
                                             "only to itself (batch_size then counts rows)")


class SFTConfig(StageConfig):
    data: SFTDataConfig = SFTDataConfig()


def train(stage: StageRun) -> None:
    model, tok = stage.load_policy()
    stage.train(stage.trainer(model, tok), tok)


ALGORITHM = Algorithm(name="sft", parent="pretrain", settings=SFTConfig, trainer=SFTTrainer, data=CONVERSATIONS,
                      recipe=train, headline=LANGUAGE_MODEL_HEADLINE)
