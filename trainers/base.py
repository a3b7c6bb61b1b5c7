"""BaseTrainer: the loop mechanics every algorithm shares (docs/training.md).

A subclass supplies two things:
  * `count_items(batch)`: how many items (tokens for SFT, pairs for DPO) the batch's loss sums
    over. It is read on the CPU batch before the forward pass.
  * `compute_loss(model, batch) -> (loss_sum, metric_sums)`: the *sum* of per-item losses and
    optional metric sums (divided by the step's item count when logged, or `(sum, count)`
    pairs for means over another unit, see `MetricSums`).

Why sums: with variable-length sequences, averaging each micro-batch and then averaging the
averages weights short sequences more than long ones. Here every micro-batch's loss sum is
divided by the item count of the whole optimizer step (all micro-batches, all ranks), so the
update is exactly the one a single big batch would give.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from alignflow.models.dtypes import DTYPES

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import sharding
from .args import TrainingArgs
from .early_stopping import EarlyStopping
from .metrics import MetricsLogger, MetricSums
from .modules import unwrap
from .optim import create_scheduler
from .placement import place_policy
from .progress import Progress
from .resume import Resumable


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


class BaseTrainer(Resumable):
    """`args` (a `TrainingArgs`) or its fields as keywords; keywords win. `scheduler` is an LR
    scheduler you built yourself; without one the trainer builds `args.schedule` when training
    starts. `on_checkpoint(step_dir)` runs on the main rank after each checkpoint is complete."""

    # (metric, label): what the progress lines show after the loop's own numbers (DPO's
    # preference accuracy, GRPO's reward), in training and validation records alike.
    progress_metrics: tuple[tuple[str, str], ...] = ()

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader, val_loader=None,
                 args: TrainingArgs | None = None, *, scheduler=None, device: str | torch.device | None = None,
                 save_dir: str | Path | None = None, on_checkpoint: Callable[[Path], None] | None = None,
                 early_stopping: EarlyStopping | None = None, **settings):
        self.args = args = TrainingArgs.build(args, **settings)
        if args.seed is not None:
            ckpt.seed_everything(args.seed)

        self.dist = dist_utils.detect()
        self.device = torch.device(device) if device is not None else dist_utils.default_device(self.dist)
        dist_utils.setup(self.device)

        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.on_checkpoint = on_checkpoint
        self.early_stopping = early_stopping

        self.use_amp = args.precision != "fp32"
        self.amp_dtype = DTYPES[args.precision] if self.use_amp else None
        # fp16 has a narrow exponent range: small gradients underflow unless the loss is scaled
        # up first; bf16 keeps fp32's range and needs no scaler.
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "fp16" else None

        self.sharded = args.strategy == "fsdp"
        self.model, self.optimizer = place_policy(model, optimizer, args, self.device, scheduler)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.tokens_seen = 0.0  # all ranks, for throughput and the stage manifest
        self.epoch_start_rng: dict | None = None
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float] = {}
        self._resume_rng: dict | None = None  # set by load_checkpoint, used once by _epoch_iterator
        self.resumed_from_step: int | None = None
        # Carried through checkpoints, so a stage restored from its last one reports the run's
        # numbers, not those of an attempt that trained nothing: seconds spent training (all
        # attempts) and the last step's loss, grad_norm and lr.
        self.train_seconds = 0.0
        self.last_step_metrics: dict[str, float] = {}
        self._attempt_started = time.perf_counter()
        self.updates_per_step = 1  # optimizer (and LR schedule) steps per training step

    # ---- what subclasses provide ----

    def count_items(self, batch: dict) -> int:
        raise NotImplementedError  # abstract: the algorithm defines its unit of normalisation

    def compute_loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError  # abstract: the algorithm defines its loss

    def count_tokens(self, batch: dict) -> int:
        """Tokens processed (for throughput): the real tokens of every `*attention_mask` (a pair
        batch's two sides), else every input id."""
        masks = [value for key, value in batch.items() if key.endswith("attention_mask")]
        return int(sum(m.sum() for m in masks)) if masks else batch["input_ids"].numel()

    def extra_state(self) -> dict:
        """Algorithm state that must survive a resume (tensors and plain containers only)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- small helpers ----

    def unsharded(self):
        """The block in which the policy generates: under fsdp every layer gathered once, so the
        ranks' different numbers of decoding steps issue no collectives."""
        return sharding.gathered(self.model) if self.sharded else contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: dict) -> dict:
        """Move a batch to the device. Subclasses may override it to attach per-batch data
        computed on the CPU first (DPO attaches its cached reference log-probs here)."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def estimated_total_steps(self) -> int | None:
        """Training steps this run will take: max_steps, else epochs × steps per epoch (None
        when the loader has no length)."""
        if self.args.max_steps is not None:
            return self.args.max_steps
        try:
            return math.ceil(len(self.train_loader) / self.args.grad_accum_steps) * self.args.max_epochs
        except TypeError:  # an iterable loader has no length
            return None

    def build_scheduler(self):
        """`args.schedule` over the optimizer updates this run will make (training steps ×
        `updates_per_step`); called by `train` before a checkpoint restores its state."""
        steps = self.estimated_total_steps()
        if steps is None and self.args.schedule != "constant":
            raise ValueError(f"schedule {self.args.schedule!r} needs the number of steps: set max_steps "
                             "(the train loader has no length)")
        return create_scheduler(self.optimizer, self.args.schedule, warmup_steps=self.args.warmup_steps,
                                total_steps=(steps or 1) * self.updates_per_step, min_lr_ratio=self.args.min_lr_ratio)

    def on_train_begin(self) -> None:
        """Work a subclass does once before the first step, on every rank at the same point
        (after a resume has restored the state); DPO scores its reference here."""

    # ---- one optimizer step ----

    def _micro_batches(self, it: Iterator) -> list[dict]:
        batches = []
        for _ in range(self.args.grad_accum_steps):
            try:
                batches.append(next(it))
            except StopIteration:
                break
        return batches

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool):
        """DDP: no_sync() skips the all-reduce of a non-final micro-batch; FSDP: the same through
        set_requires_gradient_sync (its gradients accumulate unsharded until the last)."""
        if sync or not self.dist.enabled:
            yield
        elif self.sharded:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.model.no_sync():
                yield

    def training_step(self, micro: list[dict]) -> dict[str, float]:
        """Forward/backward over the micro-batches of one step, then clip and step."""
        counts = torch.tensor([[self.count_items(b), self.count_tokens(b)] for b in micro],
                              dtype=torch.float64).sum(0).to(self.device)
        n_items, n_tokens = dist_utils.all_reduce_sum(counts).tolist()
        if n_items == 0:
            raise ValueError(f"step {self.global_step + 1}: no item in this batch carries a loss "
                             "(every label is -100?)")
        # DDP averages gradients over ranks; dividing by n_items / world_size instead of n_items
        # turns that average back into the sum over all ranks' items.
        denom = n_items / self.dist.world_size

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = MetricSums()
        for i, batch in enumerate(micro):
            batch = self.to_device(batch)
            last = i == len(micro) - 1
            # Gradients are all-reduced (FSDP: reduce-scattered) once per optimizer step, on the
            # last micro-batch.
            with self._gradient_sync(last):
                with self.autocast():
                    loss, metrics = self.compute_loss(self.model, batch)
                scaled = loss / denom
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().double()
            sums.add(metrics)

        totals, metric_means = sums.reduce({"loss": loss_sum}, n_items, self.device)
        loss_value = totals["loss"] / n_items
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            where = self.last_checkpoint or "none was saved"
            raise NonFiniteLossError(
                f"loss became {loss_value} at step {self.global_step + 1} (epoch {self.epoch}); "
                f"stopped without updating the weights. Last good checkpoint: {where}")

        if self.scaler is not None:
            # The gradients are multiplied by the loss scale; clip the true gradients.
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.args.max_grad_norm or float("inf"))
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        stepped = True
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when any gradient is inf/NaN
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale_before
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped and self.scheduler is not None:
            self.scheduler.step()

        out = {"loss": loss_value, "grad_norm": float(grad_norm), "lr": self.optimizer.param_groups[0]["lr"],
               "items": n_items, "tokens": n_tokens}
        out.update(metric_means)
        if self.scaler is not None:
            out["loss_scale"] = self.scaler.get_scale()
            out["skipped_step"] = float(not stepped)
        return out

    # ---- evaluation ----

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and the subclass's metrics) over the whole validation set, reduced over ranks."""
        if self.val_loader is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_items = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = MetricSums()
        # A pass over a big held-out split can take minutes: say how far it is (trainers.progress).
        batches = Progress("validation", total=len(self.val_loader), unit="batches", quiet=not self.is_main)
        for batch in batches.over(self.val_loader):
            n_items += self.count_items(batch)
            with self.autocast():
                loss, metrics = self.compute_loss(self.model, self.to_device(batch))
            loss_sum += loss.double()
            sums.add(metrics)
        totals, metric_means = sums.reduce({"loss": loss_sum, "items": n_items}, None, self.device)
        # val_items: how many items (tokens, pairs) the numbers average over, for counts in reports.
        result = {"val_loss": totals["loss"] / max(totals["items"], 1.0), "val_items": int(totals["items"])}
        result.update({f"val_{k}": v for k, v in metric_means.items()})
        self.model.train(was_training)
        return result

    # ---- the loop ----

    def _done(self) -> bool:
        if self.args.max_steps is not None:
            return self.global_step >= self.args.max_steps
        return self.epoch >= self.args.max_epochs

    def _evaluate_and_log(self, logger: MetricsLogger) -> bool:
        """Evaluate, log, and tell whether early stopping says to stop."""
        result = self.evaluate()
        self.last_eval = {**result, "step": self.global_step}
        logger.log(self.global_step, result)
        if self.early_stopping is None:
            return False
        if self.early_stopping.metric not in result:
            raise KeyError(f"early stopping watches {self.early_stopping.metric!r}, "
                           f"but evaluation returned {sorted(result)}")
        return self.early_stopping.update(result[self.early_stopping.metric])

    def elapsed_seconds(self) -> float:
        """Seconds spent in train() so far, over every attempt that led to this state."""
        return self.train_seconds + time.perf_counter() - self._attempt_started

    def train(self, resume_from: str | Path | None = None) -> dict[str, float]:
        """Train until max_steps/max_epochs or early stopping; return the final metrics.

        `resume_from`: a checkpoint directory, or "latest" for the newest one in save_dir
        (a fresh start when there is none)."""
        if self.scheduler is None and self.args.schedule is not None:
            self.scheduler = self.build_scheduler()
        if resume_from == "latest":
            resume_from = ckpt.latest_checkpoint(self.save_dir) if self.save_dir else None
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.resumed_from_step = self.global_step
        self._attempt_started = time.perf_counter()
        self.on_train_begin()

        logger = MetricsLogger(self.save_dir, self.is_main, self.estimated_total_steps(),
                               initial_step=self.global_step, progress_bar=self.args.progress_bar,
                               tensorboard=self.args.tensorboard, shown=self.progress_metrics)
        self.model.train()
        window_tokens, window_start = 0.0, time.perf_counter()
        stop = False
        try:
            while not (stop or self._done()):
                it = self._epoch_iterator()
                while not (stop or self._done()):
                    micro = self._micro_batches(it)
                    if not micro:  # the epoch is exhausted
                        self.epoch += 1
                        self.batches_in_epoch = 0
                        if self.val_loader is not None and not self.args.eval_interval:
                            stop = self._evaluate_and_log(logger)
                        break
                    last = self.training_step(micro)
                    self.last_step_metrics = {k: last[k] for k in ("loss", "grad_norm", "lr") if k in last}
                    self.global_step += 1
                    self.batches_in_epoch += len(micro)
                    window_tokens += last["tokens"]
                    self.tokens_seen += last["tokens"]
                    logger.advance()
                    if self.global_step % self.args.log_interval == 0:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        logger.log(self.global_step, {**last, "epoch": self.epoch,
                                                      "tokens_per_s": window_tokens / elapsed})
                        window_tokens, window_start = 0.0, time.perf_counter()
                    if self.args.eval_interval and self.global_step % self.args.eval_interval == 0:
                        stop = self._evaluate_and_log(logger)
                    if self.args.save_interval and self.global_step % self.args.save_interval == 0:
                        self.save_checkpoint()
            if self.val_loader is not None and self.last_eval.get("step") != self.global_step:
                self._evaluate_and_log(logger)
            if self.last_checkpoint != ckpt.step_dir(self.save_dir or ".", self.global_step):
                self.save_checkpoint()
        finally:
            logger.close()
        final = dict(self.last_step_metrics)
        final.update({k: v for k, v in self.last_eval.items() if k != "step"})
        final.update(step=self.global_step, epoch=self.epoch, tokens=self.tokens_seen,
                     resumed_from_step=self.resumed_from_step)
        return final

    def final_model(self) -> nn.Module | None:
        """The trained model as one plain module, for evaluation and the stage's output: on rank 0
        the user's module (sharded: an unsharded copy with the gathered weights, on the CPU),
        None on the other ranks. Every rank must call it."""
        if self.sharded:
            return sharding.gathered_copy(self.model, self.is_main)
        return unwrap(self.model) if self.is_main else None
