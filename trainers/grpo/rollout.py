"""GRPO's batches: prompt batches (left-padded, with the columns reward functions read), and on
rollout batches the log-probs and targets of the completion tokens.

Rollout batches, one per prompt batch, hold B·G rows of prompt + completion:
    input_ids [N, P+T], attention_mask [N, P+T], completion_mask [N, T] (1 up to and including
    the first EOS), advantages [N], and when needed old_logps / ref_logps [N, T]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..logprobs import IGNORE_INDEX
from ..scoring import label_logps

PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask", "prompt")


def completion_logps(model: nn.Module, batch: dict, temperature: float,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) [N, T] of the completion tokens (0 after a completion's end) under logits / T,
    and with `with_entropy` each of those positions' entropy [N, T] (no gradient). The head
    runs only at the positions that predict a completion token (trainers/scoring.py)."""
    T = batch["completion_mask"].shape[1]
    mask = batch["attention_mask"]
    # Prompts are left-padded: positions count real tokens only, as in generation (a transformers
    # model would otherwise number them from the padding on).
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    targets = F.pad(completion_targets(batch), (batch["input_ids"].shape[1] - T - 1, 1), value=IGNORE_INDEX)
    logps, entropy = label_logps(model, targets, temperature, with_entropy, input_ids=batch["input_ids"],
                                 attention_mask=mask, position_ids=positions)
    # position t predicts token t+1
    return logps[:, -T - 1:-1], entropy[:, -T - 1:-1] if with_entropy else None


def completion_targets(batch: dict) -> torch.Tensor:
    T = batch["completion_mask"].shape[1]
    return batch["input_ids"][:, -T:].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Prompt batch from dicts {"prompt_input_ids": list[int], **other columns}.

    Prompts are LEFT-padded so every row's completion starts at the same column; the other
    columns (e.g. `prompt` texts, `answer`) stay lists, handed to the reward functions."""
    width = max(len(item["prompt_input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["prompt_input_ids"])
        ids[row, width - n:] = torch.tensor(item["prompt_input_ids"], dtype=torch.long)
        mask[row, width - n:] = 1
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask}
    batch.update({k: [item[k] for item in items] for k in items[0] if k != "prompt_input_ids"})
    return batch


def repeat_each(values, times: int) -> list:
    """[a, b] -> [a, a, b, b] for times=2: the layout of a prompt's generations."""
    return [v for v in values for _ in range(times)]
