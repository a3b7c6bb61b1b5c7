'''A whole algorithm in one module, as a package outside alignflow would ship it: SLiC-HF's
calibration loss (Zhao et al. 2023) on triples of its own columns. tests/test_algorithm_plugin.py
copies it beside a dist-info whose entry point registers it; alignflow itself is not touched.'''
from __future__ import annotations

import torch
from pydantic import Field

from alignflow.stages import Algorithm, Headline, Panel
from alignflow.stages import demo
from alignflow.stages.data import DataKind
from alignflow.stages.formats import prompt_and_completion, texts_problem
from alignflow.stages.settings import StageConfig, TrainConfig
from alignflow.trainers import BaseTrainer
from alignflow.trainers.dpo import collate_pairs, concatenated_logps


# ---- settings and the loss ----

class SLiCConfig(StageConfig):
    delta: float = Field(1.0, gt=0, description="the margin the good answer's log-prob must clear")
    lam: float = Field(0.1, ge=0, description="weight of the good answer's per-token NLL")
    train: TrainConfig = TrainConfig(lr=1e-4)


def slic_loss(good_logps, bad_logps, good_lengths, delta: float, lam: float) -> torch.Tensor:
    """Per triple: max(0, δ − log π(good) + log π(bad)) + λ · (−log π(good) / |good|)."""
    return torch.relu(delta - good_logps + bad_logps) + lam * (-good_logps / good_lengths)


# ---- the trainer ----

class SLiCTrainer(BaseTrainer):
    progress_metrics = (("accuracy", "acc"),)

    def __init__(self, model, optimizer, train_loader, val_loader=None, *, delta: float = 1.0, lam: float = 0.1,
                 **kwargs):
        super().__init__(model, optimizer, train_loader, val_loader, **kwargs)
        self.delta, self.lam = delta, lam

    def count_items(self, batch: dict) -> int:
        return batch["chosen_input_ids"].shape[0]

    def compute_loss(self, model, batch):
        good, bad, good_lengths, _ = concatenated_logps(model, batch)
        losses = slic_loss(good, bad, good_lengths, self.delta, self.lam)
        return losses.sum(), {"margin": (good - bad).detach().sum(), "accuracy": (good > bad).float().sum()}


# ---- its data: a question, a good and a bad answer ----

def triples(s: demo.DemoSplit) -> list[dict]:
    """The demo's word problems: the whole solution is good, one that stops before its answer
    line is bad (shorter, so a model that has not learnt the preference gives it more mass)."""
    rows = []
    for p in (s.rng.choice(s.problems) for _ in range(s.count(s.sizes.preference_pairs))):
        worked = p.solution()
        rows.append({"question": demo.user(p.question), "good": demo.assistant(worked),
                     "bad": demo.assistant(worked.split("\n")[0])})
    return rows


def encode(row: dict, tok) -> dict:
    return {**prompt_and_completion(tok, row["question"], row["good"], "chosen_"),
            **prompt_and_completion(tok, row["question"], row["bad"], "rejected_")}


def row_problem(row: dict):
    return texts_problem(row, ("question", "good", "bad"))


TRIPLES = DataKind("triples", (("question", "good", "bad"),), row_problem, ("chosen_input_ids", "rejected_input_ids"),
                   collate_pairs, triples, encode=encode)


# ---- the recipe and the declaration ----

def train(stage) -> None:
    model, tok = stage.load_policy()
    stage.train(stage.trainer(model, tok, delta=stage.settings.delta, lam=stage.settings.lam), tok)


ALGORITHM = Algorithm(
    name="slic", parent="sft", aligns=True, settings=SLiCConfig, trainer=SLiCTrainer, data=TRIPLES, recipe=train,
    headline=(Headline("SLiC val accuracy", "val_accuracy", cases="val_items"),),
    panels=(Panel("SLiC margin", (("margin", "train"), ("val_margin", "validation"))),))
