"""Checkpoints: integrity checks that name the bad file, keep-last-K, atomicity, no pickle."""
import json

import pytest
import torch

from conftest import SequenceDataset, loader, small_model
from alignflow.trainers import CheckpointError, NonFiniteLossError, SFTTrainer, configure_optimizer, latest_checkpoint


def make_trainer(save_dir, max_steps=6, save_interval=2, keep_last=2, **kw):
    model = small_model(seed=0)
    return SFTTrainer(model=model, optimizer=configure_optimizer(model, lr=1e-2), device="cpu",
                      train_loader=loader(SequenceDataset(32, seed=3), 4), max_steps=max_steps,
                      save_dir=save_dir, save_interval=save_interval, keep_last=keep_last,
                      progress_bar=False, **kw)


def test_keep_last_k_and_layout(tmp_path):
    make_trainer(tmp_path).train()
    ckpts = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]
    latest = latest_checkpoint(tmp_path)
    meta = json.loads((latest / "trainer_state.json").read_text())
    assert meta["step"] == 6
    assert set(meta["sha256"]) == {"model.safetensors", "training_state.pt", "rng-rank0.pt"}
    # Everything but the weights is plain tensors and containers: loadable without pickle's code paths.
    state = torch.load(latest / "training_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "scaler", "extra"}
    torch.load(latest / "rng-rank0.pt", weights_only=True)


def test_unfinished_tmp_checkpoint_is_ignored(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    (tmp_path / "state" / "step-00000009.tmp").mkdir()  # a crash mid-write
    assert latest_checkpoint(tmp_path).name == "step-00000002"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_weights_fail_with_the_file_named(tmp_path, damage):
    make_trainer(tmp_path, max_steps=2).train()
    weights = latest_checkpoint(tmp_path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    trainer = make_trainer(tmp_path, max_steps=4)
    with pytest.raises(CheckpointError, match=str(weights)):
        trainer.train(resume_from="latest")


def test_missing_state_file_is_named(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    state = latest_checkpoint(tmp_path) / "training_state.pt"
    state.unlink()
    with pytest.raises(CheckpointError, match=str(state)):
        make_trainer(tmp_path, max_steps=4).train(resume_from="latest")


def test_a_record_that_leaves_out_the_weights_is_refused(tmp_path):
    """A crafted trainer_state.json that does not list model.safetensors cannot vouch for it."""
    make_trainer(tmp_path, max_steps=2).train()
    record = latest_checkpoint(tmp_path) / "trainer_state.json"
    meta = json.loads(record.read_text())
    del meta["sha256"]["model.safetensors"]
    record.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{record} does not list model.safetensors"):
        make_trainer(tmp_path, max_steps=4).train(resume_from="latest")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, save_interval=2, keep_last=5)
    original = trainer.compute_loss

    def poisoned(model, batch):
        loss, metrics = original(model, batch)
        return (loss * float("nan") if trainer.global_step == 4 else loss), metrics

    trainer.compute_loss = poisoned
    with pytest.raises(NonFiniteLossError, match="step 5.*step-00000004"):
        trainer.train()
    good = latest_checkpoint(tmp_path)
    assert good.name == "step-00000004"
    meta = json.loads((good / "trainer_state.json").read_text())
    # The weights that were saved are intact and still load.
    fresh = make_trainer(tmp_path, max_steps=4)
    fresh.load_checkpoint(good)
    assert fresh.global_step == meta["step"] == 4
    assert all(torch.isfinite(p).all() for p in fresh.model.parameters())


def fail_saving_at_step(monkeypatch, trainer, step, error):
    """torch.save raises `error` while the checkpoint of `step` is written (a full disk)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if trainer.global_step == step and str(f).endswith("training_state.pt"):
            with open(f, "wb") as out:  # the part that reached the disk before it filled up
                out.write(b"PK\x03\x04 half a zip")
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_during_save_removes_the_tmp_dir_and_names_the_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=4, save_interval=2)
    fail_saving_at_step(monkeypatch, trainer, 4, OSError(28, "No space left on device"))
    with pytest.raises(OSError) as info:
        trainer.train()
    assert info.value.errno == 28
    assert str(info.value) == (f"[Errno 28] writing checkpoint {tmp_path / 'state' / 'step-00000004'} failed: "
                               "No space left on device")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["step-00000002"]  # no step-00000004.tmp
    monkeypatch.undo()
    # The previous complete checkpoint is intact: its sha256s verify and training resumes from it.
    resumed = make_trainer(tmp_path, max_steps=4, save_interval=2)
    assert resumed.train(resume_from="latest")["resumed_from_step"] == 2
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_zip_writer_failure_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=2, save_interval=2)
    fail_saving_at_step(monkeypatch, trainer, 2, RuntimeError(
        "[enforce fail at inline_container.cc:626] . unexpected pos 2574848 vs 2574736\nframe #0: c10::Error"))
    with pytest.raises(CheckpointError) as info:
        trainer.train()
    assert str(info.value) == (f"writing checkpoint {tmp_path / 'state' / 'step-00000002'} failed (disk full?): "
                               "[enforce fail at inline_container.cc:626] . unexpected pos 2574848 vs 2574736")
    assert list((tmp_path / "state").iterdir()) == []
