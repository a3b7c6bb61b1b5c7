"""KTO on unpaired feedback (or a pair file, unpaired): the parent checkpoint is the starting
policy and the frozen reference, held as DPO's is (scored once before training unless
`precompute_ref_log_probs: false`; for a LoRA policy, the policy with its adapter off)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from alignflow.trainers.kto import KTOArgs, KTOTrainer

from ..algorithm import Algorithm, Headline, Panel
from ..formats import FEEDBACK
from ..settings import StageConfig, TrainConfig

if TYPE_CHECKING:
    from ..run import StageRun


class KTOConfig(KTOArgs, StageConfig):
    """KTO's settings (`trainers.kto.KTOArgs`) beside its data and training loop."""
    train: TrainConfig = TrainConfig(lr=1e-4)


def train(stage: StageRun) -> None:
    model, tok = stage.load_policy()
    stage.train(stage.trainer(model, tok, ref_model=stage.reference_loader(model),
                              ref_weights_id=stage.reference_weights_id(), kto=stage.settings), tok)


ALGORITHM = Algorithm(
    name="kto", parent="sft", aligns=True, settings=KTOConfig, trainer=KTOTrainer, data=FEEDBACK, recipe=train,
    headline=(Headline("KTO val loss", "val_loss"),
              Headline("KTO val reward, desirable", "val_rewards/chosen"),
              Headline("KTO val reward, undesirable", "val_rewards/rejected"),
              Headline("KTO val KL", "val_kl")),
    panels=(Panel("KTO rewards", (("rewards/chosen", "desirable"), ("rewards/rejected", "undesirable"),
                                  ("val_rewards/chosen", "desirable, validation"),
                                  ("val_rewards/rejected", "undesirable, validation"))),
            Panel("KTO reference point z₀", (("kl", "train"), ("val_kl", "validation"))),
            Panel("KTO log-probs", (("logps/chosen", "desirable"), ("logps/rejected", "undesirable"),
                                    ("val_logps/chosen", "desirable, validation"),
                                    ("val_logps/rejected", "undesirable, validation")))))
