"""Causal-LM cross entropy: SFT on masked labels, pretraining on packed text."""
from __future__ import annotations

import math

import torch

from .base import BaseTrainer
from .logprobs import IGNORE_INDEX, shift_labels, token_logps
from .modules import logits_of


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
    """Right-pad `input_ids` (and `labels`, if present) to the batch's longest example."""
    width = max(len(x["input_ids"]) for x in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        input_ids[row, :n] = torch.as_tensor(x["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(x["labels"] if "labels" in x else x["input_ids"])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_packed(items: list[dict], pad_id: int) -> dict:
    """Packed rows (trainers.packing) -> a batch with `position_ids`; right padding forms one more
    sequence of its own (positions from 0, label −100). `attention_mask` marks the real tokens
    for counting only: the model is given the position ids, which say where each example starts."""
    batch = collate_causal_lm(items, pad_id)
    width = batch["input_ids"].shape[1]
    position_ids = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["position_ids"])
        position_ids[row, :n] = torch.as_tensor(x["position_ids"])
        position_ids[row, n:] = torch.arange(width - n)
    return {**batch, "position_ids": position_ids}


class SFTTrainer(BaseTrainer):
    """Batches: `input_ids`, optional `attention_mask`, optional `labels` (−100 = no loss).
    A packed batch (`collate_packed`) also carries `position_ids`: the model then gets those
    instead of the mask, and attends within each example only."""

    def count_items(self, batch: dict) -> int:
        return int((next_token_labels(batch) != IGNORE_INDEX).sum())

    def compute_loss(self, model, batch):
        if "position_ids" in batch:
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits = logits_of(out)
        # Cross entropy as the sum of the label tokens' log-probs: fp32 chunk by chunk (bf16 logits
        # lose too much precision in log-sum-exp), never a full fp32 copy of the logits.
        return -token_logps(logits, next_token_labels(batch)).sum(), {}

    def evaluate(self) -> dict[str, float]:
        """Validation loss plus perplexity, which only means something for a token-level loss."""
        result = super().evaluate()
        if "val_loss" in result:
            result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
        return result


class PretrainTrainer(SFTTrainer):
    """The same loss on packed text blocks: batches usually carry only `input_ids`."""
