"""Held-out evaluation of a stage's model: the same prompts and settings for every stage, so the
numbers compare. Its settings are the config's `eval` section, part of every stage's cache key
(stages.settings.SHARED_KEYS); completions are scored by trainers.rewards' `Rewards`, as GRPO's
are."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from alignflow.models import Tokenizer, generate_text
from alignflow.trainers import unwrap
from alignflow.trainers.rewards import Rewards

from . import data
from .algorithm import Headline
from .formats import EVAL_PROMPTS

if TYPE_CHECKING:
    from .settings import DataConfig

BATCH = 32  # prompts generated together
# The report card's rows of these numbers, for every stage (after the algorithms' own).
HEADLINE = (Headline("task accuracy", "task_accuracy", cases="eval_prompts"),
            Headline("format rate", "format_rate", cases="eval_prompts"),
            Headline("held-out reward", "heldout_reward"))
TASK = Rewards(["exact_match", "format"])  # a right answer; the answer line's format


def heldout_metrics(config, data_cfg: DataConfig, model: torch.nn.Module, tok: Tokenizer) -> dict:
    """Task metrics on the demo's held-out prompts. Greedy decoding gives exact-match accuracy,
    format rate and the greedy reward; the held-out reward is the `eval` reward (by default
    GRPO's functions) averaged over `eval.reward_samples` seeded samples per prompt at
    `eval.temperature` -- the quantity GRPO maximises, so it shows a policy growing surer of
    right answers even where the greedy answer is unchanged. User data without answers gets no
    task metrics."""
    if data_cfg.source != "demo":
        return {}
    ev = config.eval
    loaded = data.prepare("eval", EVAL_PROMPTS, data_cfg, config.demo, tok, "val")
    ds = loaded.dataset.select(range(min(len(loaded.dataset), ev.max_prompts)))
    model = unwrap(model)
    rewards = Rewards(ev.reward_funcs, ev.reward_weights)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.demo.seed)
    task, greedy, sampled, samples = [], [], [], []
    for start in range(0, len(ds), BATCH):
        rows = [ds[i] for i in range(start, min(start + BATCH, len(ds)))]
        completions = generate_text(model, tok, [r["prompt_input_ids"] for r in rows], ev.max_new_tokens).texts
        task.append(_scores(TASK, rows, completions).nan_to_num(0.0))  # no answer to match: a miss
        greedy += rewards.total(_scores(rewards, rows, completions)).tolist()
        samples += [{"prompt": r["prompt"], "completion": c, "answer": r["answer"]} for r, c in zip(rows, completions)]
        repeated = [r for r in rows for _ in range(ev.reward_samples)]
        if repeated:
            drawn = generate_text(model, tok, [r["prompt_input_ids"] for r in repeated], ev.max_new_tokens,
                                  temperature=ev.temperature, generator=generator).texts
            sampled += rewards.total(_scores(rewards, repeated, drawn)).tolist()
    hits, formatted = torch.cat(task).double().sum(0).tolist() if task else (0.0, 0.0)
    n = max(len(ds), 1)
    return {"task_accuracy": hits / n, "format_rate": formatted / n, "greedy_reward": sum(greedy) / n,
            "heldout_reward": sum(sampled) / len(sampled) if sampled else sum(greedy) / n,
            "eval_prompts": len(ds), "samples": samples[:5]}


def _scores(rewards: Rewards, rows: list[dict], completions: list[str]) -> torch.Tensor:
    return rewards.score([r["prompt"] for r in rows], completions, {"answer": [r["answer"] for r in rows]})
