"""SFT packing: several examples in each row of `max_length` tokens, each seeing only itself.

Padded SFT batches spend most of their compute on padding when lengths vary as chat data does.
`pack_examples` places the examples into rows by best-fit decreasing (longest first, each into
the row it leaves with the least room), so rows come out nearly full and few.

Inside a row the position ids restart at 0 for every example, and that is how the model learns
where one example ends: the built-in model builds a block-diagonal causal mask from them, and
transformers models do the same (sdpa, eager) or hand flash_attention_2 per-example lengths. So
no token attends to another example, and each example's positions (RoPE) are those it has
alone: its loss and log-probs are the ones it would have in a batch of its own. The first token
of every example carries no label, since the token before it belongs to another example.

A model that does not read the boundaries from the position ids would silently let examples
attend to each other (a transformers model whose config has use_cache on, an architecture
without packed-sequence support): `check_isolation` finds out with two short forwards, before
training, and refuses."""
from __future__ import annotations

import bisect

import torch
from torch import nn

from .logprobs import IGNORE_INDEX
from .modules import logits_of


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Rows of `input_ids`, `labels`, `position_ids` (lists), each at most `max_length` long.
    `examples`: dicts with `input_ids` and `labels` (−100: no loss), none longer than `max_length`.
    Deterministic: the same examples give the same rows."""
    lengths = [len(e["input_ids"]) for e in examples]
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than a packed row's {max_length}")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first that fits
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([i])
            bisect.insort(room, (max_length - lengths[i], len(rows) - 1))
        else:
            free, row = room.pop(k)
            rows[row].append(i)
            bisect.insort(room, (free - lengths[i], row))
    return [_joined([examples[i] for i in row]) for row in rows]


def _joined(examples: list[dict]) -> dict:
    input_ids, labels, position_ids = [], [], []
    for e in examples:
        ids = list(e["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(e["labels"])[1:]  # its first token follows another example
        position_ids += range(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@torch.no_grad()
def check_isolation(model: nn.Module, vocab_size: int, device: torch.device | str = "cpu") -> None:
    """Raise ValueError unless `model`, given packed position ids and no attention mask, scores a
    sequence behind another exactly as it scores it alone (to 1e-3 of the logits' scale in
    fp32 weights, 2e-2 in 16-bit ones; a leak moves them by a tenth or more)."""
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab_size, (1, n), generator=g).to(device) for n in (5, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        packed = logits_of(model(input_ids=torch.cat([first, second], 1), position_ids=positions))[0, 5:].float()
        alone = logits_of(model(input_ids=second))[0].float()
    finally:
        model.train(was_training)
    fp32 = next(model.parameters()).dtype == torch.float32
    gap = ((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-6)).item()
    if gap > (1e-3 if fp32 else 2e-2):
        raise ValueError(f"{type(model).__name__} lets packed examples attend to each other (a sequence behind "
                         f"another scores {gap:.2g} off, relative, from alone): it does not read sequence starts "
                         "from position_ids (a transformers model needs config.use_cache False and an architecture "
                         "with packed-sequence support); turn sft.data.packing off")
