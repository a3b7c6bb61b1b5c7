"""The DPO trainer: preference pairs in, `dpo_loss` on the policy's and the reference's sequence
log-probs, one pair per item of the loss normalisation (docs/algorithms.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pydantic import Field, field_validator, model_validator
from torch import nn

from ..args import Settings
from ..base import BaseTrainer
from ..placement import place_reference
from .loss import DPOLossType, check_loss_config, dpo_loss, loss_types
from .pairs import SIDES, concatenated_logps, preference_metrics
from .reference import DPOReference


class DPOArgs(Settings):
    """DPO's own settings (the loop's are `TrainingArgs`)."""
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    loss_type: DPOLossType | list[DPOLossType] = Field(
        "sigmoid", description="one loss, or a list whose losses are summed with loss_weights (e.g. MPO: "
                               "[sigmoid, bco_pair, sft])")
    loss_weights: list[float] | None = Field(None, description="one weight per loss_type (default 1 each)")
    rpo_alpha: float | None = Field(None, ge=0, description="RPO: add α × the chosen completion's per-token NLL")
    label_smoothing: float = Field(0.0, description="ε: the believed rate of flipped labels "
                                                    "(sigmoid, robust, exo_pair, aot, aot_pair)")
    discopop_tau: float = Field(0.05, gt=0, description="DiscoPOP's blend temperature τ")
    precompute_ref_log_probs: bool = Field(True, description="score the reference once before training")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _aliases(cls, value):
        return list(loss_types(value)) if isinstance(value, (list, tuple)) else loss_types(value)[0]

    @model_validator(mode="after")
    def _consistent(self) -> "DPOArgs":
        check_loss_config(self.beta, self.loss_type, self.label_smoothing, self.loss_weights, self.rpo_alpha,
                          self.discopop_tau)
        return self

    def loss_knobs(self) -> dict:
        """`dpo_loss`'s keyword arguments from these settings."""
        return dict(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                    loss_weights=self.loss_weights, rpo_alpha=self.rpo_alpha, discopop_tau=self.discopop_tau)


def check_separate(model: nn.Module, ref_model: nn.Module) -> None:
    policy_params = {id(p) for p in model.parameters()}
    if any(id(p) in policy_params for p in ref_model.parameters()):
        # Freezing the reference would freeze these policy weights too.
        raise ValueError("ref_model shares parameters with the policy; pass a separate copy "
                         "(load the parent checkpoint again, or copy.deepcopy the policy)")


class ReferenceTrainer(BaseTrainer):
    """A trainer scored against a frozen reference (DPO's, KTO's), held as a `DPOReference`
    (`self.reference`) that scores the two sequences of each batch item (`sides`).

    `ref_model` is frozen, moved to the trainer's device, and kept out of the optimizer and of
    DDP; it may also be a function that loads it. With `precompute` it scores the data once
    before training and is then let go (the loaders must be finite, re-iterable and yield the
    same items every epoch); otherwise it runs under no_grad on every batch. `ref_cache_dir`
    defaults to `save_dir/ref_logps`; with neither set the scores stay in memory only. With
    `ref_weights_id` (a hash that names its weights, such as the parent checkpoint's content
    hash) a run whose scores are cached never loads the reference."""

    sides: tuple[str, str] = SIDES

    def __init__(self, model: nn.Module, ref_model: nn.Module | Callable[[], nn.Module], optimizer, train_loader,
                 val_loader=None, *, precompute: bool, ref_cache_dir: str | Path | None = None,
                 ref_weights_id: str | None = None, **kwargs):
        if isinstance(ref_model, nn.Module):
            check_separate(model, ref_model)
        super().__init__(model, optimizer, train_loader, val_loader, **kwargs)
        if ref_cache_dir is None and self.save_dir is not None:
            ref_cache_dir = self.save_dir / "ref_logps"
        self.precompute = precompute
        self.reference = DPOReference(
            ref_model, place=lambda ref: place_reference(ref, self.args, self.device), device=self.device,
            scoring=str(self.amp_dtype) if self.use_amp else "float32", weights_id=ref_weights_id,
            cache_dir=Path(ref_cache_dir) if precompute and ref_cache_dir is not None else None,
            sharded=self.sharded, sides=self.sides)
        if not precompute:
            self.reference.model()

    @property
    def ref_model(self) -> nn.Module | None:
        """The reference model while the trainer holds it (None once its scores are precomputed)."""
        return self.reference.loaded

    # ---- BaseTrainer hooks ----

    def count_items(self, batch: dict) -> int:
        return batch[f"{self.sides[0]}_input_ids"].shape[0]

    def on_train_begin(self) -> None:
        if self.precompute:
            self.precompute_reference_logps()

    def precompute_reference_logps(self):
        """Score the training and validation items once (or load them from the disk cache); every
        rank must call it at the same point, as `on_train_begin` does."""
        loaders = [loader for loader in (self.train_loader, self.val_loader) if loader is not None]
        return self.reference.precompute(loaders, self.autocast, super().to_device)

    def evaluate(self) -> dict[str, float]:
        self.on_train_begin()  # a no-op once scored: evaluation may come first
        return super().evaluate()

    def to_device(self, batch: dict) -> dict:
        return super().to_device(self.reference.attach(batch))


class DPOTrainer(ReferenceTrainer):
    """DPO on preference pairs (`collate_pairs` batches); the reference as `ReferenceTrainer`
    says, precomputed with `precompute_ref_log_probs`."""

    progress_metrics = (("rewards/accuracies", "acc"), ("rewards/margins", "margin"))

    def __init__(self, model: nn.Module, ref_model: nn.Module | Callable[[], nn.Module],
                 optimizer, train_loader, val_loader=None, dpo: DPOArgs | None = None, **kwargs):
        self.dpo = DPOArgs.build(dpo, **DPOArgs.take(kwargs))
        super().__init__(model, ref_model, optimizer, train_loader, val_loader,
                         precompute=self.dpo.precompute_ref_log_probs, **kwargs)

    def compute_loss(self, model, batch):
        # Reference first: its no-grad activations are freed before the policy's are kept for backward.
        ref_chosen, ref_rejected = self.reference.logps(batch)
        policy_chosen, policy_rejected, chosen_lengths, rejected_lengths = concatenated_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, **self.dpo.loss_knobs())
        return losses.sum(), preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
