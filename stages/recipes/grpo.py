"""GRPO on prompts with verifiable answers: the policy samples through `models.generate_text`,
and the parent checkpoint, loaded again (or a LoRA policy with its adapter switched off), is the
frozen KL reference when beta > 0."""
from __future__ import annotations

from typing import TYPE_CHECKING

from alignflow.models import generate_text
from alignflow.trainers.grpo import GRPOArgs, GRPOTrainer
from alignflow.trainers.rewards import required_columns

from .. import data
from ..algorithm import Algorithm, Headline, Panel
from ..formats import PROMPTS
from ..settings import StageConfig, TrainConfig

if TYPE_CHECKING:
    from ..run import StageRun


class GRPOConfig(GRPOArgs, StageConfig):
    """GRPO's settings (`trainers.grpo.GRPOArgs`) beside its data and training loop."""
    train: TrainConfig = TrainConfig(lr=1e-4, batch_size=4)


def read_prompts(config, stage: str = "grpo") -> data.RawSplit:
    """The training prompts, refused without a column a reward function reads: that function
    would score no row, and GRPO would train silently on the others alone."""
    settings = config.stage(stage)
    raw = data.read(stage, PROMPTS, settings.data, config.demo, "train")
    found = raw.dataset.column_names
    for column, rewards in required_columns(settings.reward_funcs).items():
        if column not in found:
            raise data.DataError(f"{raw.origin}: no column {column!r}, which reward {', '.join(rewards)} reads "
                                 f"({stage}.reward_funcs; found {', '.join(found)})")
    return raw


def train(stage: StageRun) -> None:
    prompts = read_prompts(stage.config, stage.name)
    model, tok = stage.load_policy()
    reference = stage.reference_loader(model)() if stage.settings.beta > 0 else None
    trainer = stage.trainer(model, tok, train_raw=prompts, ref_model=reference, grpo=stage.settings,
                            generate_fn=generate_text, tokenizer=tok)
    stage.train(trainer, tok)


ALGORITHM = Algorithm(
    name="grpo", parent="sft", aligns=True, settings=GRPOConfig, trainer=GRPOTrainer, data=PROMPTS, recipe=train,
    headline=(Headline("GRPO val reward", "val_reward"),),
    panels=(Panel("reward", (("reward", "train"), ("val_reward", "held-out"))),
            Panel("KL to the reference", (("kl", "train"),)),
            Panel("completion length (tokens)", (("completion_length/mean", "train"),)),
            Panel("clip ratio", (("clip_ratio/region", "train"),))))
