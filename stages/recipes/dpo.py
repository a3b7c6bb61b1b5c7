"""DPO on preference pairs; the parent checkpoint is both the starting policy and the frozen
reference: loaded a second time when its log-probs are not cached yet, or, for a LoRA policy,
the policy with its adapter switched off."""
from __future__ import annotations

from typing import TYPE_CHECKING

from alignflow.trainers.dpo import DPOArgs, DPOTrainer

from ..algorithm import Algorithm, Headline, Panel
from ..formats import PAIRS
from ..settings import StageConfig, TrainConfig

if TYPE_CHECKING:
    from ..run import StageRun


class DPOConfig(DPOArgs, StageConfig):
    """DPO's settings (`trainers.dpo.DPOArgs`) beside its data and training loop."""
    train: TrainConfig = TrainConfig(lr=1e-4)


def train(stage: StageRun) -> None:
    model, tok = stage.load_policy()
    # The reference is loaded only if its log-probs are not cached for these weights, and let go
    # once they are computed.
    stage.train(stage.trainer(model, tok, ref_model=stage.reference_loader(model),
                              ref_weights_id=stage.reference_weights_id(), dpo=stage.settings), tok)


def preference_headline(method: str) -> tuple[Headline, ...]:
    """A pairwise method's report rows. Its validation loss is a preference loss, so it gets its
    own row instead of sitting beside the language-model losses as if it were one."""
    return (Headline(f"{method} val loss", "val_loss"),
            Headline(f"{method} val accuracy", "val_rewards/accuracies", cases="val_items"),
            Headline(f"{method} val margin", "val_rewards/margins"))


def preference_panels(method: str) -> tuple[Panel, ...]:
    return (Panel(f"{method} accuracy", (("rewards/accuracies", "train"), ("val_rewards/accuracies", "validation"))),
            Panel(f"{method} margin", (("rewards/margins", "train"), ("val_rewards/margins", "validation"))),
            # Both falling together is likelihood displacement: the margin grows while the
            # chosen answer becomes less likely too.
            Panel(f"{method} log-probs", (("logps/chosen", "chosen"), ("logps/rejected", "rejected"),
                                          ("val_logps/chosen", "chosen, validation"),
                                          ("val_logps/rejected", "rejected, validation"))))


ALGORITHM = Algorithm(
    name="dpo", parent="sft", aligns=True, settings=DPOConfig, trainer=DPOTrainer, data=PAIRS, recipe=train,
    headline=preference_headline("DPO"), panels=preference_panels("DPO"))
