"""Held-out evaluation of a stage's model: the same prompts and settings for every stage, so
the numbers compare. Its settings are the config's `eval` section, part of every stage's cache
key (stages.config.SHARED_KEYS)."""
from __future__ import annotations

import torch

from alignflow.models import Tokenizer, generate_text
from alignflow.trainers import unwrap
from alignflow.trainers.rewards import get_reward, resolve_reward_weights

from . import data as data_mod
from .config import DataConfig, PipelineConfig

BATCH = 32  # prompts generated together


def _score(fns, weights, rows: list[dict], completions: list[str]) -> list[float]:
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    per_fn = [fn(prompts, completions, answer=answers) for fn in fns]
    return [sum(w * (v or 0.0) for w, v in zip(weights, values)) for values in zip(*per_fn)]


def heldout_metrics(config: PipelineConfig, data_cfg: DataConfig, model: torch.nn.Module, tok: Tokenizer) -> dict:
    """Task metrics on the demo's held-out prompts. Greedy decoding gives exact-match accuracy,
    format rate and the greedy reward; the held-out reward is the `eval` reward (by default
    GRPO's functions) averaged over `eval.reward_samples` seeded samples per prompt at
    `eval.temperature` -- the quantity GRPO maximises, so it shows a policy growing surer of
    right answers even where the greedy answer is unchanged. User data without answers gets no
    task metrics."""
    if data_cfg.source != "demo":
        return {}
    ev = config.eval
    loaded = data_mod.prepare("eval", data_cfg, config.demo, tok, "val")
    ds = loaded.dataset.select(range(min(len(loaded.dataset), ev.max_prompts)))
    model = unwrap(model)
    reward_fns = [get_reward(name) for name in ev.reward_funcs]
    weights = resolve_reward_weights(ev.reward_funcs, ev.reward_weights)
    exact, fmt = [get_reward("exact_match")], [get_reward("format")]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.demo.seed)
    hits, formatted, greedy, sampled, samples = [], [], [], [], []
    for start in range(0, len(ds), BATCH):
        rows = [ds[i] for i in range(start, min(start + BATCH, len(ds)))]
        completions = generate_text(model, tok, [r["prompt_input_ids"] for r in rows], ev.max_new_tokens).texts
        hits += _score(exact, [1.0], rows, completions)
        formatted += _score(fmt, [1.0], rows, completions)
        greedy += _score(reward_fns, weights, rows, completions)
        samples += [{"prompt": r["prompt"], "completion": c, "answer": r["answer"]} for r, c in zip(rows, completions)]
        repeated = [r for r in rows for _ in range(ev.reward_samples)]
        if repeated:
            drawn = generate_text(model, tok, [r["prompt_input_ids"] for r in repeated], ev.max_new_tokens,
                                  temperature=ev.temperature, generator=generator).texts
            sampled += _score(reward_fns, weights, repeated, drawn)
    n = max(len(hits), 1)
    return {"task_accuracy": sum(hits) / n, "format_rate": sum(formatted) / n, "greedy_reward": sum(greedy) / n,
            "heldout_reward": sum(sampled) / len(sampled) if sampled else sum(greedy) / n,
            "eval_prompts": len(hits), "samples": samples[:5]}
