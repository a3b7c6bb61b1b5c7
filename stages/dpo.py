"""DPO on preference pairs; the parent checkpoint is both the starting policy and, loaded a
second time, the frozen reference."""
from __future__ import annotations

from pathlib import Path

from trainers.dpo import collate_pairs

from .config import PipelineConfig
from .context import StageRun


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    with StageRun("dpo", config, parent_dir, out_dir) as stage:
        model, tok = stage.load_parent()
        reference, _ = stage.load_parent()
        stage.train(stage.trainer(model, tok, collate_pairs, ref_model=reference, dpo=config.dpo), tok)
    return stage.result
