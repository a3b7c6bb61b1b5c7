"""GRPO on prompts with verifiable answers: the policy samples through `models.generate_text`,
and the parent checkpoint, loaded again, is the frozen KL reference when beta > 0."""
from __future__ import annotations

from pathlib import Path

from models import generate_text
from trainers.grpo import collate_prompts

from .config import PipelineConfig
from .context import StageRun


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    with StageRun("grpo", config, parent_dir, out_dir) as stage:
        model, tok = stage.load_parent()
        reference = stage.load_parent()[0] if config.grpo.beta > 0 else None
        trainer = stage.trainer(model, tok, collate_prompts, ref_model=reference, grpo=config.grpo,
                                generate_fn=generate_text, tokenizer=tok)
        stage.train(trainer, tok)
    return stage.result
