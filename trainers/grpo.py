"""Group Relative Policy Optimization (docs/algorithms.md).

One trainer step is one generation round: every prompt batch of the step (one per
accumulation step) gets `num_generations` sampled completions per prompt, which are scored,
turned into group-relative advantages, and then optimised `num_iterations` times with
BaseTrainer's accumulation, clipping, AMP and DDP. The optimizer and the LR scheduler step once
per update, so a scheduler built for N trainer steps needs `total_steps = N * num_iterations`.

Generation is injected (`generate_fn`, with `models.generate_text`'s signature: prompt ids in,
a `Generation` with completion ids, masks and texts out) and so is the tokenizer it decodes
with: trainers stay model-agnostic.

Rollout batches, one per prompt batch, hold B·G rows of prompt + completion:
    input_ids [N, P+T], attention_mask [N, P+T], completion_mask [N, T] (1 up to and including
    the first EOS), advantages [N], and when needed old_logps / ref_logps [N, T].
Advantages are computed per prompt batch on each rank (a group never spans ranks), so
scale_rewards="batch" uses the std of that prompt batch's B·G rewards.
"""
from __future__ import annotations

import math
import time
from typing import Literal, get_args

import torch
from pydantic import Field, model_validator
from torch import nn

from . import distributed as dist_utils
from .args import Settings
from .base import BaseTrainer
from .logprobs import IGNORE_INDEX, token_entropy, token_logps
from .modules import logits_of, unwrap
from .rewards import DEFAULT_REWARDS, get_reward, resolve_reward_weights, reward_name

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES, SCALE_REWARDS = get_args(GRPOLossType), get_args(ScaleRewards)
PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask", "prompt")


class GRPOArgs(Settings):
    """GRPO's own settings (the loop's are `TrainingArgs`)."""
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (a group)")
    max_completion_length: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs divide logits by it too")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    beta: float = Field(0.04, ge=0, description="k3 KL penalty towards the reference (0: no reference model)")
    epsilon: float = Field(0.2, ge=0, description="clip range below 1")
    epsilon_high: float | None = Field(None, ge=0, description="clip range above 1 (default: epsilon)")
    loss_type: GRPOLossType = "dapo"
    num_iterations: int = Field(1, ge=1, description="updates per generation round")
    scale_rewards: ScaleRewards = "group"
    reward_funcs: list[str] = Field(DEFAULT_REWARDS, min_length=1, description="registered reward names")
    reward_weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> "GRPOArgs":
        resolve_reward_weights(self.reward_funcs, self.reward_weights)
        return self


# ---- the maths, as pure functions ----

def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = (r_i − mean of its group) / (std + 1e-4), unbiased std; rewards [N] are laid out
    as consecutive groups of `group_size`. "group" divides by each group's std, "batch" by the
    std of all N rewards, "none" not at all (Dr. GRPO: dividing by the std up-weights
    prompts whose rewards barely vary, the too easy and the too hard)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred.flatten()
    std = groups.std(dim=1, keepdim=True) if scale_rewards == "group" else rewards.std()
    return (centred / (std + 1e-4)).flatten()


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) on tokens sampled from π_θ: unbiased and ≥ 0."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def grpo_token_losses(logps, old_logps, ref_logps, advantages, epsilon_low: float, epsilon_high: float,
                      beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, T] and per-token statistics (clip indicators, KL) for the metrics."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    losses = -torch.min(ratio * adv, clipped * adv)
    # The clip only binds on the side where it lowers the objective: below 1−ε for negative
    # advantages, above 1+ε for positive ones.
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    stats = {"clip_ratio/low": low.float(), "clip_ratio/high": high.float(),
             "clip_ratio/region": (low | high).float()}
    if beta != 0 and ref_logps is not None:
        kl = kl_k3(logps, ref_logps)
        losses = losses + beta * kl
        stats["kl"] = kl.detach()
    return losses, stats


def loss_sum(token_losses: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The batch's loss before normalisation, in the unit `loss_items` counts."""
    masked = token_losses * mask
    if loss_type == "grpo":  # per-sequence token means, summed over sequences
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if loss_type == "bnpo":  # this batch's token mean, one item
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type in ("dr_grpo", "dapo"):
        return masked.sum()
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def loss_items(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> int:
    """How many items `loss_sum` sums over: the batch's normaliser for each loss type."""
    if loss_type == "dapo":
        return int(mask.sum())
    if loss_type == "bnpo":
        return 1
    if loss_type == "grpo":
        return mask.shape[0]
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' normalises by max_completion_length; pass it")
        return mask.shape[0] * max_completion_length
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, beta: float = 0.04, loss_type: str = "dapo",
              max_completion_length: int | None = None, num_items: float | None = None):
    """Clipped surrogate + β·KL (k3), normalised per `loss_type` (docs/algorithms.md).

    Per-token tensors are [B, T] over completion tokens, `advantages` [B]. `num_items`
    overrides the normaliser, in the unit of `loss_items`; for dapo it is the active tokens of
    the whole generation batch (all accumulation steps and ranks) divided by the world size.
    The KL term is skipped when beta == 0 or ref_logps is None.
    Returns (loss, metrics): kl (when computed) and the clip ratios, as means over active tokens.
    """
    mask = completion_mask.to(logps.dtype)
    losses, stats = grpo_token_losses(logps, old_logps, ref_logps, advantages, epsilon_low, epsilon_high, beta)
    denom = num_items if num_items is not None else loss_items(mask, loss_type, max_completion_length)
    loss = loss_sum(losses, mask, loss_type) / denom
    n_tokens = mask.sum().clamp(min=1)
    return loss, {k: (v * mask).sum() / n_tokens for k, v in stats.items()}


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions [N, F] -> [N]; NaN (not applicable) counts as absent."""
    return torch.nansum(per_function * weights, dim=1)


def completion_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits [N, T, V] at the positions that predict the T completion tokens."""
    T = batch["completion_mask"].shape[1]
    mask = batch["attention_mask"]
    # Prompts are left-padded: positions count real tokens only, as in generation (a transformers
    # model would otherwise number them from the padding on).
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions))
    return logits[:, -T - 1:-1]  # position t predicts token t+1


def completion_targets(batch: dict) -> torch.Tensor:
    T = batch["completion_mask"].shape[1]
    return batch["input_ids"][:, -T:].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Prompt batch from dicts {"prompt_input_ids": list[int], **other columns}.

    Prompts are LEFT-padded so every row's completion starts at the same column; the other
    columns (e.g. `prompt` texts, `answer`) stay lists, handed to the reward functions."""
    width = max(len(item["prompt_input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["prompt_input_ids"])
        ids[row, width - n:] = torch.tensor(item["prompt_input_ids"], dtype=torch.long)
        mask[row, width - n:] = 1
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask}
    batch.update({k: [item[k] for item in items] for k in items[0] if k != "prompt_input_ids"})
    return batch


def repeat_each(values, times: int) -> list:
    """[a, b] -> [a, a, b, b] for times=2: the layout of a prompt's generations."""
    return [v for v in values for _ in range(times)]



# ---- the trainer ----

class GRPOTrainer(BaseTrainer):
    """GRPO on prompt batches (see `collate_prompts`); see the module docstring for a step.

    Settings: `grpo` (a `GRPOArgs`) or its fields as keywords. `ref_model` is None exactly when
    beta == 0; otherwise it is frozen and kept out of DDP and the optimizer. `reward_funcs` /
    `reward_weights`, when given, replace the settings' names and may hold callables.
    `epsilon_high` defaults to `epsilon` (DAPO's clip-higher sets it larger)."""

    def __init__(self, model: nn.Module, ref_model: nn.Module | None, optimizer, train_loader,
                 reward_funcs=None, reward_weights=None, *, generate_fn, tokenizer, grpo: GRPOArgs | None = None,
                 **kwargs):
        self.grpo = args = GRPOArgs.build(grpo, **GRPOArgs.take(kwargs))
        if (ref_model is None) != (args.beta == 0):
            raise ValueError(f"ref_model must be given exactly when beta != 0 (beta={args.beta}, "
                             f"ref_model {'missing' if ref_model is None else 'given'})")
        super().__init__(model, optimizer, train_loader, **kwargs)

        self.ref_model = self.frozen_reference(ref_model) if ref_model is not None else None
        funcs = args.reward_funcs if reward_funcs is None else list(reward_funcs)
        self.reward_funcs = [get_reward(f) if isinstance(f, str) else f for f in funcs]
        self.reward_names = [f if isinstance(f, str) else reward_name(f) for f in funcs]
        weights = args.reward_weights if reward_weights is None else reward_weights
        self.reward_weights = torch.tensor(resolve_reward_weights(funcs, weights), dtype=torch.float32)
        self.generate_fn, self.tokenizer = generate_fn, tokenizer
        self.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        self.updates_per_step = args.num_iterations

    # ---- BaseTrainer hooks, on rollout batches ----

    def count_items(self, batch: dict) -> int:
        return loss_items(batch["completion_mask"], self.grpo.loss_type, self.grpo.max_completion_length)

    def compute_loss(self, model, batch):
        g = self.grpo
        logits = completion_logits(model, batch)
        logps = token_logps(logits, completion_targets(batch), g.temperature)
        # With a single update the rollouts were sampled by these very weights: ρ is exactly 1.
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        # num_items=1: the loss summed in `loss_items` units; the trainer divides by the step's total.
        loss, stats = grpo_loss(logps, old, batch.get("ref_logps"), batch["advantages"], batch["completion_mask"],
                                g.epsilon, self.epsilon_high, g.beta, g.loss_type, g.max_completion_length, num_items=1)
        mask = batch["completion_mask"].to(logps.dtype)
        tokens = mask.sum()
        # Per-token means whatever the loss's unit: (sum, tokens) pairs, reduced over the step.
        metrics = {k: (v * tokens, tokens) for k, v in stats.items()}
        with torch.no_grad():
            metrics["entropy"] = ((token_entropy(logits, g.temperature) * mask).sum(), tokens)
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
        rollouts, records, gen_seconds = [], [], 0.0
        for batch in micro:
            rollout, record, seconds = self._rollout(batch, generator)
            rollouts.append(rollout)
            records.append(record)
            gen_seconds += seconds
        scored = self._clock()
        for _ in range(self.grpo.num_iterations):
            metrics = super().training_step(rollouts)
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
        rewards = combine_rewards(per_function, self.reward_weights)
        rollout = {
            "input_ids": generation.sequences,
            "attention_mask": torch.cat([generation.prompt_mask, mask], dim=1),
            "completion_mask": mask,
            "advantages": group_advantages(rewards, g.num_generations, g.scale_rewards).to(self.device),
        }
        policy = unwrap(self.model)
        with torch.no_grad(), self.autocast():
            if g.num_iterations > 1:  # later updates need the sampling policy's log-probs
                rollout["old_logps"] = token_logps(completion_logits(policy, rollout),
                                                   completion_targets(rollout), g.temperature)
            if self.ref_model is not None:
                rollout["ref_logps"] = token_logps(completion_logits(self.ref_model, rollout),
                                                   completion_targets(rollout), g.temperature)
        record = {"rewards": rewards, "per_function": per_function, "lengths": mask.sum(-1).cpu(),
                  "truncated": ~generation.ended.cpu()}
        return rollout, record, gen_seconds

    def _generate(self, batch: dict, repeats: int, temperature: float, generator: torch.Generator | None):
        """Each prompt `repeats` times in a row, through the injected `generate_fn`."""
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        with self.autocast(), self.unsharded():
            return self.generate_fn(unwrap(self.model), self.tokenizer, repeat_each(prompts, repeats),
                                    max_new_tokens=self.grpo.max_completion_length, temperature=temperature,
                                    top_k=self.grpo.top_k, top_p=self.grpo.top_p, generator=generator)

    def _score(self, batch: dict, texts: list[str], repeats: int) -> torch.Tensor:
        """Rewards [N, F] of each reward function, NaN where a function returned None."""
        if "prompt" in batch:
            prompts = list(batch["prompt"])
        else:
            prompts = [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                       for row, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        columns = {k: repeat_each(v, repeats) for k, v in batch.items() if k not in PROMPT_KEYS}
        prompts = repeat_each(prompts, repeats)
        scores = []
        for fn, name in zip(self.reward_funcs, self.reward_names):
            values = fn(prompts, texts, **columns)
            if len(values) != len(texts):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(texts)} completions")
            scores.append([math.nan if v is None else float(v) for v in values])
        return torch.tensor(scores, dtype=torch.float32).T

    # ---- metrics ----

    def _clock(self) -> float:
        if self.device.type == "cuda":  # kernels run asynchronously; time what they did
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _rollout_metrics(self, records: list[dict], seconds: dict[str, float]) -> dict[str, float]:
        """Reward, completion-length and timing metrics of the step, over all ranks."""
        rewards = torch.cat([r["rewards"] for r in records]).double()
        per_function = torch.cat([r["per_function"] for r in records]).double()
        lengths = torch.cat([r["lengths"] for r in records]).double()
        truncated = torch.cat([r["truncated"] for r in records]).double()
        group_std = rewards.view(-1, self.grpo.num_generations).std(dim=1)
        applicable = ~per_function.isnan()
        totals = [rewards.sum(), rewards.square().sum(), rewards.numel(), (group_std < 1e-6).sum(),
                  group_std.numel(), lengths.sum(), truncated.sum(),
                  seconds["generation"], seconds["scoring"], seconds["optimization"]]
        sums = torch.cat([torch.tensor([float(v) for v in totals], dtype=torch.float64),
                          per_function.nansum(dim=0), applicable.sum(dim=0).double()]).to(self.device)
        (r_sum, r_sq, n, zero_std, groups, len_sum, n_truncated, gen_s, score_s, opt_s,
         *per_fn) = dist_utils.all_reduce_sum(sums).tolist()
        longest, neg_shortest = dist_utils.all_reduce_max(
            torch.stack([lengths.max(), -lengths.min()]).to(self.device)).tolist()
        total_s = gen_s + score_s + opt_s
        F = len(self.reward_names)
        out = {
            "reward": r_sum / n,
            "reward_std": math.sqrt(max(r_sq - r_sum ** 2 / n, 0.0) / max(n - 1, 1)),
            "frac_reward_zero_std": zero_std / groups,
            "completion_length/mean": len_sum / n,
            "completion_length/min": -neg_shortest,
            "completion_length/max": longest,
            "completion_length/truncated": n_truncated / n,
            # Summed rank seconds: tokens over the average rank's generation time.
            "generation/tokens_per_s": len_sum / max(gen_s / self.dist.world_size, 1e-9),
            "time/generation_share": gen_s / total_s,
            "time/scoring_share": score_s / total_s,
            "time/optimization_share": opt_s / total_s,
        }
        for name, total, count in zip(self.reward_names, per_fn[:F], per_fn[F:]):
            out[f"rewards/{name}"] = total / count if count else math.nan
        return out

    # ---- evaluation ----

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of one greedy completion per validation prompt, over all ranks.

        Greedy decoding makes the number a property of the weights, not of the sampler's luck,
        so successive evaluations (and early stopping on val_reward, mode "max") compare."""
        if self.val_loader is None:
            return {}
        scores = []
        for batch in self.val_loader:
            scores.append(self._score(batch, self._generate(batch, 1, 0.0, None).texts, 1))
        per_function = torch.cat(scores).double()
        rewards = combine_rewards(per_function, self.reward_weights.double())
        packed = torch.cat([torch.tensor([float(rewards.sum()), rewards.numel()], dtype=torch.float64),
                            per_function.nansum(dim=0), (~per_function.isnan()).sum(dim=0).double()])
        total, n, *per_fn = dist_utils.all_reduce_sum(packed.to(self.device)).tolist()
        F = len(self.reward_names)
        result = {"val_reward": total / max(n, 1.0)}
        for name, s, count in zip(self.reward_names, per_fn[:F], per_fn[F:]):
            result[f"val_rewards/{name}"] = s / count if count else math.nan
        return result
