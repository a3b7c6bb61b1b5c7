"""A causal LM's log-probs of its label tokens, with the LM head run only where a label is.

The head is a hidden → vocabulary matmul at every position: at a 32k vocabulary it is 40-60%
of a small Llama's matmul work, and its logits are the step's largest tensor. Prompt tokens,
padding and each sequence's last position carry no label, so their logits would only be thrown
away: on bench/vs_trl.py's SFT data 32% of a padded batch's positions carry a label, 72% of a
packed one's. Here the head is given only the labelled positions' hidden states, [1, N, H],
through a hook on its input that lives for one forward, and the log-probs are scattered back
to [B, L].

transformers ≥ 5.24 can do the same for its own models (a boolean `logits_to_keep`); the hook
also covers the built-in model, older versions and remote code. It sits inside the model's own
forward, so DDP, FSDP2 (the head is in the root unit), peft adapters and activation
checkpointing see an ordinary forward. Where no hook can be placed (a torch.compile'd model,
whose graph must not change per call, or a model with neither a head module nor a
`final_norm()`), the full logits are computed and the labelled rows taken from them: the same
numbers, without the saving."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .logprobs import IGNORE_INDEX, SelectiveLogSoftmax, shift_labels
from .modules import logits_of, unwrap
from .reference import AdapterDisabled


def _user_model(model: nn.Module) -> nn.Module | None:
    """The module that owns the head, inside DDP and a LoRA reference's view; None when
    compiled."""
    if hasattr(model, "_orig_mod"):
        return None
    model = unwrap(model)
    return unwrap(model.policy) if isinstance(model, AdapterDisabled) else model


@contextlib.contextmanager
def head_rows(model: nn.Module, index: torch.Tensor) -> Iterator[list[bool]]:
    """Within: the model's head sees only rows `index` of its flattened [B·L, H] input, so the
    logits come out [1, N, V]. Yields a flag that is [True] once the hook has fired."""
    fired = [False]

    def select(hidden: torch.Tensor) -> torch.Tensor:
        fired[0] = True
        return hidden.flatten(0, 1).index_select(0, index).unsqueeze(0)

    owner = _user_model(model)
    head = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
    handle = None
    if isinstance(head, nn.Module):  # Hugging Face models (a peft wrapper is a module too)
        handle = head.register_forward_pre_hook(lambda _m, args: (select(args[0]), *args[1:]))
    elif hasattr(owner, "final_norm"):  # alignflow's own model: its tied head is a matmul, not a module
        handle = owner.final_norm().register_forward_hook(lambda _m, _args, out: select(out))
    try:
        yield fired
    finally:
        if handle is not None:
            handle.remove()


def label_logps(model: nn.Module, labels: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run `model(**inputs)` and return log p(label) [B, L] in fp32 for labels already shifted to
    the logits' positions (0 where the label is −100), and with `with_entropy` the entropy of
    those positions' next-token distributions [B, L] (0 elsewhere, no gradient)."""
    flat = labels.flatten()
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    with head_rows(model, index) as fired:
        logits = logits_of(model(**inputs))
    rows = logits[0] if fired[0] else logits.flatten(0, 1).index_select(0, index)
    logps, entropy = SelectiveLogSoftmax.apply(rows, flat.index_select(0, index), float(temperature), with_entropy)
    zeros = torch.zeros(flat.shape[0], dtype=logps.dtype, device=logps.device)
    logps = zeros.index_copy(0, index, logps).view(labels.shape)
    return logps, zeros.index_copy(0, index, entropy).view(labels.shape) if with_entropy else None


def label_sequence_logps(model: nn.Module, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of label-token log-probs, label count) per sequence, for labels in the input's own
    positions (−100 on prompt and padding)."""
    targets = shift_labels(labels)
    logps, _ = label_logps(model, targets, **inputs)
    return logps.sum(-1), (targets != IGNORE_INDEX).sum(-1)
