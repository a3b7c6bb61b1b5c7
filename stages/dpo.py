"""DPO on preference pairs; the parent checkpoint is both the starting policy and, loaded a
second time when its log-probs are not cached yet, the frozen reference."""
from __future__ import annotations

from pathlib import Path

from trainers.dpo import collate_pairs

from .config import PipelineConfig
from .context import StageRun


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    with StageRun("dpo", config, parent_dir, out_dir) as stage:
        model, tok = stage.load_parent()
        # Loaded only if its log-probs are not cached for these weights (the parent's content hash
        # and how it is loaded: dtype, attention kernel), and let go once they are computed.
        weights_id = f"{stage.parent_hash}:{config.hf.model_dump_json()}"
        stage.train(stage.trainer(model, tok, collate_pairs, ref_model=lambda: stage.load_parent()[0],
                                  ref_weights_id=weights_id, dpo=config.dpo), tok)
    return stage.result
