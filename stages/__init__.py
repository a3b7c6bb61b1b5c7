"""One module per pipeline stage: data -> model -> trainer -> checkpoint directory.

Each stage is a plain function `run(config, parent_dir, out_dir) -> result` that runs the same
with or without Prefect; `python -m stages <stage> ...` runs one from the shell or torchrun.
The stage graph is the table below: the flows, the CLI and `python -m stages` all read it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str  # also its module, stages/<name>.py, and its trainer's registered name
    parent: str | None  # the stage whose checkpoint directory it starts from
    aligns: bool = False  # an alignment stage: the pipeline's last, chosen with --align

    @property
    def run(self) -> Callable:
        """(config, parent_dir, out_dir) -> result on rank 0, None elsewhere. Imported when
        first used, so reading the graph (the CLI's --help) does not import torch."""
        return importlib.import_module(f"{__name__}.{self.name}").run


STAGES = {s.name: s for s in (
    Stage("pretrain", parent=None),
    Stage("sft", parent="pretrain"),
    Stage("dpo", parent="sft", aligns=True),
    Stage("grpo", parent="sft", aligns=True),
)}
ALIGNERS = tuple(name for name, s in STAGES.items() if s.aligns)
CHILDREN = tuple(name for name, s in STAGES.items() if s.parent)  # stages that can re-run on a parent


def chain(align: str | None, start: str = "pretrain") -> list[str]:
    """The pipeline's stages in order: the align stage (or none) and its ancestors, from `start`
    on (a run from a Hugging Face model may skip pretraining, or go straight to alignment)."""
    if align is None:
        names = [name for name, s in STAGES.items() if not s.aligns]
    else:
        names = [align]
        while STAGES[names[0]].parent:
            names.insert(0, STAGES[names[0]].parent)
    if start not in names:
        raise ValueError(f"start: {start} is not a stage of the pipeline {' -> '.join(names)}")
    return names[names.index(start):]


def check_parent(stage: str, parent_manifest: dict, parent_ref) -> None:
    """A stage trains only on a checkpoint of its parent stage, or on a plain Hugging Face model
    directory (an external base: any stage may start from one). The flows and `python -m
    stages` both ask here."""
    if parent_manifest.get("external"):
        return
    expected, found = STAGES[stage].parent, parent_manifest.get("stage")
    if found != expected:
        raise ValueError(f"{stage} trains on a {expected} checkpoint, but {parent_ref} holds a {found} stage")
