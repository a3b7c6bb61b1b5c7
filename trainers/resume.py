"""What makes a resumed run the uninterrupted one: the trainer's state written as a checkpoint and
read back, and the epoch's data order replayed to the batch where it stopped (docs/training.md,
"Checkpoint layout" and "Exact resume"). `BaseTrainer` inherits it; it reads the loop's counters
(global_step, epoch, batches_in_epoch, ...) and the objects that hold state (model, optimizer,
scheduler, scaler, early stopping)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .early_stopping import EarlyStopping
from .modules import unwrap


class Resumable:
    # ---- checkpoints ----

    def save_checkpoint(self) -> Path | None:
        """Full resumable state at the current step; every rank must call it."""
        if self.save_dir is None:
            return None
        tmp = ckpt.step_dir(self.save_dir, self.global_step).with_suffix(".tmp")
        final = ckpt.step_dir(self.save_dir, self.global_step)
        with ckpt.writing(tmp):  # a failed write (full disk) leaves no step-N.tmp, and names the path
            if self.is_main:
                tmp = ckpt.begin(self.save_dir, self.global_step)
            dist_utils.barrier()
            ckpt.save_rng(tmp, self.dist.rank, ckpt.rng_state(), self.epoch_start_rng)
            if self.sharded:
                ckpt.save_sharded(tmp, self.model, self.optimizer)
            if self.is_main:
                ckpt.save_state(tmp, None if self.sharded else unwrap(self.model), {
                    **{k: v.state_dict() if v is not None else None for k, v in self._stateful().items()},
                    "extra": self.extra_state()})
            dist_utils.barrier()
            if self.is_main:
                ckpt.commit(tmp, {
                    "format": "dcp" if self.sharded else "safetensors",
                    "step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                    "tokens_seen": self.tokens_seen, "train_seconds": self.elapsed_seconds(),
                    "last_step_metrics": self.last_step_metrics,
                    "world_size": self.dist.world_size, "last_eval": self.last_eval,
                    "early_stopping": asdict(self.early_stopping) if self.early_stopping else None,
                }, self.args.keep_last)
        if self.is_main:
            if self.on_checkpoint is not None:
                self.on_checkpoint(final)
        dist_utils.barrier()
        self.last_checkpoint = final
        return final

    def _stateful(self) -> dict:
        """What training_state.pt holds (sharded, the optimizer's state is in the DCP files)."""
        return {**({} if self.sharded else {"optimizer": self.optimizer}),
                "scheduler": self.scheduler, "scaler": self.scaler}

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        meta, state, rng = ckpt.load(path, unwrap(self.model), self.dist.rank,
                                     sharded_optimizer=self.optimizer if self.sharded else None)
        for key, obj in self._stateful().items():
            if obj is not None and state[key] is not None:
                obj.load_state_dict(state[key])
        self.load_extra_state(state.get("extra") or {})
        self.global_step, self.epoch = meta["step"], meta["epoch"]
        self.batches_in_epoch = meta["batches_in_epoch"]
        self.tokens_seen = meta.get("tokens_seen", 0.0)
        self.train_seconds = meta.get("train_seconds", 0.0)
        self.last_step_metrics = meta.get("last_step_metrics") or {}
        self.last_eval = meta.get("last_eval") or {}
        if self.early_stopping is not None and meta.get("early_stopping"):
            self.early_stopping = EarlyStopping(**meta["early_stopping"])
        self.epoch_start_rng = rng["epoch_start"]
        self._resume_rng = rng["current"]
        self.last_checkpoint = path

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
