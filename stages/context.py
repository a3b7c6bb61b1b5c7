"""A stage's run, from its parent to its published checkpoint directory. A stage module reads:

    with StageRun("sft", config, parent, out) as stage:   # process group, verified parent, out dir
        model, tok = stage.load_policy()                   # the parent (+ a LoRA adapter if `lora`)
        trainer = stage.trainer(model, tok, collate_causal_lm)  # data, loaders, optimizer, trainer
        stage.train(trainer, tok)                           # train (resuming), held-out evaluation
    return stage.result                                     # set on a clean exit: directory written

On a clean exit rank 0 writes the model directory (Hugging Face layout; a LoRA policy merged, its
adapter in adapter/) and, last, the manifest (stages.handoff), then publishes the directory when
it lives at a URL (stages.storage). On an exception nothing is written: a retry resumes from the
trainer's last checkpoint in `state/`."""
from __future__ import annotations

import functools
import logging
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from alignflow.models import Tokenizer, model_kind
from alignflow.models.lora import adapter_state, add_adapter, base_of, is_adapted, merge, with_adapter
from alignflow.trainers import configure_optimizer, create_trainer
from alignflow.trainers import distributed as dist_utils
from alignflow.trainers import BaseTrainer
from alignflow.trainers.reference import AdapterDisabled
from alignflow.trainers.sharding import original_class

from . import check_parent, handoff, storage
from . import data as data_mod
from .config import PipelineConfig, StageConfig, TrainConfig
from .evaluation import heldout_metrics
from .lock import DirLock

log = logging.getLogger("alignflow.stage")
VERSIONED = ("alignflow", "torch", "transformers", "safetensors", "tokenizers", "datasets", "pydantic")


class StageRun:
    def __init__(self, stage: str, config: PipelineConfig, parent_ref: str | Path | None, out_ref: str | Path):
        self.stage, self.config = stage, config
        self.out_ref = str(out_ref)  # where the stage is published: a path, or an fsspec URL
        self.out_dir = storage.local_dir(out_ref)  # where it is worked on
        self.parent_ref = str(parent_ref) if parent_ref else None  # as given: the lineage recorded
        self.parent_dir: Path | None = None  # a verified local copy of the parent
        self.parent_manifest: dict | None = None
        self.dist = dist_utils.detect()
        self.device = torch.device(config.device) if config.device else dist_utils.default_device(self.dist)
        self.started = time.time()
        self.data_notes: dict[str, dict] = {}
        self.outcome: dict | None = None  # what train() produced, written on exit
        self.result: dict | None = None  # rank 0, after a clean exit: what the next stage needs
        self.lock = DirLock(self.out_dir, f"stage {stage}")  # rank 0 holds it: one run per out dir

    @property
    def settings(self) -> StageConfig:
        return self.config.stage(self.stage)

    @property
    def train_cfg(self) -> TrainConfig:
        return self.settings.train

    @property
    def parent_hash(self) -> str | None:
        return self.parent_manifest["content_hash"] if self.parent_manifest else None

    # ---- set up and finish ----

    def __enter__(self) -> "StageRun":
        """Join the process group (if torchrun started us), fetch and verify the parent, prepare
        the local working directory (a retry at a URL first restores the mirrored checkpoint)."""
        dist_utils.setup(self.device)
        data_mod.progress_bars(self.dist.is_main)
        try:
            self._enter()
        except BaseException:
            self.lock.release()
            raise
        return self

    def _enter(self) -> None:
        if self.parent_ref is not None:
            if self.dist.local_rank == 0 and storage.is_url(self.parent_ref):  # one download per node
                storage.localize(self.parent_ref)
            dist_utils.barrier()
            self.parent_dir = storage.local_dir(self.parent_ref)
            self.parent_manifest = handoff.verify(self.parent_dir)
            check_parent(self.stage, self.parent_manifest, self.parent_ref)
        if self.dist.is_main:
            self.lock.acquire()  # before anything is written; a held lock fails here, naming its holder
            handoff.prepare_out_dir(self.out_dir, self.config.stage_hash(self.stage), self.parent_hash)
            if storage.is_url(self.out_ref):
                storage.restore_checkpoint(self.out_ref, self.out_dir)
        dist_utils.barrier()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._write()
        finally:
            self.lock.release()
        return False

    def _write(self) -> None:
        if self.outcome is None:
            raise RuntimeError(f"stage {self.stage} ended without training")
        if self.dist.is_main:
            handoff.save_stage(self.out_dir, self.outcome["model"], self.outcome["tokenizer"],
                               self.config.hf.max_shard_size, adapter=self.outcome["adapter"])
            manifest = handoff.write_manifest(self.out_dir, self._manifest_fields())
            if storage.is_url(self.out_ref):
                storage.publish(self.out_dir, self.out_ref)
            self.result = handoff.stage_result(self.out_ref, manifest)
        dist_utils.barrier()

    def _manifest_fields(self) -> dict:
        o, seconds = self.outcome, self.outcome["train_seconds"]
        tokens = o["metrics"].get("tokens", 0.0)
        # No step trained in this attempt: a finished stage's output was rebuilt from its last
        # checkpoint (its manifest was gone, or a file failed its sha256).
        step = o["metrics"]["step"]
        restored = step if o["metrics"].get("resumed_from_step") == step else None
        parent = None
        if self.parent_manifest:
            parent = {"path": self.parent_ref, "content_hash": self.parent_hash, "stage": self.parent_manifest["stage"]}
            if self.parent_manifest.get("external"):  # a plain Hugging Face directory: its files' digests
                parent.update(external=True, sha256=self.parent_manifest["sha256"])
        return {
            "stage": self.stage,
            "run_id": self.config.resolved_run_id(),
            "config": self.config.stage_key(self.stage),
            "config_hash": self.config.stage_hash(self.stage),
            "model_kind": model_kind(o["model"]),  # how the next stage loads it (models.load_model)
            "parent": parent,
            "data": self.data_notes,
            "metrics": {**o["metrics"], **o["evaluation"]},
            "restored_from_step": restored,
            "timings": {"wall_seconds": round(time.time() - self.started, 2), "train_seconds": round(seconds, 2),
                        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None},
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "versions": package_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # ---- what every stage builds the same way ----

    def load_parent(self) -> tuple[torch.nn.Module, Tokenizer]:
        model, tok, _ = handoff.load_stage(self.parent_dir, self.device, self.config.hf,
                                           manifest=self.parent_manifest)  # verified on entry
        return model, tok

    def load_policy(self) -> tuple[torch.nn.Module, Tokenizer]:
        """The model this stage trains: the parent, with a fresh LoRA adapter when `lora` is set
        (QLoRA: on the parent's linear layers quantized to 4 bits)."""
        lora = self.settings.lora
        quantize = lora.quantize if self.settings.quantized else None
        model, tok, _ = handoff.load_stage(self.parent_dir, self.device, self.config.hf,
                                           manifest=self.parent_manifest, quantize=quantize)
        if lora is not None:
            model = add_adapter(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                target_modules=lora.target_modules, modules_to_save=lora.modules_to_save,
                                seed=self.train_cfg.seed or 0, base=self.parent_ref)
        return model, tok

    def reference_weights_id(self) -> str:
        """What names the reference's weights for DPO's score cache: the parent's content hash and
        how it is loaded (dtype, attention kernel, 4-bit quantization)."""
        quantized = ":4bit" if self.settings.quantized else ""
        return f"{self.parent_hash}:{self.config.hf.model_dump_json()}{quantized}"

    def reference_loader(self, policy: torch.nn.Module) -> Callable[[], torch.nn.Module]:
        """How DPO and GRPO get their frozen reference, the parent: a LoRA policy without its
        adapter (no second copy of the weights), else the parent loaded again."""
        if is_adapted(policy):
            return lambda: AdapterDisabled(policy)
        return lambda: self.load_parent()[0]

    def load_data(self, tok: Tokenizer, train_raw: data_mod.RawSplit | None = None):
        """(train, val) of this stage's data; `train_raw` when the caller already read it."""
        cfg, demo = self.settings.data, self.config.demo
        train = (data_mod.tokenize(self.stage, train_raw, tok, cfg) if train_raw is not None
                 else data_mod.prepare(self.stage, cfg, demo, tok, "train"))
        val = data_mod.prepare(self.stage, cfg, demo, tok, "val")
        for split, loaded in (("train", train), ("val", val)):
            self.data_notes[split] = {"origin": loaded.origin, "rows": loaded.examples or len(loaded.dataset),
                                      "skipped_bad_rows": loaded.skipped, "dropped_too_long": loaded.dropped_too_long,
                                      "fingerprint": getattr(loaded.dataset, "_fingerprint", None)}
            if loaded.examples is not None:
                self.data_notes[split]["packed_rows"] = len(loaded.dataset)
        if len(train.dataset) == 0:
            why = (f"too little text for one block of data.max_length={cfg.max_length} tokens"
                   if data_mod.KINDS[self.stage].packs else
                   f"{train.dropped_too_long} rows longer than data.max_length={cfg.max_length} dropped, "
                   f"{train.skipped} bad rows skipped")
            raise data_mod.DataError(f"{train.origin}: no training examples left ({why})")
        return train, val

    def _loader(self, dataset, collate, shuffle: bool) -> DataLoader:
        """A DistributedSampler even in one process: its order is a function of (seed, epoch), and
        N ranks with batch B together see exactly the batches one process sees with batch N*B."""
        t = self.train_cfg
        sampler = DistributedSampler(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=shuffle, seed=t.seed or 0)
        return DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, collate_fn=collate)

    def trainer(self, model: torch.nn.Module, tok: Tokenizer, collate, train_raw: data_mod.RawSplit | None = None,
                **algorithm) -> BaseTrainer:
        """This stage's trainer (`trainers.create_trainer(stage)`) on this stage's data.
        `collate(items, pad_id)` builds a batch; `algorithm`: the trainer's own arguments."""
        train, val = self.load_data(tok, train_raw)
        collate = functools.partial(collate, pad_id=tok.pad_token_id)
        t = self.train_cfg
        mirror = (functools.partial(storage.mirror_checkpoint, self.out_dir, url=self.out_ref)
                  if storage.is_url(self.out_ref) else None)  # a retry in another pod resumes from the bucket
        trainer = create_trainer(
            self.stage, model=model,
            optimizer=configure_optimizer(model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas),
            train_loader=self._loader(train.dataset, collate, shuffle=True),
            val_loader=self._loader(val.dataset, collate, shuffle=False) if len(val.dataset) else None,
            args=t, device=self.device, save_dir=self.out_dir, on_checkpoint=mirror, **algorithm)
        if self.dist.is_main:
            log.info(self._start_line(model, trainer))
        return trainer

    def _start_line(self, model: torch.nn.Module, trainer: BaseTrainer) -> str:
        """What a person wants to know as a stage starts: data, length, where from, on what."""
        notes = self.data_notes["train"]
        read = notes["rows"] + notes["skipped_bad_rows"] + notes["dropped_too_long"]
        rows = (f"{notes['rows']:,} training examples" if data_mod.KINDS[self.stage].packs else
                f"{notes['rows']:,} of {read:,} training rows used")
        if "packed_rows" in notes:
            rows += f" (packed into {notes['packed_rows']:,} rows of {self.settings.data.max_length} tokens)"
        parent = self.parent_ref or "none (from scratch)"
        return (f"{self.stage}: {rows} from {notes['origin']}, {self.data_notes['val']['rows']:,} held out; "
                f"{trainer.estimated_total_steps()} optimizer steps; parent {parent}; "
                f"model {self._model_line(model)}; world size {self.dist.world_size} "
                f"({self._strategy()}), {self.device}, {self.train_cfg.precision}")

    def _model_line(self, model: torch.nn.Module) -> str:
        n = sum(p.numel() for p in model.parameters())
        line = f"{original_class(base_of(model)).__name__} ({n / 1e6:.1f}M parameters"
        lora = self.settings.lora
        if lora is None:
            return line + ")"
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kind = "QLoRA (4-bit base)" if self.settings.quantized else "LoRA"
        return line + f", {kind} r={lora.r} alpha={lora.alpha:g}: {trained / 1e6:.2f}M trained)"

    def _strategy(self) -> str:
        t = self.train_cfg
        extras = [name for name, on in (("cpu offload", t.fsdp_cpu_offload),
                                        ("activation checkpointing", t.activation_checkpointing)) if on]
        return " + ".join([t.strategy, *extras])

    def train(self, trainer: BaseTrainer, tok: Tokenizer) -> None:
        """Train (resuming from this stage's last checkpoint), then evaluate on held-out prompts."""
        metrics = trainer.train(resume_from="latest")
        seconds = trainer.elapsed_seconds()  # of every attempt: tokens/s over all tokens seen
        model = trainer.final_model()  # every rank takes part (fsdp gathers); rank 0 gets it
        evaluation, adapter = {}, None
        if self.dist.is_main:
            if is_adapted(model):  # hand on a plain model: the adapter merged into the weights
                adapter = adapter_state(model)
                if self.settings.quantized:  # into the parent's own weights, not their 4-bit rounding
                    model = with_adapter(handoff.load_stage(self.parent_dir, "cpu", self.config.hf,
                                                            manifest=self.parent_manifest)[0], *adapter)
                model = merge(model)
            model.to(self.device)  # fsdp gathers onto the CPU
            evaluation = heldout_metrics(self.config, self.settings.data, model, tok)
        self.outcome = {"model": model, "tokenizer": tok, "adapter": adapter, "metrics": metrics,
                        "evaluation": evaluation, "train_seconds": seconds}


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
