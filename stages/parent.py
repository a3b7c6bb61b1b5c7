"""The checkpoint a stage trains on: a stage directory (local or at a URL) or a plain Hugging Face
model directory, fetched and verified once, then loaded as often as the stage needs it. A
stage's other inputs (grpo's reward models: stages/inputs.py) are held the same way."""
from __future__ import annotations

from pathlib import Path

import torch

from alignflow.models import Tokenizer
from alignflow.trainers import distributed as dist_utils

from . import handoff, storage
from .algorithm import check_parent
from .inputs import check_input
from .settings import HFConfig


class Parent:
    def __init__(self, ref: str | Path):
        self.ref = str(ref)  # as given: the lineage recorded
        self.dir: Path | None = None  # a verified local copy
        self.manifest: dict | None = None

    def fetch(self, stage: str, role: str | None = None) -> None:
        """A verified local copy (one download per node), which `stage` may train on (or read as
        its input `role`). Every rank."""
        if dist_utils.detect().local_rank == 0 and storage.is_url(self.ref):
            storage.localize(self.ref)
        dist_utils.barrier()
        self.dir = storage.local_dir(self.ref)
        self.manifest = storage.read_manifest(self.dir, verify=True)
        if role is None:
            check_parent(stage, self.manifest, self.ref)
        else:
            check_input(stage, role, self.manifest, self.dir, self.ref)

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def load(self, device: torch.device | str, hf: HFConfig, quantize: str | None = None,
             as_reward_model: bool = False) -> tuple[torch.nn.Module, Tokenizer]:
        """Its model (quantize "4bit": QLoRA's base; `as_reward_model`: under a new scalar head)
        and tokenizer, as the manifest says to load them."""
        model, tok, _ = handoff.load_stage(self.dir, device, hf, manifest=self.manifest, quantize=quantize,
                                           as_reward_model=as_reward_model)
        return model, tok

    def weights_id(self, hf: HFConfig, quantize: str | None) -> str:
        """What names the weights a reference loaded from it computes with, for DPO's score cache:
        its content hash and how it is loaded (dtype, attention kernel, 4-bit quantization)."""
        return f"{self.content_hash}:{hf.model_dump_json()}" + (f":{quantize}" if quantize else "")

    def lineage(self) -> dict:
        """The child manifest's `parent`: where it was, what it held, and for a plain Hugging
        Face directory the digest of each of its files."""
        out = {"path": self.ref, "content_hash": self.content_hash, "stage": self.manifest["stage"]}
        if self.manifest.get("external"):
            out.update(external=True, sha256=self.manifest["sha256"])
        return out
