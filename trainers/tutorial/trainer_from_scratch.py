"""A complete causal-LM training loop, written top to bottom (手搓训练循环).

Read ``optimizer_from_scratch.py`` first; this file uses any optimizer, though.

What one optimizer step does, in order::

    for each of grad_accum_steps micro-batches:
        forward (under autocast if use_amp) -> shifted cross-entropy loss
        backward(loss / grad_accum_steps)       # gradients add up in p.grad
    unscale gradients (fp16 only)
    clip the global gradient norm to max_grad_norm
    set the learning rate (linear warmup, then cosine decay)
    optimizer.step(); zero the gradients

plus a validation pass and a checkpoint at the end of every epoch.

This is deliberately the simple version.  alignflow's production trainer
(``trainers/base.py``) adds what real runs need: token-exact loss normalisation
under accumulation, distributed training, resumable data order and RNG state,
safetensors checkpoints with checksums, early stopping, metrics sinks...
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

__all__ = ["TrainerFromScratch"]

IGNORE_INDEX = -100  # label value meaning "no loss on this position" (prompt, padding)


class TrainerFromScratch:
    """Train a causal language model.

    Batches are dicts with ``input_ids`` [B, L], optionally ``attention_mask``
    [B, L] and ``labels`` [B, L] (``-100`` = ignore; if absent, labels are the
    input ids with padding ignored).  ``model(input_ids[, attention_mask=...])``
    must return logits [B, L, V] or an object with a ``.logits`` attribute.

    ``max_steps`` (optimizer steps) overrides ``max_epochs`` when given.
    ``max_grad_norm=None`` (or 0) disables clipping; ``log_interval=0`` silences
    printing.  ``train()`` returns ``{"train_loss": mean loss of the last epoch's
    steps, "val_loss": last validation loss (if val_loader), "step": steps done}``
    and ``self.history`` keeps loss / lr / grad norm for every step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader,
        val_loader=None,
        device="cpu",
        max_epochs: int = 1,
        max_steps: int | None = None,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        use_amp: bool = False,
        amp_dtype: torch.dtype = torch.bfloat16,
        warmup_steps: int = 0,
        lr_min_ratio: float = 0.1,
        log_interval: int = 10,
        save_dir: str | None = None,
    ) -> None:
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {lr_min_ratio}")
        if use_amp and amp_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be torch.bfloat16 or torch.float16, got {amp_dtype}")

        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.grad_accum_steps = grad_accum_steps
        self.max_grad_norm = max_grad_norm
        self.use_amp = use_amp
        self.amp_dtype = amp_dtype
        self.warmup_steps = warmup_steps
        self.lr_min_ratio = lr_min_ratio
        self.log_interval = log_interval
        self.save_dir = save_dir

        # How many optimizer steps in total?  The LR schedule needs to know.
        # One step consumes grad_accum_steps micro-batches; micro-batches are
        # treated as one stream across epochs, and a final incomplete
        # accumulation window is dropped.
        if max_steps is not None:
            self.total_steps = max_steps
        else:
            try:
                n_batches = len(train_loader)
            except TypeError:
                raise ValueError("train_loader has no len(); pass max_steps") from None
            self.total_steps = max_epochs * n_batches // grad_accum_steps
            if self.total_steps < 1:
                raise ValueError(
                    f"{max_epochs} epoch(s) of {n_batches} batches make no full step of "
                    f"{grad_accum_steps} accumulated micro-batches"
                )

        # Each group's starting lr is the peak of the schedule.  Stored in the
        # group under the key torch's schedulers use, so it travels with
        # optimizer.state_dict() and survives a checkpoint reload.
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

        # Mixed precision.  autocast runs matmuls (and other safe ops) in a
        # 16-bit dtype - about 2x less memory traffic and much faster on GPUs -
        # while keeping precision-sensitive ops (softmax, norms, losses) in fp32.
        # The weights themselves stay fp32.
        #  * bfloat16 has fp32's exponent range, so gradients neither underflow
        #    nor overflow: it needs nothing else.
        #  * float16 has only 5 exponent bits: small gradients underflow to 0.
        #    GradScaler multiplies the loss by a large factor S before backward
        #    (so gradients are S times larger and representable), divides them
        #    by S again before the step, skips steps whose gradients hit inf/nan
        #    and adapts S.  It exists on CPU too: torch.amp.GradScaler("cpu").
        self.scaler = None
        if use_amp and amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

        self.step = 0  # optimizer steps taken so far
        self.epoch = 0  # full passes over train_loader completed
        self.history: list[dict] = []  # one record per optimizer step

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Mean next-token cross entropy over non-ignored tokens, and their count."""
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.clone()
            if attention_mask is not None:
                labels[attention_mask == 0] = IGNORE_INDEX
        labels = labels.to(self.device)

        # enabled=False makes autocast a no-op, so one code path serves both.
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            if attention_mask is not None:
                out = self.model(input_ids, attention_mask=attention_mask)
            else:
                out = self.model(input_ids)
        logits = out.logits if hasattr(out, "logits") else out

        # Position t predicts token t+1: drop the last logit and the first label.
        # Compute the loss in fp32 (.float()): log-softmax over a large vocab is
        # exactly the kind of op 16-bit precision gets wrong.
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:]
        loss_sum = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        n_tokens = int((shift_labels != IGNORE_INDEX).sum())
        # max(1, .) so a batch with every label ignored gives 0, not nan.
        return loss_sum / max(n_tokens, 1), n_tokens

    # ------------------------------------------------------------ schedule
    def lr_at(self, step: int, base_lr: float) -> float:
        """Learning rate for optimizer step ``step`` (0-based).

        Warmup: the first updates are made with random weights, and Adam's
        second-moment estimate v is built from only a few gradients, so early
        steps can be large and erratic.  Ramping lr up linearly over
        warmup_steps avoids blowing the model up before the statistics settle.
        We start at base_lr / warmup_steps, not 0: a step with lr 0 is wasted.

        Cosine decay: afterwards lr follows half a cosine from base_lr down to
        lr_min_ratio * base_lr at the last step - large steps while far from a
        minimum, small ones at the end to settle into it.
        """
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)  # 0 -> ~1
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> ~0
        min_lr = self.lr_min_ratio * base_lr
        return min_lr + (base_lr - min_lr) * cosine

    # ------------------------------------------------------ optimizer step
    def optimizer_step(self) -> float:
        """Unscale, clip, set lr, step, zero grads.  Returns the pre-clip grad norm."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

        # Under fp16 the gradients are still multiplied by the loss scale S
        # (e.g. 65536).  Clipping must see the true gradients: clipping scaled
        # ones would compare S * ||g|| with max_grad_norm and shrink almost
        # every step to nothing.  unscale_ divides by S in place (and records
        # whether it found inf/nan); scaler.step() then knows not to do it again.
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

        # Global-norm clipping, by hand (same maths as torch.nn.utils.clip_grad_norm_):
        # the norm of all gradients concatenated into one vector.  If it exceeds
        # max_grad_norm, scale every gradient by the same factor - the update
        # direction is kept, only its length is capped.  It protects against
        # the occasional huge gradient from an unlucky batch.
        grad_norm = torch.zeros(())
        if params:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])
            )
        if self.max_grad_norm and params:
            clip_coef = torch.clamp(self.max_grad_norm / (grad_norm + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(clip_coef.to(p.grad.dtype))

        # The LR schedule, by hand: just overwrite each group's lr.
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, group["initial_lr"])

        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped if grads had inf/nan
            self.scaler.update()  # adapt the scale for next time
        else:
            self.optimizer.step()
        # set_to_none frees the gradient memory; the next backward re-creates it.
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # ------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run until ``total_steps`` optimizer steps; returns final metrics."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict = {"train_loss": float("nan")}  # nan if no step is left to run
        micro_step = 0  # micro-batches accumulated into the current step
        step_loss = 0.0
        epoch_losses: list[float] = []
        tokens_since_log, t_log = 0, time.perf_counter()

        while self.step < self.total_steps:
            n_batches = 0
            for batch in self.train_loader:
                n_batches += 1
                loss, n_tokens = self.compute_loss(batch)

                # Gradient accumulation: backward() ADDS into p.grad.  After k
                # backward calls p.grad holds the SUM of k mean-loss gradients;
                # dividing each loss by k makes it their AVERAGE - the gradient a
                # k-times-larger batch would have given, at 1/k the memory.
                # Caveat: that is exact only if every micro-batch counts the same
                # number of tokens.  With variable-length sequences, a mean of
                # means over-weights the tokens of short micro-batches; the exact
                # version sums token losses and divides by the total token count
                # of the whole accumulation window.  alignflow's real BaseTrainer
                # (trainers/base.py, training_step) does that token-exact version.
                scaled = loss / self.grad_accum_steps
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)  # x S, see __init__
                scaled.backward()
                step_loss += loss.item() / self.grad_accum_steps
                tokens_since_log += n_tokens
                micro_step += 1
                if micro_step < self.grad_accum_steps:
                    continue  # keep accumulating

                grad_norm = self.optimizer_step()
                lr = self.optimizer.param_groups[0]["lr"]  # as just used
                self.step += 1
                self.history.append({"step": self.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm})
                epoch_losses.append(step_loss)
                micro_step, step_loss = 0, 0.0

                if self.log_interval and self.step % self.log_interval == 0:
                    elapsed = time.perf_counter() - t_log
                    print(
                        f"step {self.step}/{self.total_steps} | loss {self.history[-1]['loss']:.4f} "
                        f"| lr {lr:.2e} | grad_norm {grad_norm:.3f} "
                        f"| {tokens_since_log / max(elapsed, 1e-9):.0f} tok/s",
                        flush=True,
                    )
                    tokens_since_log, t_log = 0, time.perf_counter()
                if self.step >= self.total_steps:
                    break
            if n_batches == 0:
                raise ValueError("train_loader yielded no batches")

            # End of an epoch (or of training): validate, checkpoint.
            # (Micro-batches of an unfinished accumulation window carry over.)
            self.epoch += 1
            if epoch_losses:
                metrics["train_loss"] = sum(epoch_losses) / len(epoch_losses)
                epoch_losses = []
            if self.val_loader is not None:
                metrics["val_loss"] = self.evaluate()
                if self.log_interval:
                    print(f"epoch {self.epoch} | step {self.step} | val_loss {metrics['val_loss']:.4f}", flush=True)
            if self.save_dir is not None:
                self.save_checkpoint(os.path.join(self.save_dir, "last.pt"))

        # Gradients of a dropped incomplete accumulation window must not leak
        # into a later train() call.
        self.optimizer.zero_grad(set_to_none=True)
        metrics["step"] = self.step
        return metrics

    @torch.no_grad()  # no graph, no activations kept for backward
    def evaluate(self) -> float:
        """Mean loss per non-ignored token over the whole ``val_loader``."""
        # eval() switches off dropout (and similar) so validation is deterministic.
        self.model.eval()
        total_loss, total_tokens = 0.0, 0
        for batch in self.val_loader:
            loss, n_tokens = self.compute_loss(batch)
            # Weight each batch by its tokens: an exact per-token mean.
            total_loss += loss.item() * n_tokens
            total_tokens += n_tokens
        self.model.train()
        return total_loss / max(total_tokens, 1)

    # --------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str) -> None:
        """Model + optimizer (+ scaler) + counters in one ``torch.save`` file."""
        checkpoint = {
            "model": self.model.state_dict(),
            # Moments / momentum buffers and each group's lr and initial_lr:
            # without them a resumed run would restart Adam from zero moments.
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
        }
        if self.scaler is not None:
            checkpoint["scaler"] = self.scaler.state_dict()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Write to a temporary file, then rename: a crash mid-write leaves the
        # previous checkpoint intact instead of a truncated file.
        tmp = path + ".tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str) -> None:
        """Restore what ``save_checkpoint`` wrote; ``train()`` then continues."""
        # torch.save uses pickle, and unpickling can construct arbitrary objects,
        # i.e. run arbitrary code hidden in a malicious file.  weights_only=True
        # restricts loading to tensors and plain containers/numbers/strings -
        # everything we saved - and refuses anything else.
        checkpoint = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = checkpoint["step"]
        self.epoch = checkpoint.get("epoch", 0)
        # Simplification: data order restarts from the beginning of
        # train_loader; the production trainer also saves the data position
        # and RNG states so a resumed run sees exactly the batches it would have.
