"""ORPO on preference pairs: SFT on the chosen answer plus an odds-ratio term, with no reference
model. It trains on an SFT checkpoint by default, and also straight on a base model: a pretrain
checkpoint or a Hugging Face model directory (`alignflow stage orpo --parent ...`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from alignflow.trainers.orpo import ORPOArgs, ORPOTrainer

from ..algorithm import Algorithm, Panel
from ..formats import PAIRS
from ..settings import StageConfig, TrainConfig
from .dpo import preference_headline, preference_panels

if TYPE_CHECKING:
    from ..run import StageRun


class ORPOConfig(ORPOArgs, StageConfig):
    """ORPO's settings (`trainers.orpo.ORPOArgs`) beside its data and training loop."""
    train: TrainConfig = TrainConfig(lr=1e-4)


def train(stage: StageRun) -> None:
    model, tok = stage.load_policy()
    stage.train(stage.trainer(model, tok, orpo=stage.settings), tok)


ALGORITHM = Algorithm(
    name="orpo", parent="sft", also_trains_on=("pretrain",), aligns=True, settings=ORPOConfig, trainer=ORPOTrainer,
    data=PAIRS, recipe=train, headline=preference_headline("ORPO"),
    panels=(*preference_panels("ORPO"),
            Panel("ORPO terms", (("nll_loss", "NLL of the chosen"), ("log_odds_ratio", "log odds ratio")))))
