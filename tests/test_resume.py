"""A run killed with SIGKILL and resumed ends bitwise where an uninterrupted run ends."""
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "scripts" / "train_worker.py"
# 24 sequences, batch 4: 6 steps an epoch, 3 epochs. Checkpoints every 4 steps, so the one the
# resumed run starts from (step 8) sits in the middle of a shuffled epoch.
ARGS = ["--global-batch", "4", "--epochs", "3", "--num-seqs", "24", "--shuffle", "--save-interval", "4"]


def worker(*extra, expect_kill=False):
    proc = subprocess.run([sys.executable, str(WORKER), *ARGS, *extra],
                          capture_output=True, text=True, timeout=240)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, lora):
    """A LoRA run's checkpoints hold the adapter alone (its base is frozen): resuming rebuilds the
    base, and the result is still bitwise the uninterrupted one."""
    extra = ("--lora", str(lora), "--lora-dropout", "0.1") if lora else ()  # dropout: RNG to restore
    worker("--out", str(tmp_path / "straight.safetensors"), "--save-dir", str(tmp_path / "a"), *extra)
    run_dir = tmp_path / "b"
    worker("--out", str(tmp_path / "never.safetensors"), "--save-dir", str(run_dir), "--kill-at", "10", *extra,
           expect_kill=True)
    assert not (tmp_path / "never.safetensors").exists()
    assert sorted(p.name for p in (run_dir / "state").iterdir()) == ["step-00000004", "step-00000008"]
    if lora:  # the adapter and what trains, not the frozen base
        saved = load_file(run_dir / "state" / "step-00000008" / "model.safetensors")
        assert saved and all("lora_" in name for name in saved), sorted(saved)[:4]
    worker("--out", str(tmp_path / "resumed.safetensors"), "--save-dir", str(run_dir), "--resume", *extra)

    straight = load_file(tmp_path / "straight.safetensors")
    resumed = load_file(tmp_path / "resumed.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name

    # metrics.jsonl reads as one run: steps 1..18 once each, the dead run's step 9 replaced.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 19))
    straight_log = [json.loads(l)["loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert straight_log == resumed_log


def make_trainer(save_dir, max_steps):
    from conftest import SequenceDataset, loader, small_model
    from alignflow.trainers import SFTTrainer, configure_optimizer

    model = small_model(seed=0)
    return SFTTrainer(model=model, optimizer=configure_optimizer(model, lr=1e-2), device="cpu",
                      train_loader=loader(SequenceDataset(32, seed=3), 4), max_steps=max_steps,
                      save_dir=save_dir, save_interval=2, keep_last=2, log_interval=1, progress_bar=False)


def test_resume_drops_a_torn_last_metrics_line(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:  # a crash in the middle of appending step 3's record
        f.write('{"step": 3, "time": 1.5 "lo')
    make_trainer(tmp_path, max_steps=4).train(resume_from="latest")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_damaged_metrics_line_before_the_last_is_named(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0][:20], *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(metrics))}: line 1 is not a valid metrics record"):
        make_trainer(tmp_path, max_steps=4).train(resume_from="latest")
