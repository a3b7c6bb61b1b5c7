"""Clipping by global norm: the logged norm is the pre-clip norm, the update uses the clipped one."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import SequenceDataset, loader, small_model
from alignflow.trainers import SFTTrainer


def manual_grad_norm(model, batches) -> float:
    """Token-normalised loss over all micro-batches, backward, global L2 norm."""
    model = copy.deepcopy(model)
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        logits = model(b["input_ids"], b["attention_mask"])
        targets = F.pad(b["labels"][:, 1:], (0, 1), value=-100)
        (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") / n).backward()
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_logged_norm_is_pre_clip_and_update_uses_clipped(max_norm):
    model = small_model(seed=1)
    batches = list(loader(SequenceDataset(8, seed=4), 4))
    expected = manual_grad_norm(model, batches)

    seen = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.update(
        norm=torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()))
    trainer = SFTTrainer(model=model, optimizer=optimizer, train_loader=batches, device="cpu", max_steps=1,
                         grad_accum_steps=2, max_grad_norm=max_norm, progress_bar=False)
    out = trainer.training_step(batches)

    assert out["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert seen["norm"] <= max_norm * (1 + 1e-5)
    if max_norm < 1:  # this case must really clip
        assert expected > max_norm
        assert seen["norm"] == pytest.approx(max_norm, rel=1e-4)
    else:
        assert seen["norm"] == pytest.approx(expected, rel=1e-5)
