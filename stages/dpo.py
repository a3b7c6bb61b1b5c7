"""DPO on preference pairs; the parent checkpoint is both the starting policy and, loaded a
second time, the frozen reference."""
from __future__ import annotations

from pathlib import Path

from trainers.dpo import DPOTrainer, collate_pairs

from . import common, handoff
from .config import PipelineConfig


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    stage = common.begin("dpo", config, parent_dir, out_dir)
    model, tok, _ = handoff.load_stage(stage.parent_dir, stage.device)
    reference, _, _ = handoff.load_stage(stage.parent_dir, stage.device)
    train, val = (common.load_data(stage, "dpo", tok, split) for split in ("train", "val"))
    c = config.dpo
    trainer = DPOTrainer(model=model, ref_model=reference, optimizer=common.optimizer_for(model, stage),
                         **common.loaders(stage, train, val, lambda items: collate_pairs(items, tok.pad_id)),
                         beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                         precompute_ref_log_probs=c.precompute_ref_log_probs, **common.trainer_kwargs(stage))
    return common.train_and_finish(stage, trainer, tok)
