"""DPO on preference pairs; the parent checkpoint is both the starting policy and the frozen
reference: loaded a second time when its log-probs are not cached yet, or, for a LoRA policy,
the policy with its adapter switched off."""
from __future__ import annotations

from pathlib import Path

from alignflow.trainers.dpo import collate_pairs

from .config import PipelineConfig
from .context import StageRun


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    with StageRun("dpo", config, parent_dir, out_dir) as stage:
        model, tok = stage.load_policy()
        # Loaded only if its log-probs are not cached for these weights, and let go once they are computed.
        stage.train(stage.trainer(model, tok, collate_pairs, ref_model=stage.reference_loader(model),
                                  ref_weights_id=stage.reference_weights_id(), dpo=config.dpo), tok)
    return stage.result
