"""Supervised fine-tuning of the parent checkpoint on chat-formatted examples."""
from __future__ import annotations

from pathlib import Path

from trainers import SFTTrainer
from trainers.sft import collate_causal_lm

from . import common, handoff
from .config import PipelineConfig


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    stage = common.begin("sft", config, parent_dir, out_dir)
    model, tok, _ = handoff.load_stage(stage.parent_dir, stage.device)
    train, val = (common.load_data(stage, "sft", tok, split) for split in ("train", "val"))
    trainer = SFTTrainer(model=model, optimizer=common.optimizer_for(model, stage),
                         **common.loaders(stage, train, val, lambda items: collate_causal_lm(items, tok.pad_id)),
                         **common.trainer_kwargs(stage))
    return common.train_and_finish(stage, trainer, tok)
