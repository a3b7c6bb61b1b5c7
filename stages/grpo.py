"""GRPO on prompts with verifiable answers: the policy samples through `models.generate_text`,
and the parent checkpoint, loaded again (or a LoRA policy with its adapter switched off), is the
frozen KL reference when beta > 0."""
from __future__ import annotations

from pathlib import Path

from alignflow.models import generate_text
from alignflow.trainers.grpo import collate_prompts
from alignflow.trainers.rewards import required_columns

from . import data
from .config import PipelineConfig
from .context import StageRun


def read_prompts(config: PipelineConfig) -> data.RawSplit:
    """The training prompts, refused without a column a reward function reads: that function
    would score no row, and GRPO would train silently on the others alone."""
    raw = data.read("grpo", config.grpo.data, config.demo, "train")
    found = raw.dataset.column_names
    for column, rewards in required_columns(config.grpo.reward_funcs).items():
        if column not in found:
            raise data.DataError(f"{raw.origin}: no column {column!r}, which reward {', '.join(rewards)} reads "
                                 f"(grpo.reward_funcs; found {', '.join(found)})")
    return raw


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    with StageRun("grpo", config, parent_dir, out_dir) as stage:
        prompts = read_prompts(config)
        model, tok = stage.load_policy()
        reference = stage.reference_loader(model)() if config.grpo.beta > 0 else None
        trainer = stage.trainer(model, tok, collate_prompts, train_raw=prompts, ref_model=reference,
                                grpo=config.grpo, generate_fn=generate_text, tokenizer=tok)
        stage.train(trainer, tok)
    return stage.result
