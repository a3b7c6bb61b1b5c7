"""Log-probabilities of label tokens, in fp32, shared by the preference and RL trainers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align labels with logits: position t scores token t+1; the last position scores nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(label_t) per position [B, L] for *already shifted* labels; 0 where label is −100.

    Cross entropy with reduction="none" is log_softmax + gather without materialising the
    full fp32 log-softmax twice."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(labels.shape)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs, completion length) per sequence, for labels in the
    input's own positions (−100 on prompt and padding)."""
    targets = shift_labels(labels)
    return token_logps(logits, targets).sum(-1), (targets != IGNORE_INDEX).sum(-1)
