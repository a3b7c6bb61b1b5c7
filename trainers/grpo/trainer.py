"""The GRPO trainer (docs/algorithms.md).

One trainer step is one generation round: every prompt batch of the step (one per
accumulation step) gets `num_generations` sampled completions per prompt, which are scored,
turned into group-relative advantages, and then optimised `num_iterations` times with
BaseTrainer's accumulation, clipping, AMP and DDP. The optimizer and the LR scheduler step once
per update, so a scheduler built for N trainer steps needs `total_steps = N * num_iterations`.

Generation is injected (`generate_fn`, with `models.generate_text`'s signature: prompt ids in,
a `Generation` with completion ids, masks and texts out) and so is the tokenizer it decodes
with: trainers stay model-agnostic. A `generate_fn` that has `sync(model, version)` (an inference
engine, stages/vllm_rollouts.py) is given the policy before every rollout of a new version, and
the log-probs it sampled with (`Generation.logps`) weigh the loss by truncated importance
sampling (`rollout.tis_cap`). Advantages are computed per prompt batch on each rank (a
group never spans ranks), so scale_rewards="batch" uses the std of that prompt batch's B·G
rewards."""
from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from .. import distributed as dist_utils
from ..args import Settings
from ..base import BaseTrainer
from ..modules import unwrap
from ..placement import place_reference
from ..rewards import DEFAULT_REWARDS, Rewards, resolve_reward_weights
from .loss import (Advantage, GRPOLossType, ImportanceSamplingLevel, ScaleRewards, group_advantages, grpo_loss,
                   loss_items, truncated_is_weights)
from .rollout import PROMPT_KEYS, completion_logps, repeat_each


DEFAULT_TIS_CAP = 3.0  # TRL's vllm_importance_sampling_cap


class RolloutArgs(Settings):
    """Who samples the rollouts, and how the loss corrects for a sampler that is not the trainer."""
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: the policy itself generates (models.generate); vllm: a vLLM server whose weights follow "
                          "the policy every step (stages/vllm_rollouts.py, the stage's rollout.vllm section)")
    tis_cap: float | Literal["off"] | None = Field(
        None, description="truncated importance sampling: each token's loss times min(π_train/π_engine, tis_cap), "
                          "π_engine the engine's own sampling probability, for the gap between the engine's "
                          f"numerics and the trainer's; default {DEFAULT_TIS_CAP:g} with an engine, none with hf; "
                          "off: no correction")

    @field_validator("tis_cap")
    @classmethod
    def _positive(cls, value):
        if isinstance(value, float) and value <= 0:
            raise ValueError(f"tis_cap must be > 0 (or off), got {value:g}")
        return value

    @model_validator(mode="after")
    def _an_engine_to_correct(self) -> "RolloutArgs":
        if self.engine == "hf" and isinstance(self.tis_cap, float):
            raise ValueError("tis_cap corrects an inference engine's sampling; engine hf samples with the trained "
                             "policy itself (set engine: vllm, or drop tis_cap)")
        return self

    @property
    def resolved_tis_cap(self) -> float | None:
        if self.tis_cap == "off" or self.engine == "hf":
            return None
        return DEFAULT_TIS_CAP if self.tis_cap is None else self.tis_cap


class GRPOArgs(Settings):
    """GRPO's own settings (the loop's are `TrainingArgs`)."""
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (a group)")
    max_completion_length: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs divide logits by it too")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    beta: float = Field(0.04, ge=0, description="k3 KL penalty towards the reference (0: no reference model)")
    epsilon: float = Field(0.2, ge=0, description="clip range below 1 (unused by loss_type cispo)")
    epsilon_high: float | None = Field(
        None, ge=0, description="clip range above 1 (default: epsilon); loss_type cispo truncates the importance "
                                "weight at 1 + epsilon_high (MiniMax-M1's ε_high; TRL's absolute cap epsilon_high=5 "
                                "is 4 here)")
    loss_type: GRPOLossType = Field(
        "dapo", description="grpo | bnpo | dr_grpo | dapo: how the clipped surrogate is normalised; cispo: the "
                            "detached importance weight, truncated at 1 + epsilon_high, times A·logp (MiniMax-M1), "
                            "normalised as dapo")
    importance_sampling_level: ImportanceSamplingLevel = Field(
        "token", description="token: one ratio per token; sequence: one length-normalised ratio per sequence, the exp "
                             "of its mean token log-ratio, for every token of it (GSPO, which clips with a far "
                             "smaller epsilon, e.g. 3e-4/4e-4, and normalises as loss_type grpo)")
    num_iterations: int = Field(1, ge=1, description="updates per generation round")
    advantage: Advantage = Field(
        "group", description="group: r − the group's mean (GRPO); rloo: r − the mean of the group's other G−1 rewards "
                             "(RLOO's leave-one-out baseline, G/(G−1) times group's); either divided by the std "
                             "scale_rewards names (none: the plain RLOO estimator)")
    scale_rewards: ScaleRewards = "group"
    reward_funcs: list[str] = Field(DEFAULT_REWARDS, description="registered reward names ([]: only the callables "
                                                                 "given to the trainer, e.g. reward models, score)")
    reward_weights: list[float] | None = None
    rollout: RolloutArgs = Field(RolloutArgs(), description="who samples the rollouts (hf or a vLLM server) and "
                                                            "the importance-sampling correction")

    @model_validator(mode="after")
    def _weights_match(self) -> "GRPOArgs":
        if self.reward_funcs or self.reward_weights is not None:
            resolve_reward_weights(self.reward_funcs, self.reward_weights)
        return self


class GRPOTrainer(BaseTrainer):
    """GRPO on prompt batches (see `collate_prompts`); see the module docstring for a step.

    Settings: `grpo` (a `GRPOArgs`) or its fields as keywords. `ref_model` is None exactly when
    beta == 0; otherwise it is frozen and kept out of DDP and the optimizer. `reward_funcs` /
    `reward_weights`, when given, replace the settings' names and may hold callables.
    `epsilon_high` defaults to `epsilon` (DAPO's clip-higher sets it larger)."""

    progress_metrics = (("reward", "reward"), ("kl", "kl"))

    def __init__(self, model: nn.Module, ref_model: nn.Module | None, optimizer, train_loader,
                 reward_funcs=None, reward_weights=None, *, generate_fn, tokenizer, grpo: GRPOArgs | None = None,
                 **kwargs):
        self.grpo = args = GRPOArgs.build(grpo, **GRPOArgs.take(kwargs))
        if (ref_model is None) != (args.beta == 0):
            raise ValueError(f"ref_model must be given exactly when beta != 0 (beta={args.beta}, "
                             f"ref_model {'missing' if ref_model is None else 'given'})")
        super().__init__(model, optimizer, train_loader, **kwargs)

        self.ref_model = place_reference(ref_model, self.args, self.device) if ref_model is not None else None
        self.rewards = Rewards(args.reward_funcs if reward_funcs is None else list(reward_funcs),
                               args.reward_weights if reward_weights is None else reward_weights)
        self.generate_fn, self.tokenizer = generate_fn, tokenizer
        self.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        self.updates_per_step = args.num_iterations
        # Counts this process's optimizer updates: an engine holding another version's weights is synced.
        self.policy_version = 0

    # ---- BaseTrainer hooks, on rollout batches ----

    def count_items(self, batch: dict) -> int:
        return loss_items(batch["completion_mask"], self.grpo.loss_type, self.grpo.max_completion_length)

    def compute_loss(self, model, batch):
        g = self.grpo
        logps, entropy = completion_logps(model, batch, g.temperature, with_entropy=True)
        # With a single update the rollouts were sampled by these very weights: ρ is exactly 1.
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        mask = batch["completion_mask"].to(logps.dtype)
        tokens = mask.sum()
        tis, engine_metrics = None, {}
        if "engine_logps" in batch:  # sampled by an inference engine: how far its π is from the trainer's
            engine_metrics["engine/logp_gap"] = (((old - batch["engine_logps"]).abs() * mask).sum(), tokens)
            cap = g.rollout.resolved_tis_cap
            if cap is not None:
                tis, capped = truncated_is_weights(old, batch["engine_logps"], cap)
                engine_metrics["engine/tis_weight"] = ((tis * mask).sum(), tokens)
                engine_metrics["engine/tis_capped"] = ((capped * mask).sum(), tokens)
        # num_items=1: the loss summed in `loss_items` units; the trainer divides by the step's total.
        loss, stats = grpo_loss(logps, old, batch.get("ref_logps"), batch["advantages"], batch["completion_mask"],
                                g.epsilon, self.epsilon_high, g.beta, g.loss_type, g.max_completion_length, num_items=1,
                                importance_sampling_level=g.importance_sampling_level, tis_weights=tis)
        # Per-token means whatever the loss's unit: (sum, tokens) pairs, reduced over the step.
        metrics = {k: (v * tokens, tokens) for k, v in stats.items()} | engine_metrics
        metrics["entropy"] = ((entropy * mask).sum(), tokens)
        return loss, metrics

    # ---- one step: generate, score, optimise ----

    def training_step(self, micro: list[dict]) -> dict[str, float]:
        """One generation round over the step's prompt batches, then num_iterations updates.

        Returns the rollout metrics and the last update's optimisation metrics (loss, kl,
        clip ratios...: the first update of a round has ρ = 1, so it never clips)."""
        start = self._clock()
        generator = torch.Generator(device=self.device)
        # Seeded from the torch RNG, which checkpoints save: a resumed run samples the same
        # completions. Ranks add their rank so they do not sample in lockstep.
        generator.manual_seed(int(torch.randint(0, 2**62, ())) + self.dist.rank)
        self._sync_engine()
        # Generation time includes an engine's weight sync: the price of generating elsewhere.
        rollouts, records, gen_seconds = [], [], self._clock() - start
        for batch in micro:
            rollout, record, seconds = self._rollout(batch, generator)
            rollouts.append(rollout)
            records.append(record)
            gen_seconds += seconds
        scored = self._clock()
        for _ in range(self.grpo.num_iterations):
            metrics = super().training_step(rollouts)
            self.policy_version += 1
        end = self._clock()
        metrics.update(self._rollout_metrics(records, {
            "generation": gen_seconds, "scoring": scored - start - gen_seconds, "optimization": end - scored}))
        return metrics

    def _rollout(self, batch: dict, generator: torch.Generator) -> tuple[dict, dict, float]:
        """Sample and score one prompt batch and add the log-probs the updates compare against:
        (rollout batch, per-row record for the metrics, generation seconds)."""
        g = self.grpo
        t0 = self._clock()
        generation = self._generate(batch, g.num_generations, g.temperature, generator)
        gen_seconds = self._clock() - t0
        mask = generation.completion_mask
        per_function = self._score(batch, generation.texts, g.num_generations)
        rewards = self.rewards.total(per_function)
        rollout = {
            "input_ids": generation.sequences,
            "attention_mask": torch.cat([generation.prompt_mask, mask], dim=1),
            "completion_mask": mask,
            "advantages": group_advantages(rewards, g.num_generations, g.scale_rewards, g.advantage).to(self.device),
        }
        if generation.logps is not None:
            rollout["engine_logps"] = generation.logps
        policy = unwrap(self.model)
        with torch.no_grad(), self.autocast():
            if g.num_iterations > 1:  # later updates need the sampling policy's log-probs
                rollout["old_logps"] = completion_logps(policy, rollout, g.temperature)[0]
            if self.ref_model is not None:
                rollout["ref_logps"] = completion_logps(self.ref_model, rollout, g.temperature)[0]
        record = {"rewards": rewards, "per_function": per_function, "lengths": mask.sum(-1).cpu(),
                  "truncated": ~generation.ended.cpu()}
        return rollout, record, gen_seconds

    def _sync_engine(self) -> None:
        """An inference engine (a `generate_fn` with `sync`) gets the policy's weights unless it
        holds this version already: before the first rollout (the parent, or a resumed
        checkpoint) and after every update."""
        if hasattr(self.generate_fn, "sync"):
            with self.unsharded():
                self.generate_fn.sync(unwrap(self.model), self.policy_version)

    def _generate(self, batch: dict, repeats: int, temperature: float, generator: torch.Generator | None):
        """Each prompt `repeats` times in a row, through the injected `generate_fn`."""
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        with self.autocast(), self.unsharded():
            return self.generate_fn(unwrap(self.model), self.tokenizer, repeat_each(prompts, repeats),
                                    max_new_tokens=self.grpo.max_completion_length, temperature=temperature,
                                    top_k=self.grpo.top_k, top_p=self.grpo.top_p, generator=generator)

    def _score(self, batch: dict, texts: list[str], repeats: int) -> torch.Tensor:
        """Rewards [N, F] of each reward function for the completions of a batch's prompts, each
        prompt's columns repeated for its `repeats` completions (NaN where a function abstains)."""
        if "prompt" in batch:
            prompts = list(batch["prompt"])
        else:
            prompts = [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                       for row, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        columns = {k: repeat_each(v, repeats) for k, v in batch.items() if k not in PROMPT_KEYS}
        return self.rewards.score(repeat_each(prompts, repeats), texts, columns)

    # ---- metrics ----

    def _clock(self) -> float:
        if self.device.type == "cuda":  # kernels run asynchronously; time what they did
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _per_function_sums(self, per_function: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each reward function's sum and count over the rows it applies to, named for the reduction."""
        applies = ~per_function.isnan()
        out = {}
        for i, name in enumerate(self.rewards.names):
            out[f"{name}/sum"], out[f"{name}/count"] = per_function[:, i].nansum(), applies[:, i].sum()
        return out

    def _per_function_means(self, totals: dict[str, float], prefix: str) -> dict[str, float]:
        return {f"{prefix}/{name}": totals[f"{name}/sum"] / totals[f"{name}/count"] if totals[f"{name}/count"]
                else math.nan for name in self.rewards.names}

    def _rollout_metrics(self, records: list[dict], seconds: dict[str, float]) -> dict[str, float]:
        """Reward, completion-length and timing metrics of the step, over all ranks."""
        rewards = torch.cat([r["rewards"] for r in records]).double()
        per_function = torch.cat([r["per_function"] for r in records]).double()
        lengths = torch.cat([r["lengths"] for r in records]).double()
        group_std = rewards.view(-1, self.grpo.num_generations).std(dim=1)
        t = dist_utils.sum_over_ranks({
            "reward": rewards.sum(), "reward_squared": rewards.square().sum(), "rows": rewards.numel(),
            "groups": group_std.numel(), "groups_zero_std": (group_std < 1e-6).sum(),
            "tokens": lengths.sum(), "truncated": torch.cat([r["truncated"] for r in records]).sum(),
            **seconds, **self._per_function_sums(per_function)}, self.device)
        longest, neg_shortest = dist_utils.all_reduce_max(
            torch.stack([lengths.max(), -lengths.min()]).to(self.device)).tolist()
        n, total_s = t["rows"], t["generation"] + t["scoring"] + t["optimization"]
        return {
            "reward": t["reward"] / n,
            "reward_std": math.sqrt(max(t["reward_squared"] - t["reward"] ** 2 / n, 0.0) / max(n - 1, 1)),
            "frac_reward_zero_std": t["groups_zero_std"] / t["groups"],
            "completion_length/mean": t["tokens"] / n,
            "completion_length/min": -neg_shortest,
            "completion_length/max": longest,
            "completion_length/truncated": t["truncated"] / n,
            # Summed rank seconds: tokens over the average rank's generation time.
            "generation/tokens_per_s": t["tokens"] / max(t["generation"] / self.dist.world_size, 1e-9),
            "time/generation_share": t["generation"] / total_s,
            "time/scoring_share": t["scoring"] / total_s,
            "time/optimization_share": t["optimization"] / total_s,
            **self._per_function_means(t, "rewards"),
        }

    # ---- evaluation ----

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of one greedy completion per validation prompt, over all ranks.

        Greedy decoding makes the number a property of the weights, not of the sampler's luck,
        so successive evaluations (and early stopping on val_reward, mode "max") compare."""
        if self.val_loader is None:
            return {}
        self._sync_engine()
        scores = [self._score(batch, self._generate(batch, 1, 0.0, None).texts, 1) for batch in self.val_loader]
        per_function = torch.cat(scores).double()
        rewards = self.rewards.total(per_function)
        t = dist_utils.sum_over_ranks({"reward": rewards.sum(), "rows": rewards.numel(),
                                       **self._per_function_sums(per_function)}, self.device)
        return {"val_reward": t["reward"] / max(t["rows"], 1.0), **self._per_function_means(t, "val_rewards")}
