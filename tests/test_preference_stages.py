"""SimPO, ORPO and KTO as stages: aligned through the pipeline after the stages they build on,
ORPO straight on a pretrained base (SimPO refused there), and a run killed with SIGKILL resumed
to the same bits as an uninterrupted one, for these and the reward model (rm) (all three runs
fresh `python -m alignflow.stages` processes)."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import SMALL_PIPELINE
from alignflow.stages.config import load_config
from alignflow.stages.run import train_stage

# 128 training pairs (KTO: 128 answers), batch 8: 16 steps an epoch; the held-out ones are 12.
SETTINGS = {**SMALL_PIPELINE, "demo.preference_pairs": 128,
            **{f"{stage}.train.{key}": value for stage in ("simpo", "orpo", "kto", "rm") for key, value in
               {"max_steps": 32, "batch_size": 8, "lr": 1e-4, "log_interval": 1, "eval_interval": 16,
                "save_interval": 8}.items()}}


@pytest.fixture(scope="module")
def base_run(prefect_harness, tmp_path_factory):
    from alignflow.flows.pipeline import alignment_pipeline

    runs = tmp_path_factory.mktemp("reference-free") / "runs"
    config = load_config("tiny", overrides={**SETTINGS, "runs_dir": str(runs), "run_id": "base"})
    stages = alignment_pipeline(config=config, align="none")["stages"]
    return config, stages


def records(stage_dir) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage, row", [("simpo", r"SimPO val accuracy \|[ |]*\d+\.\d% \(\d+/12\)"),
                                        ("orpo", r"ORPO val accuracy \|[ |]*\d+\.\d% \(\d+/12\)"),
                                        ("kto", r"KTO val reward, desirable \|[ |]*-?\d")])
def test_aligns_after_the_stages_it_builds_on_and_learns_the_preference(base_run, stage, row):
    from alignflow.flows.pipeline import alignment_pipeline

    config, _ = base_run
    result = alignment_pipeline(config=config, align=stage)
    out = Path(result["stages"][stage]["path"])
    card = (Path(result["run_dir"]) / "report.md").read_text()
    # The run's card has a column per stage of its directory (the other test's aligner too).
    assert card.split("\n")[4].startswith("| | pretrain | sft | ") and f" {stage} |" in card.split("\n")[4]
    assert "| status | skipped (already complete) | skipped (already complete) | trained" in card
    assert re.search(rf"\n\| {row}", card), card
    assert f"![{stage} curves]({stage}/curves.png)" in card
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == stage and manifest["parent"]["stage"] == "sft"
    # Only KTO scores against a reference (precomputed, as DPO does).
    assert (out / "ref_logps").exists() == (stage == "kto")
    # Over two epochs of the training data SimPO's and ORPO's loss falls (ORPO's by its NLL
    # term); KTO's barely moves at β = 0.1, but the gap between its desirable and undesirable
    # rewards widens. This small a model does not carry the preference to held-out data.
    logged = [r for r in records(out) if "loss" in r]
    assert len(logged) == 32
    if stage == "kto":
        gap = [r["rewards/chosen"] - r["rewards/rejected"] for r in logged]
        assert sum(gap[-8:]) / 8 > sum(gap[:8]) / 8 + 0.05, gap
    else:
        losses = [r["loss"] for r in logged]
        assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.05, losses


def test_orpo_aligns_a_pretrained_base_and_simpo_refuses_one(base_run, tmp_path):
    config, stages = base_run
    pretrain = stages["pretrain"]["path"]
    train_stage("orpo", config, pretrain, tmp_path / "orpo")
    manifest = json.loads((tmp_path / "orpo" / "manifest.json").read_text())
    assert manifest["parent"]["stage"] == "pretrain"
    with pytest.raises(ValueError, match="simpo trains on a sft checkpoint, but .* holds a pretrain stage"):
        train_stage("simpo", config, pretrain, tmp_path / "simpo")


def stage_process(stage: str, config_file, parent, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignflow.stages", stage, "--config", str(config_file),
                             "--parent", str(parent), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("stage", ["simpo", "orpo", "kto", "rm"])
def test_a_sigkilled_stage_resumes_to_the_same_bits(base_run, tmp_path, stage):
    config, stages = base_run
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    sft = stages["sft"]["path"]
    finished(stage_process(stage, config_file, sft, tmp_path / "straight"))

    killed = tmp_path / "killed"
    proc = stage_process(stage, config_file, sft, killed)
    deadline = time.time() + 240
    try:  # killed once the step-8 checkpoint is complete: half-way through the first epoch
        while time.time() < deadline and not (killed / "state" / "step-00000008" / "trainer_state.json").exists():
            assert proc.poll() is None, "the stage finished before it could be killed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()  # an interrupted stage never looks complete

    finished(stage_process(stage, config_file, sft, killed))
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] >= 8
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_lora_and_qlora_kto_on_a_hugging_face_model_reads_a_pair_file_against_the_parent(
        quantize, hf_model_dir, tmp_path, small_config):
    """KTO with an adapter on a transformers Llama, from a pair file (unpaired into desirable and
    undesirable rows). Its reference is the policy with the adapter off (QLoRA: the same 4-bit
    base), so at step 0 policy and reference agree: z₀ = 0 and every loss is 1 − σ(0) = 0.5."""
    if quantize == "4bit":
        pytest.importorskip("bitsandbytes")
    from hf_fixtures import build_model_dir
    from test_hf_pipeline import FAST, preference_file

    base = build_model_dir("llama3", tmp_path / "base", hidden_size=64)  # 4-bit blocks of 64
    lora = {"r": 8, "alpha": 16, "quantize": quantize}
    config = small_config(**FAST, model=str(base), start="sft", runs_dir=str(tmp_path / "runs"),
                          **{"kto.lora": lora, "kto.train.max_steps": 8, "kto.train.lr": 3e-3, "kto.beta": 0.5,
                             "kto.train.log_interval": 1, "kto.data.val_fraction": 0.1,
                             "kto.data.source": preference_file(tmp_path / "pairs.jsonl")})
    out = tmp_path / "runs" / "kto"
    train_stage("kto", config, base, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(manifest["sha256"])
    assert manifest["data"]["train"]["rows"] == 2 * 144  # 144 training pairs, each two rows
    logged = [r for r in records(out) if "loss" in r]
    assert logged[0]["loss"] == pytest.approx(0.5, abs=1e-6) and logged[0]["kl"] == 0.0
    # The worked answers gain on the refusals.
    assert logged[-1]["rewards/chosen"] - logged[-1]["rewards/rejected"] > 0.1, logged[-1]
