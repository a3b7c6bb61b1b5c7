"""Gradient accumulation normalised by tokens equals one big batch."""
import copy

import torch

from conftest import SequenceDataset, loader, small_model
from alignflow.trainers import SFTTrainer


def one_step(model, batch_size: int, accum: int, lr: float = 1.0):
    """One optimizer step of plain SGD (lr 1): the weight change *is* the gradient."""
    model = copy.deepcopy(model)
    data = SequenceDataset(8, min_len=3, max_len=24, seed=5)
    trainer = SFTTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                         train_loader=loader(data, batch_size), device="cpu", max_steps=1,
                         grad_accum_steps=accum, max_grad_norm=None, progress_bar=False)
    metrics = trainer.train()
    return model, metrics


def test_two_by_four_equals_eight_by_one():
    base = small_model(seed=3)
    big, m_big = one_step(base, batch_size=8, accum=1)
    small, m_small = one_step(base, batch_size=2, accum=4)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert abs(m_big["loss"] - m_small["loss"]) < 1e-6
    # The step really moved the weights, so equality above is not trivially true.
    moved = max((a - b).abs().max().item() for a, b in zip(base.state_dict().values(), big.state_dict().values()))
    assert moved > 1e-3


def test_averaging_micro_batch_means_would_differ():
    """The test above can fail: the pre-2024 recipe (mean per micro-batch, then / accum) gives a
    different gradient on variable-length data."""
    base = small_model(seed=3)
    big, _ = one_step(base, batch_size=8, accum=1)
    naive = copy.deepcopy(base)
    data = SequenceDataset(8, min_len=3, max_len=24, seed=5)
    for batch in loader(data, 2):
        logits = naive(batch["input_ids"], batch["attention_mask"])
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        (loss / 4).backward()
    with torch.no_grad():
        for p in naive.parameters():
            p -= p.grad
    diff = max((a - b).abs().max().item() for a, b in zip(big.state_dict().values(), naive.state_dict().values()))
    assert diff > 1e-4
