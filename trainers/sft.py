"""Causal-LM cross entropy: SFT on masked labels (several examples packed to a row, or padded),
pretraining on blocks of text."""
from __future__ import annotations

import math

import torch

from .base import BaseTrainer
from .logprobs import IGNORE_INDEX, shift_labels
from .scoring import label_logps


def next_token_labels(batch: dict) -> torch.Tensor:
    """Labels aligned with the logits: position t predicts token t+1.

    Batches carry `labels` in the input's own positions (Hugging Face convention, −100 on
    prompt and padding). Without labels, every real token is a target (pretraining)."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return shift_labels(labels)


def collate_causal_lm(items: list[dict], pad_id: int) -> dict:
    """Right-pad `input_ids` (and `labels`, if present) to the batch's longest example.

    Packed rows (trainers.packing: they carry `position_ids`) keep them, and the right padding
    forms one more sequence of its own (positions from 0, label −100); `attention_mask` then
    marks the real tokens for counting only: the model is given the position ids, which say
    where each example starts."""
    width = max(len(x["input_ids"]) for x in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in items[0]
    position_ids = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        input_ids[row, :n] = torch.as_tensor(x["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(x["labels"] if "labels" in x else x["input_ids"])
        if packed:
            position_ids[row, :n] = torch.as_tensor(x["position_ids"])
            position_ids[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {**batch, "position_ids": position_ids} if packed else batch


class SFTTrainer(BaseTrainer):
    """Batches: `input_ids`, optional `attention_mask`, optional `labels` (−100 = no loss).
    A batch of packed rows also carries `position_ids`: the model then gets those instead of the
    mask, and attends within each example only."""

    def count_items(self, batch: dict) -> int:
        return int((next_token_labels(batch) != IGNORE_INDEX).sum())

    def compute_loss(self, model, batch):
        if "position_ids" in batch:
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        # Σ −log p(label): the cross entropy's sum, which the loop divides by the step's label
        # tokens; fp32, and the head runs only at labelled positions (scoring.py).
        logps, _ = label_logps(model, next_token_labels(batch), **inputs)
        return -logps.sum(), {}

    def evaluate(self) -> dict[str, float]:
        """Validation loss plus perplexity, which only means something for a token-level loss."""
        result = super().evaluate()
        if "val_loss" in result:
            result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
        return result


class PretrainTrainer(SFTTrainer):
    """The same loss on blocks of text: batches carry only `input_ids` (and their mask)."""
