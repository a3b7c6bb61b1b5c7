"""A stage's run, from its parent to its published checkpoint directory: `train_stage` runs an
algorithm's recipe inside a `StageRun`, which does what every stage does the same way:

    with StageRun(algorithm, config, parent, out) as stage:  # process group, verified parent, out dir
        algorithm.recipe(stage)                               # e.g. stages/recipes/dpo.py:
            model, tok = stage.load_policy()                  #   the parent (+ a LoRA adapter if `lora`)
            trainer = stage.trainer(model, tok, ...)          #   data, loaders, optimizer, trainer
            stage.train(trainer, tok)                         #   train (resuming)
    return stage.result                                       # on a clean exit: directory written, evaluated

Its parts each live where they say what they are: the parent (stages/parent.py), the output
directory's lifecycle (stages/stage_dir.py), the data and loaders (stages/loaders.py), what
trains and what is handed on, every weight or a LoRA/QLoRA adapter (models/lora.py's
`AdapterPolicy`). On a clean exit rank 0 writes the model directory (Hugging Face layout; a LoRA
policy merged, its adapter in adapter/) and, last, the manifest, then publishes the directory
when it lives at a URL, and evaluates the model it still holds (eval.json: stages/eval_record.py).
On an exception nothing is written: a retry resumes from the trainer's last checkpoint in
`state/`."""
from __future__ import annotations

import logging
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from alignflow.models import Tokenizer, model_kind
from alignflow.models.lora import AdapterPolicy, base_of, is_adapted
from alignflow.trainers import BaseTrainer, configure_optimizer
from alignflow.trainers import distributed as dist_utils
from alignflow.trainers.packing import check_isolation
from alignflow.trainers.reference import AdapterDisabled
from alignflow.trainers.sharding import original_class

from . import data, eval_record, loaders
from .algorithm import Algorithm, get_algorithm
from .inputs import input_refs
from .parent import Parent
from .stage_dir import StageDir

log = logging.getLogger("alignflow.stage")
VERSIONED = ("alignflow", "torch", "transformers", "safetensors", "tokenizers", "datasets", "pydantic")


def train_stage(name: str, config, parent_ref: str | Path | None, out_ref: str | Path,
                inputs: dict[str, str] | None = None) -> dict | None:
    """Train the stage `name` on `parent_ref` into `out_ref`, reading the run's stages it names as
    inputs from `inputs` ({stage: directory}: stages/inputs.py); the result (handoff.stage_result)
    on rank 0, None on the others. What `python -m alignflow.stages` and the flow's task run."""
    algorithm = get_algorithm(name)
    with StageRun(algorithm, config, parent_ref, out_ref, inputs) as stage:
        algorithm.recipe(stage)
    return stage.result


class StageRun:
    def __init__(self, algorithm: Algorithm, config, parent_ref: str | Path | None, out_ref: str | Path,
                 inputs: dict[str, str] | None = None):
        self.algorithm, self.name, self.config = algorithm, algorithm.name, config
        self.settings = config.stage(self.name)  # the algorithm's section
        self.parent = Parent(parent_ref) if parent_ref else None
        # What it reads besides its parent, by role (grpo's reward models).
        self.inputs = {role: Parent(ref) for role, ref in input_refs(self.name, self.settings, inputs or {}).items()}
        self.out = StageDir(out_ref, f"stage {self.name}")  # rank 0 holds its lock: one run per out dir
        self.out_dir = self.out.local
        self.adapters = AdapterPolicy(self.settings.lora)
        self.dist = dist_utils.detect()
        self.device = torch.device(config.device) if config.device else dist_utils.default_device(self.dist)
        self.started = time.time()
        self.data: loaders.StageData | None = None
        self.outcome: dict | None = None  # what train() produced, written on exit
        self.result: dict | None = None  # rank 0, after a clean exit: what the next stage needs

    # ---- set up and finish ----

    def __enter__(self) -> "StageRun":
        """Join the process group (if torchrun started us), fetch and verify the parent, prepare
        the local working directory (a retry at a URL first restores the mirrored checkpoint)."""
        dist_utils.setup(self.device)
        data.progress_bars(self.dist.is_main)
        try:
            if self.parent is not None:
                self.parent.fetch(self.name)
            for role, other in self.inputs.items():
                other.fetch(self.name, role)
            if self.dist.is_main:
                self.out.open(self.config.stage_hash(self.name), self.parent.content_hash if self.parent else None,
                              {role: other.content_hash for role, other in self.inputs.items()})
            dist_utils.barrier()
        except BaseException:
            self.out.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                if self.outcome is None:
                    raise RuntimeError(f"stage {self.name} ended without training")
                if self.dist.is_main:
                    o = self.outcome
                    self.result = self.out.write(o["model"], o["tokenizer"], self._manifest_fields(),
                                                 self.config.hf.max_shard_size, adapter=o["adapter"])
                    self.result["evaluation"] = self._evaluate(o["model"], o["tokenizer"])
                dist_utils.barrier()
        finally:
            self.out.release()
        return False

    def _evaluate(self, model: torch.nn.Module, tok: Tokenizer) -> dict:
        """The finished stage evaluated with its model still loaded, recorded in eval.json. After
        the manifest: the stage is complete even if its evaluation fails, and a retry only
        evaluates (stages/eval_record.py)."""
        numbers = eval_record.evaluate(self.config, self.name, model, tok, self.out_dir)
        return eval_record.write_record(self.out.ref, self.config, self.name, self.result["content_hash"], numbers)

    def _manifest_fields(self) -> dict:
        o, seconds = self.outcome, self.outcome["train_seconds"]
        tokens = o["metrics"].get("tokens", 0.0)
        # No step trained in this attempt: a finished stage's output was rebuilt from its last
        # checkpoint (its manifest was gone, or a file failed its sha256).
        step = o["metrics"]["step"]
        restored = step if o["metrics"].get("resumed_from_step") == step else None
        return {
            "stage": self.name,
            "run_id": self.config.resolved_run_id(),
            "config": self.config.stage_key(self.name),
            "config_hash": self.config.stage_hash(self.name),
            "model_kind": model_kind(o["model"]),  # how the next stage loads it (models.load_model)
            "parent": self.parent.lineage() if self.parent else None,
            **({"inputs": {role: other.lineage() for role, other in self.inputs.items()}} if self.inputs else {}),
            "data": self.data.notes() if self.data else {},
            "metrics": o["metrics"],
            "restored_from_step": restored,
            "timings": {"wall_seconds": round(time.time() - self.started, 2), "train_seconds": round(seconds, 2),
                        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None},
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "versions": package_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # ---- what recipes build with ----

    def load_policy(self) -> tuple[torch.nn.Module, Tokenizer]:
        """The model this stage trains: the parent (under a new scalar head for a stage whose model
        scores: rm), with a fresh LoRA adapter when `lora` is set (QLoRA: on the parent's linear
        layers quantized to 4 bits; a scalar head is trained in full beside it)."""
        model, tok = self._load_parent(self.device, self.adapters.quantize)
        head = "score" if self.algorithm.scores else None
        return self.adapters.attach(model, seed=self.settings.train.seed or 0, base=self.parent.ref, head=head), tok

    def _load_parent(self, device, quantize: str | None = None) -> tuple[torch.nn.Module, Tokenizer]:
        if not self.algorithm.scores:
            return self.parent.load(device, self.config.hf, quantize=quantize)
        # The new head is drawn from the seed: every rank, and a resumed run, start from the same one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.train.seed or 0)
            return self.parent.load(device, self.config.hf, quantize=quantize, as_reward_model=True)

    def reference_weights_id(self) -> str:
        """Names the reference's weights for DPO's score cache (Parent.weights_id)."""
        return self.parent.weights_id(self.config.hf, self.adapters.quantize)

    def reference_loader(self, policy: torch.nn.Module) -> Callable[[], torch.nn.Module]:
        """How DPO and GRPO get their frozen reference, the parent: a LoRA policy without its
        adapter (no second copy of the weights), else the parent loaded again."""
        if is_adapted(policy):
            return lambda: AdapterDisabled(policy)
        return lambda: self.parent.load(self.device, self.config.hf)[0]

    def trainer(self, model: torch.nn.Module, tok: Tokenizer, train_raw: data.RawSplit | None = None,
                **algorithm) -> BaseTrainer:
        """This algorithm's trainer on this stage's data (`train_raw`: the training rows when the
        recipe already read them); `algorithm`: the trainer's own arguments."""
        t = self.settings.train
        self.data = loaders.load(self.name, self.algorithm.data, self.settings.data, self.config.demo, tok, train_raw)
        if self.data.train.packed:  # no packed example may see another
            check_isolation(model, len(tok), self.device)
        train_loader, val_loader = self.data.loaders(tok.pad_token_id, t.batch_size, t.seed or 0)
        trainer = self.algorithm.trainer(
            model=model, train_loader=train_loader, val_loader=val_loader, args=t, device=self.device,
            optimizer=configure_optimizer(model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas),
            save_dir=self.out_dir, on_checkpoint=self.out.checkpoint_mirror(), **algorithm)
        if self.dist.is_main:
            log.info(self._start_line(model, trainer))
            if self.data.val.cut_from is not None:
                log.info(f"{self.name} validation: {self.settings.data.max_val_rows:,} of {self.data.val.cut_from:,} "
                         "held-out rows (data.max_val_rows)")
        return trainer

    def _start_line(self, model: torch.nn.Module, trainer: BaseTrainer) -> str:
        """What a person wants to know as a stage starts: data, length, where from, on what."""
        notes = self.data.notes()
        train, t = notes["train"], self.settings.train
        read = train["rows"] + train["skipped_bad_rows"] + train["dropped_too_long"]
        expanded = sum(train.get("conversations_expanded", {}).values())
        rows = (f"{train['rows']:,} training examples" if self.algorithm.data.blocks else
                f"{train['rows']:,} of {read:,} training rows used" if not expanded else
                f"{train['rows']:,} training examples ({expanded:,} conversations as one per reply)")
        if "packed_rows" in train:
            rows += f" (packed into {train['packed_rows']:,} rows of {self.settings.data.max_length} tokens)"
        n = sum(p.numel() for p in model.parameters())
        model_line = (f"{original_class(base_of(model)).__name__} ({n / 1e6:.1f}M parameters"
                      f"{self.adapters.describe(model)})")
        strategy = " + ".join([t.strategy, *(name for name, on in (("cpu offload", t.fsdp_cpu_offload),
                                             ("activation checkpointing", t.activation_checkpointing)) if on)])
        parent = self.parent.ref if self.parent else "none (from scratch)"
        return (f"{self.name}: {rows} from {train['origin']}, {notes['val']['rows']:,} held out; "
                f"{trainer.estimated_total_steps()} optimizer steps; parent {parent}; model {model_line}; "
                f"world size {self.dist.world_size} ({strategy}), {self.device}, {t.precision}")

    def train(self, trainer: BaseTrainer, tok: Tokenizer) -> None:
        """Train (resuming from this stage's last checkpoint); the model is handed to rank 0 to write."""
        metrics = trainer.train(resume_from="latest")
        seconds = trainer.elapsed_seconds()  # of every attempt: tokens/s over all tokens seen
        model = trainer.final_model()  # every rank takes part (fsdp gathers); rank 0 gets it
        adapter = None
        if self.dist.is_main:
            model, adapter = self.adapters.hand_off(model, lambda: self._load_parent("cpu")[0])
            model.to(self.device)  # fsdp gathers onto the CPU, and evaluation runs on the stage's device
        self.outcome = {"model": model, "tokenizer": tok, "adapter": adapter, "metrics": metrics,
                        "train_seconds": seconds}


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
