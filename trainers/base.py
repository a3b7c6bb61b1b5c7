"""BaseTrainer: the loop mechanics every algorithm shares (design.md §3).

A subclass supplies two things:
  * `count_items(batch)`: how many items (tokens for SFT, pairs for DPO) the batch's loss sums
    over. It is read on the CPU batch before the forward pass.
  * `compute_loss(model, batch) -> (loss_sum, metric_sums)`: the *sum* of per-item losses and
    optional per-item metric sums (divided by the step's item count when logged).

Why sums: with variable-length sequences, averaging each micro-batch and then averaging the
averages weights short sequences more than long ones. Here every micro-batch's loss sum is
divided by the item count of the whole optimizer step (all micro-batches, all ranks), so the
update is exactly the one a single big batch would give.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .metrics import MetricsLogger


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


@dataclass
class EarlyStopping:
    """Stop when `metric` has not improved by more than `min_delta` for `patience` evaluations."""
    metric: str = "val_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    best: float | None = None
    bad_evals: int = 0

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"early stopping mode must be 'min' or 'max', got {self.mode!r}")

    def update(self, value: float) -> bool:
        """Record an evaluation; True when training should stop."""
        improved = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience


def logits_of(output: Any) -> torch.Tensor:
    """Models return logits directly or an object carrying `.logits` (Hugging Face)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class BaseTrainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader,
        val_loader=None,
        scheduler=None,
        device: str | torch.device | None = None,
        max_epochs: int = 1,
        max_steps: int | None = None,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        use_amp: bool = False,
        amp_dtype: str | torch.dtype = "bfloat16",
        log_interval: int = 10,
        eval_interval: int | None = None,
        save_dir: str | Path | None = None,
        save_interval: int | None = None,
        keep_last: int | None = 3,
        on_checkpoint: Callable[[Path], None] | None = None,
        early_stopping: EarlyStopping | None = None,
        seed: int | None = None,
        compile: bool | str = False,
        tensorboard: bool = False,
        progress_bar: bool = True,
    ):
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if max_steps is None and max_epochs is None:
            raise ValueError("set max_steps or max_epochs")
        if seed is not None:
            seed_everything(seed)

        self.dist = dist_utils.detect()
        self.device = torch.device(device) if device is not None else dist_utils.default_device(self.dist)
        dist_utils.setup(self.device)

        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.grad_accum_steps = grad_accum_steps
        self.max_grad_norm = max_grad_norm
        self.log_interval, self.eval_interval = log_interval, eval_interval
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.save_interval, self.keep_last = save_interval, keep_last
        self.on_checkpoint = on_checkpoint  # main rank, after a checkpoint is complete (e.g. copy it off the machine)
        self.early_stopping = early_stopping
        self.progress_bar, self.tensorboard = progress_bar, tensorboard

        self.amp_dtype = _AMP_DTYPES[amp_dtype] if isinstance(amp_dtype, str) else amp_dtype
        self.use_amp = use_amp
        # fp16 has a narrow exponent range: small gradients underflow unless the loss is scaled
        # up first; bf16 keeps fp32's range and needs no scaler.
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if use_amp and self.amp_dtype == torch.float16 else None)

        model.to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.dist.enabled:
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if compile:  # True: the default inductor backend; a string names another backend
            model = torch.compile(model) if compile is True else torch.compile(model, backend=compile)
        self.model = model

        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.tokens_seen = 0.0  # all ranks, for throughput and the stage manifest
        self.epoch_start_rng: dict | None = None
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float] = {}
        self._resume_rng: dict | None = None  # set by load_checkpoint, used once by _epoch_iterator
        self.resumed_from_step: int | None = None
        self.updates_per_step = 1  # optimizer (and LR schedule) steps per training step

    # ---- what subclasses provide ----

    def count_items(self, batch: dict) -> int:
        raise NotImplementedError  # abstract: the algorithm defines its unit of normalisation

    def compute_loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError  # abstract: the algorithm defines its loss

    def count_tokens(self, batch: dict) -> int:
        """Tokens processed (for throughput), padding excluded when a mask says where it is."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def extra_state(self) -> dict:
        """Algorithm state that must survive a resume (tensors and plain containers only)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- small helpers ----

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
        """Training steps this run will take (the progress bar's total; an LR schedule needs
        this times `updates_per_step`)."""
        per_epoch = None
        try:
            per_epoch = math.ceil(len(self.train_loader) / self.grad_accum_steps)
        except TypeError:  # an iterable loader has no length
            pass
        by_epochs = per_epoch * self.max_epochs if (per_epoch is not None and self.max_epochs) else None
        candidates = [s for s in (self.max_steps, by_epochs) if s is not None]
        return min(candidates) if candidates else None

    # ---- one optimizer step ----

    def _micro_batches(self, it: Iterator) -> list[dict]:
        batches = []
        for _ in range(self.grad_accum_steps):
            try:
                batches.append(next(it))
            except StopIteration:
                break
        return batches

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
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            batch = self.to_device(batch)
            last = i == len(micro) - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss, metrics = self.compute_loss(self.model, batch)
                scaled = loss / denom
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().double()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().double()

        names = sorted(metric_sums)
        reduced = dist_utils.all_reduce_sum(torch.stack([loss_sum] + [metric_sums[k] for k in names]))
        values = (reduced / n_items).tolist()
        loss_value = values[0]
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
            self.params, self.max_grad_norm if self.max_grad_norm else float("inf"))
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
        out.update(zip(names, values[1:]))
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
        metric_sums: dict[str, torch.Tensor] = {}
        n_items = 0
        for batch in self.val_loader:
            n_items += self.count_items(batch)
            with self.autocast():
                loss, metrics = self.compute_loss(self.model, self.to_device(batch))
            loss_sum += loss.double()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.double()
        names = sorted(metric_sums)
        packed = torch.stack([loss_sum, torch.tensor(float(n_items), dtype=torch.float64, device=self.device)]
                             + [metric_sums[k] for k in names])
        reduced = dist_utils.all_reduce_sum(packed).tolist()
        total = max(reduced[1], 1.0)
        result = {"val_loss": reduced[0] / total}
        result.update({f"val_{k}": v / total for k, v in zip(names, reduced[2:])})
        self.model.train(was_training)
        return result

    # ---- checkpoints ----

    def save_checkpoint(self) -> Path | None:
        """Full resumable state at the current step; every rank must call it."""
        if self.save_dir is None:
            return None
        tmp = ckpt.step_dir(self.save_dir, self.global_step).with_suffix(".tmp")
        if self.is_main:
            tmp = ckpt.begin(self.save_dir, self.global_step)
        dist_utils.barrier()
        ckpt.save_rng(tmp, self.dist.rank, ckpt.rng_state(), self.epoch_start_rng)
        if self.is_main:
            ckpt.save_state(tmp, unwrap(self.model), {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "extra": self.extra_state(),
            })
        dist_utils.barrier()
        final = ckpt.step_dir(self.save_dir, self.global_step)
        if self.is_main:
            ckpt.commit(tmp, {
                "step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "tokens_seen": self.tokens_seen,
                "world_size": self.dist.world_size, "last_eval": self.last_eval,
                "early_stopping": asdict(self.early_stopping) if self.early_stopping else None,
            }, self.keep_last)
            if self.on_checkpoint is not None:
                self.on_checkpoint(final)
        dist_utils.barrier()
        self.last_checkpoint = final
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        meta, state, rng = ckpt.load(path, unwrap(self.model), self.dist.rank)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state.get("extra") or {})
        self.global_step, self.epoch = meta["step"], meta["epoch"]
        self.batches_in_epoch = meta["batches_in_epoch"]
        self.tokens_seen = meta.get("tokens_seen", 0.0)
        self.last_eval = meta.get("last_eval") or {}
        if self.early_stopping is not None and meta.get("early_stopping"):
            self.early_stopping = EarlyStopping(**meta["early_stopping"])
        self.epoch_start_rng = rng["epoch_start"]
        self._resume_rng = rng["current"]
        self.last_checkpoint = path

    # ---- the loop ----

    def _epoch_iterator(self) -> Iterator:
        """Iterator over this epoch's micro-batches, positioned after those already consumed.

        Shuffling draws from the RNG when the iterator is created, so on resume the RNG is
        rewound to the epoch's start to replay the same order, the consumed batches are
        skipped, and then the RNG is set to where the checkpoint left it."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            sampler.set_epoch(self.epoch)
        resume_rng = self._resume_rng
        if resume_rng is not None and self.epoch_start_rng is not None:
            ckpt.set_rng_state(self.epoch_start_rng)
        else:
            self.epoch_start_rng = ckpt.rng_state()
        it = iter(self.train_loader)
        for _ in range(self.batches_in_epoch if resume_rng is not None else 0):
            next(it)
        if resume_rng is not None:
            ckpt.set_rng_state(resume_rng)
            self._resume_rng = None
        return it

    def _done(self) -> bool:
        if self.max_steps is not None and self.global_step >= self.max_steps:
            return True
        return self.max_epochs is not None and self.epoch >= self.max_epochs

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

    def train(self, resume_from: str | Path | None = None) -> dict[str, float]:
        """Train until max_steps/max_epochs or early stopping; return the final metrics.

        `resume_from`: a checkpoint directory, or "latest" for the newest one in save_dir
        (a fresh start when there is none)."""
        if resume_from == "latest":
            resume_from = ckpt.latest_checkpoint(self.save_dir) if self.save_dir else None
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.resumed_from_step = self.global_step

        logger = MetricsLogger(self.save_dir, self.is_main, self.estimated_total_steps(),
                               initial_step=self.global_step, progress_bar=self.progress_bar,
                               tensorboard=self.tensorboard)
        self.model.train()
        last: dict[str, float] = {}
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
                        if self.val_loader is not None and not self.eval_interval:
                            stop = self._evaluate_and_log(logger)
                        break
                    last = self.training_step(micro)
                    self.global_step += 1
                    self.batches_in_epoch += len(micro)
                    window_tokens += last["tokens"]
                    self.tokens_seen += last["tokens"]
                    logger.advance()
                    if self.global_step % self.log_interval == 0:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        logger.log(self.global_step, {**last, "epoch": self.epoch,
                                                      "tokens_per_s": window_tokens / elapsed})
                        window_tokens, window_start = 0.0, time.perf_counter()
                    if self.eval_interval and self.global_step % self.eval_interval == 0:
                        stop = self._evaluate_and_log(logger)
                    if self.save_interval and self.global_step % self.save_interval == 0:
                        self.save_checkpoint()
            if self.val_loader is not None and self.last_eval.get("step") != self.global_step:
                self._evaluate_and_log(logger)
            if self.last_checkpoint != ckpt.step_dir(self.save_dir or ".", self.global_step):
                self.save_checkpoint()
        finally:
            logger.close()
        final = {k: v for k, v in last.items() if k in ("loss", "grad_norm", "lr")}
        final.update({k: v for k, v in self.last_eval.items() if k != "step"})
        final.update(step=self.global_step, epoch=self.epoch, tokens=self.tokens_seen,
                     resumed_from_step=self.resumed_from_step)
        return final
