"""bf16 and fp16 autocast train; the fp16 GradScaler skips a step with an inf gradient."""
import math

import pytest
import torch

from conftest import SequenceDataset, loader, small_model
from alignflow.trainers import SFTTrainer, configure_optimizer


def train(dtype: str, steps: int = 40, **kw):
    model = small_model(seed=0)
    data = SequenceDataset(16, seed=2)
    trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model, lr=1e-2), train_loader=loader(data, 8),
                         device="cpu", max_epochs=None, max_steps=steps, use_amp=True, amp_dtype=dtype,
                         log_interval=1, progress_bar=False, **kw)
    first = trainer.training_step([next(iter(trainer.train_loader))])["loss"]
    final = trainer.train()["loss"]
    return first, final, trainer


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains(dtype):
    first, final, trainer = train(dtype)
    assert math.isfinite(final)
    assert final < 0.7 * first, (first, final)
    assert (trainer.scaler is not None) == (dtype == "float16")


def test_fp16_scaler_skips_step_with_inf_gradient():
    model = small_model(seed=0)
    data = SequenceDataset(8, seed=2)
    optimizer = configure_optimizer(model, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    trainer = SFTTrainer(model=model, optimizer=optimizer, scheduler=scheduler, train_loader=loader(data, 8),
                         device="cpu", max_steps=3, use_amp=True, amp_dtype="float16", progress_bar=False)
    batch = next(iter(trainer.train_loader))
    trainer.training_step([batch])  # one normal step so the optimizer has state
    scale_before = trainer.scaler.get_scale()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_before = optimizer.param_groups[0]["lr"]

    target = model.model.layers[0].mlp.up_proj.weight
    handle = target.register_hook(lambda g: torch.full_like(g, float("inf")))
    out = trainer.training_step([batch])
    handle.remove()

    assert out["skipped_step"] == 1.0
    assert trainer.scaler.get_scale() == scale_before / 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights_before[k]), k
    assert optimizer.param_groups[0]["lr"] == lr_before  # the schedule does not advance on a skip

    out = trainer.training_step([batch])  # and the next clean step goes through
    assert out["skipped_step"] == 0.0
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, weights_before["model.layers.0.mlp.up_proj.weight"])
