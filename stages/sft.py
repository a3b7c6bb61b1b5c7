"""Supervised fine-tuning of the parent checkpoint on chat-formatted examples."""
from __future__ import annotations

from pathlib import Path

from alignflow.trainers.packing import check_isolation
from alignflow.trainers.sft import collate_causal_lm, collate_packed

from .config import PipelineConfig
from .context import StageRun


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    with StageRun("sft", config, parent_dir, out_dir) as stage:
        model, tok = stage.load_policy()
        collate = collate_causal_lm
        if config.sft.data.packing:
            check_isolation(model, len(tok), stage.device)  # no example may see another
            collate = collate_packed
        stage.train(stage.trainer(model, tok, collate), tok)
    return stage.result
