"""SimPO (or CPO, `loss_type: cpo`) on preference pairs: the parent checkpoint is the starting
policy and there is no reference model at all, so a step holds one model."""
from __future__ import annotations

from typing import TYPE_CHECKING

from alignflow.trainers.simpo import SimPOArgs, SimPOTrainer

from ..algorithm import Algorithm
from ..formats import PAIRS
from ..settings import StageConfig, TrainConfig
from .dpo import preference_headline, preference_panels

if TYPE_CHECKING:
    from ..run import StageRun


class SimPOConfig(SimPOArgs, StageConfig):
    """SimPO's settings (`trainers.simpo.SimPOArgs`) beside its data and training loop."""
    train: TrainConfig = TrainConfig(lr=1e-4)


def train(stage: StageRun) -> None:
    model, tok = stage.load_policy()
    stage.train(stage.trainer(model, tok, simpo=stage.settings), tok)


ALGORITHM = Algorithm(
    name="simpo", parent="sft", aligns=True, settings=SimPOConfig, trainer=SimPOTrainer, data=PAIRS, recipe=train,
    headline=preference_headline("SimPO"), panels=preference_panels("SimPO"))
