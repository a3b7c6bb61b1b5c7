"""A reward model: the parent under a new scalar head (transformers' `...ForSequenceClassification`
of its architecture, one label; the built-in model's files are Llama's, so it has one too),
trained with the Bradley-Terry loss on preference pairs to score the chosen reply above the
rejected one. Its directory loads with `AutoModelForSequenceClassification` and scores a
rendered conversation at its last token, as TRL's reward models do; GRPO reads it through
`grpo.reward_model: rm` (stages/reward_models.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from alignflow.trainers.reward import RewardArgs, RewardTrainer

from ..algorithm import Algorithm, Headline, Panel
from ..formats import RANKED_PAIRS
from ..settings import StageConfig, TrainConfig

if TYPE_CHECKING:
    from ..run import StageRun


class RMConfig(RewardArgs, StageConfig):
    """The reward model's settings (`trainers.reward.RewardArgs`) beside its data and training loop."""
    train: TrainConfig = TrainConfig(lr=1e-4)


def train(stage: StageRun) -> None:
    model, tok = stage.load_policy()
    stage.train(stage.trainer(model, tok, reward=stage.settings), tok)


ALGORITHM = Algorithm(
    name="rm", parent="sft", aligns=True, scores=True, settings=RMConfig, trainer=RewardTrainer, data=RANKED_PAIRS,
    recipe=train,
    headline=(Headline("RM val accuracy", "val_rewards/accuracies", cases="val_items"),
              Headline("RM val margin", "val_rewards/margins"),
              Headline("RM val loss", "val_loss")),
    panels=(Panel("RM pairwise accuracy", (("rewards/accuracies", "train"), ("val_rewards/accuracies", "validation"))),
            Panel("RM reward margin", (("rewards/margins", "train"), ("val_rewards/margins", "validation"))),
            Panel("RM rewards", (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")))))
