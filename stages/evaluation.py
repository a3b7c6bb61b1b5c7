"""Evaluation of a stage's model on the `eval` section's sets: the same prompts and settings for
every stage, so the numbers compare across the pipeline. Each set's prompts are generated
greedily (exact-match accuracy against `answer`, the reward, the format rate, the completion
length) and sampled (the mean reward over `samples` seeded completions per prompt: the quantity
GRPO maximises, so it shows a policy growing surer of right answers even where the greedy
answer is unchanged). Completions are scored by trainers.rewards' `Rewards`, as GRPO's are.
When a stage is evaluated and where the numbers are kept: stages/eval_record.py."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from alignflow.models import Tokenizer, generate_text
from alignflow.trainers import unwrap
from alignflow.trainers.rewards import Rewards

from . import data
from .algorithm import algorithms
from .formats import EVAL_PROMPTS, PROMPTS
from .settings import DEMO_SET, DataConfig

if TYPE_CHECKING:
    from .settings import EvalSet

log = logging.getLogger("alignflow.stage")
BATCH = 32  # prompts generated together
ACCURACY = Rewards(["exact_match"])  # the greedy completion's final answer equals `answer`
NOT_SCORED = ("prompt", "prompt_input_ids")  # every other column goes to the reward functions
# A set's metrics in the order the report shows them, with their labels; the first it has is
# its headline (the report's chart).
METRICS = (("accuracy", "accuracy"), ("sampled_reward", "reward (sampled)"), ("greedy_reward", "reward (greedy)"),
           ("format_rate", "format rate"), ("completion_tokens", "completion length"))
RATES = ("accuracy", "format_rate")  # shown as percentages of the set's prompts


def is_evaluated(config, stage: str, tok: Tokenizer) -> bool:
    """`eval.stages` names the stages evaluated; by default every one, and a first stage such as
    pretraining only when its tokenizer has a chat template to render a conversation's prompt. A
    stage whose model scores instead of generating (rm) never is: its numbers are its validation's."""
    if algorithms()[stage].scores:
        return False
    if config.eval.stages is not None:
        return stage in config.eval.stages
    return algorithms()[stage].parent is not None or bool(getattr(tok, "chat_template", None))


def stage_sets(config, stage: str) -> list[EvalSet]:
    """The sets `stage` is evaluated on: `eval.sets`; without them, the demo's held-out prompts on
    stages trained on demo data (the demo's arithmetic says nothing about a model trained on the
    user's own data)."""
    ev = config.eval
    if ev.sets is None and config.stage(stage).data.source != DEMO_SET:
        return []
    return ev.resolved_sets()


def evaluate_sets(config, stage: str, model: torch.nn.Module, tok: Tokenizer) -> dict[str, dict]:
    """{set name: its metrics} for every set `stage` is evaluated on (is_evaluated: checked by the caller)."""
    out = {}
    for s in stage_sets(config, stage):
        started = time.perf_counter()
        out[s.name] = evaluate_set(s, config.demo, model, tok)
        seconds = time.perf_counter() - started
        out[s.name]["seconds"] = round(seconds, 3)
        shown = ", ".join(f"{label} {out[s.name][key]:.4g}" for key, label in METRICS if key in out[s.name])
        log.info(f"{stage} eval {s.name}: {shown} ({out[s.name]['prompts']} prompts, {seconds:.1f} s)")
    return out


def set_rows(s: EvalSet, demo_cfg, tok: Tokenizer) -> list[dict]:
    """A set's first `max_prompts` rows, tokenised: the demo's held-out prompts, or its file's
    rows (checked at config load, stages.settings.eval_set_columns)."""
    if s.source == DEMO_SET:
        # Drawn as the held-out split of a stage named "eval": the same prompts for every stage.
        loaded = data.prepare("eval", EVAL_PROMPTS, DataConfig(max_length=1 << 20), demo_cfg, tok, "val")
    else:
        cfg = DataConfig(source=s.source, val_fraction=0.0, max_length=1 << 20)
        loaded = data.prepare(f"eval set {s.name}", PROMPTS, cfg, demo_cfg, tok, "train")
    ds = loaded.dataset
    return [ds[i] for i in range(min(len(ds), s.max_prompts))]


def evaluate_set(s: EvalSet, demo_cfg, model: torch.nn.Module, tok: Tokenizer) -> dict:
    """One set's metrics (see the module's docstring) and its first five greedy samples."""
    rows = set_rows(s, demo_cfg, tok)
    model = unwrap(model)
    rewards = Rewards(s.reward_funcs, s.reward_weights)
    has_answer = bool(rows) and "answer" in rows[0]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(demo_cfg.seed)
    hits, formatted, greedy, sampled, lengths, samples = [], [], [], [], [], []
    for start in range(0, len(rows), BATCH):
        batch = rows[start:start + BATCH]
        out = generate_text(model, tok, [r["prompt_input_ids"] for r in batch], s.max_new_tokens)
        scores = _scores(rewards, batch, out.texts)
        greedy += rewards.total(scores).tolist()
        if has_answer:  # no answer to match in a row: a miss
            hits += _scores(ACCURACY, batch, out.texts)[:, 0].nan_to_num(0.0).tolist()
        if "format" in rewards.names:
            formatted += scores[:, rewards.names.index("format")].nan_to_num(0.0).tolist()
        lengths += out.completion_mask.sum(1).tolist()
        samples += [{"prompt": r["prompt"], "completion": c, **({"answer": r["answer"]} if has_answer else {})}
                    for r, c in zip(batch, out.texts)]
        repeated = [r for r in batch for _ in range(s.samples)]
        if repeated:
            drawn = generate_text(model, tok, [r["prompt_input_ids"] for r in repeated], s.max_new_tokens,
                                  temperature=s.temperature, generator=generator).texts
            sampled += rewards.total(_scores(rewards, repeated, drawn)).tolist()
    n = max(len(rows), 1)
    metrics = {"prompts": len(rows), "greedy_reward": sum(greedy) / n,
               "completion_tokens": sum(lengths) / n, "samples": samples[:5]}
    if has_answer:
        metrics["accuracy"] = sum(hits) / n
    if formatted:
        metrics["format_rate"] = sum(formatted) / n
    if sampled:
        metrics["sampled_reward"] = sum(sampled) / len(sampled)
    return metrics


def _scores(rewards: Rewards, rows: list[dict], completions: list[str]) -> torch.Tensor:
    columns = {c: [r[c] for r in rows] for c in rows[0] if c not in NOT_SCORED} if rows else {}
    return rewards.score([r["prompt"] for r in rows], completions, columns)
