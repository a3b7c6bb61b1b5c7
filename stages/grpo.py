"""GRPO on prompts with verifiable answers; the policy samples with the KV-cached `generate`,
the parent checkpoint (loaded again) is the frozen KL reference when beta > 0."""
from __future__ import annotations

from pathlib import Path

from models import generate
from trainers.grpo import GRPOTrainer, collate_prompts

from . import common, handoff
from .config import PipelineConfig


def run(config: PipelineConfig, parent_dir: str | Path, out_dir: str | Path) -> dict | None:
    stage = common.begin("grpo", config, parent_dir, out_dir)
    model, tok, _ = handoff.load_stage(stage.parent_dir, stage.device)
    c = config.grpo
    reference = handoff.load_stage(stage.parent_dir, stage.device)[0] if c.beta > 0 else None
    train, val = (common.load_data(stage, "grpo", tok, split) for split in ("train", "val"))
    trainer = GRPOTrainer(
        model=model, ref_model=reference, optimizer=common.optimizer_for(model, stage),
        **common.loaders(stage, train, val, lambda items: collate_prompts(items, tok.pad_id)),
        reward_funcs=c.reward_funcs, reward_weights=c.reward_weights, generate_fn=generate, tokenizer=tok,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, num_generations=c.num_generations,
        max_completion_length=c.max_completion_length, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
        epsilon=c.epsilon, epsilon_high=c.epsilon_high, beta=c.beta, loss_type=c.loss_type,
        num_iterations=c.num_iterations, scale_rewards=c.scale_rewards, **common.trainer_kwargs(stage))
    return common.train_and_finish(stage, trainer, tok)
