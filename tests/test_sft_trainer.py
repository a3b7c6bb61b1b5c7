"""SFTTrainer/PretrainTrainer behaviour: learning, evaluation, early stopping, the factory."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import SequenceDataset, loader, small_model
from alignflow.trainers import (EarlyStopping, PretrainTrainer, SFTTrainer, configure_optimizer, create_trainer,
                      get_trainer_class, register_trainer)


def test_tiny_model_overfits_a_fixed_batch():
    from alignflow.models import LlamaForCausalLM, get_preset

    torch.manual_seed(0)
    model = LlamaForCausalLM(get_preset("tiny", vocab_size=64))
    batch = {"input_ids": torch.randint(0, 64, (8, 32))}
    trainer = PretrainTrainer(model=model, optimizer=configure_optimizer(model, lr=3e-3, weight_decay=0.0),
                              train_loader=[batch], device="cpu", max_epochs=None, max_steps=150,
                              progress_bar=False)
    metrics = trainer.train()
    assert metrics["loss"] < 0.05, metrics


def test_pretrain_labels_default_to_inputs_and_skip_padding():
    from alignflow.trainers.sft import next_token_labels

    batch = {"input_ids": torch.tensor([[5, 6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert next_token_labels(batch).tolist() == [[6, 7, -100, -100]]
    batch["labels"] = torch.tensor([[-100, 6, 7, -100]])
    assert next_token_labels(batch).tolist() == [[6, 7, -100, -100]]


def test_validation_loss_falls_and_metrics_file(tmp_path):
    model = small_model(seed=0)
    data = SequenceDataset(32, seed=7)
    trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model, lr=1e-2), train_loader=loader(data, 8),
                         val_loader=loader(data, 8), device="cpu", max_epochs=6, log_interval=2,
                         save_dir=tmp_path, progress_bar=False)
    before = trainer.evaluate()["val_loss"]
    metrics = trainer.train()
    assert metrics["val_loss"] < before - 0.3
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["step"] == 24 and metrics["epoch"] == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(2, 25, 2))
    assert sum("val_loss" in r for r in records) == 6  # once per epoch
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records if "loss" in r)


def test_early_stopping_stops_after_patience():
    model = small_model(seed=0)
    data = SequenceDataset(16, seed=7)
    optimizer = configure_optimizer(model, lr=0.0)  # nothing improves
    trainer = SFTTrainer(model=model, optimizer=optimizer, train_loader=loader(data, 4), val_loader=loader(data, 8),
                         device="cpu", max_epochs=None, max_steps=100, eval_interval=2, progress_bar=False,
                         early_stopping=EarlyStopping(metric="val_loss", mode="min", patience=3, min_delta=1e-3))
    metrics = trainer.train()
    assert metrics["step"] == 8  # evals at 2 (best), 4, 6, 8: three without improvement


def test_early_stopping_rule():
    es = EarlyStopping(metric="acc", mode="max", patience=2, min_delta=0.05)
    assert [es.update(v) for v in (0.5, 0.52, 0.6, 0.61, 0.64)] == [False, False, False, False, True]
    with pytest.raises(ValueError):
        EarlyStopping(mode="best")


class HFStyle(nn.Module):
    """A model that returns an object with `.logits`, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.inner = small_model(seed=0)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.inner(input_ids, attention_mask))


def test_models_returning_objects_with_logits_train():
    model = HFStyle()
    data = SequenceDataset(16, seed=7)
    trainer = create_trainer("sft", model=model, optimizer=configure_optimizer(model, lr=1e-2),
                             train_loader=loader(data, 8), device="cpu", max_epochs=3, progress_bar=False)
    first = trainer.training_step([next(iter(trainer.train_loader))])["loss"]
    assert trainer.train()["loss"] < first


def test_trainer_registry():
    assert get_trainer_class("sft") is SFTTrainer
    assert get_trainer_class("Pretrain") is PretrainTrainer
    assert get_trainer_class("dpo").__name__ == "DPOTrainer" and get_trainer_class("grpo").__name__ == "GRPOTrainer"
    with pytest.raises(ValueError, match="registered"):
        get_trainer_class("ppo")

    class Custom(SFTTrainer):
        pass

    register_trainer("custom", Custom)
    assert get_trainer_class("custom") is Custom


def test_tensorboard_writer(tmp_path):
    pytest.importorskip("tensorboard")
    model = small_model(seed=0)
    trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model), train_loader=loader(SequenceDataset(8), 4),
                         device="cpu", max_steps=2, log_interval=1, save_dir=tmp_path, tensorboard=True,
                         progress_bar=False)
    trainer.train()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_compiled_model_trains_and_saves_plain_names(tmp_path):
    """torch.compile's wrapper never leaks into checkpoints ("eager" backend: the wrapper
    without inductor's minute-long CPU compile)."""
    from safetensors.torch import load_file

    model = small_model(seed=0)
    trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model), train_loader=loader(SequenceDataset(8), 4),
                         device="cpu", max_steps=2, save_dir=tmp_path, compile="eager", progress_bar=False)
    assert trainer.model is not model
    trainer.train()
    saved = load_file(trainer.last_checkpoint / "model.safetensors")
    assert set(saved) == set(model.state_dict())
