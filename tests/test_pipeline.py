"""The whole pipeline on the tiny preset inside Prefect's embedded server (prefect_test_harness).

One DPO run and one GRPO run share pretrain and SFT: the GRPO flow finds them complete and
skips them, which is also the re-run test."""
import json

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import alignment_pipeline, run_stage
from stages import handoff
from stages.config import load_config


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def runs(harness, tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    config = load_config("tiny", overrides={"runs_dir": str(runs_dir), "run_id": "e2e"})
    dpo = alignment_pipeline(config=config, align="dpo")
    grpo = alignment_pipeline(config=config, align="grpo")
    return config, dpo, grpo


def metrics(result, stage):
    return result["stages"][stage]["metrics"]


def test_every_stage_directory_is_complete_and_verifies(runs):
    _, dpo, grpo = runs
    for out in (dpo, grpo):
        for stage, result in out["stages"].items():
            manifest = handoff.verify(result["path"])  # raises on any sha256 mismatch
            for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl"):
                assert name in manifest["sha256"], (stage, name)
            assert manifest["stage"] == stage
    run_dir = dpo["run_dir"]
    assert "task acc" in open(f"{run_dir}/report.md").read()


def test_lineage_links_each_stage_to_its_parent(runs):
    _, dpo, grpo = runs
    stages = {**dpo["stages"], **grpo["stages"]}
    for child, parent in (("sft", "pretrain"), ("dpo", "sft"), ("grpo", "sft")):
        manifest = handoff.read_manifest(stages[child]["path"])
        assert manifest["parent"]["path"] == stages[parent]["path"]
        assert manifest["parent"]["content_hash"] == stages[parent]["content_hash"]


def test_each_stage_improves_its_own_target(runs):
    _, dpo, grpo = runs
    pre, sft = metrics(dpo, "pretrain"), metrics(dpo, "sft")
    d, g = metrics(dpo, "dpo"), metrics(grpo, "grpo")
    print(json.dumps({s: {k: m.get(k) for k in ("val_loss", "task_accuracy", "format_rate", "heldout_reward",
                                                "val_rewards/accuracies", "val_rewards/margins", "val_reward")}
                      for s, m in (("pretrain", pre), ("sft", sft), ("dpo", d), ("grpo", g))}, indent=1))
    assert sft["task_accuracy"] > pre["task_accuracy"] + 0.2
    assert d["val_rewards/accuracies"] > 0.5
    assert d["task_accuracy"] >= sft["task_accuracy"] - 0.15  # alignment does not collapse the task
    assert g["task_accuracy"] >= sft["task_accuracy"] - 0.15


@pytest.mark.xfail(strict=False, reason="GRPO on the tiny preset does not yet raise held-out reward over SFT "
                                        "within its CPU budget (issue 4 stays open for it)")
def test_grpo_raises_heldout_reward_over_sft(runs):
    _, dpo, grpo = runs
    assert metrics(grpo, "grpo")["heldout_reward"] > metrics(dpo, "sft")["heldout_reward"]


def test_rerun_skips_completed_stages_and_force_reruns_only_dpo(runs):
    config, dpo, grpo = runs
    assert grpo["stages"]["pretrain"].get("skipped") and grpo["stages"]["sft"].get("skipped")
    assert not grpo["stages"]["grpo"].get("skipped")
    before = {s: handoff.read_manifest(r["path"])["created_at"] for s, r in dpo["stages"].items()}
    again = alignment_pipeline(config=config, align="dpo", force=["dpo"])
    assert [s for s, r in again["stages"].items() if r.get("skipped")] == ["pretrain", "sft"]
    assert handoff.read_manifest(again["stages"]["dpo"]["path"])["created_at"] >= before["dpo"]
    assert again["stages"]["sft"]["content_hash"] == dpo["stages"]["sft"]["content_hash"]


def test_run_stage_on_an_earlier_sft_directory(runs):
    config, dpo, _ = runs
    sft = dpo["stages"]["sft"]
    out = run_stage(stage="dpo", config=config.model_copy(update={"dpo": config.dpo.model_copy(update={"beta": 0.3})}),
                    parent=sft["path"], run_id="beta-0.3")
    manifest = handoff.verify(out["stages"]["dpo"]["path"])
    assert manifest["parent"] == {"path": sft["path"], "content_hash": sft["content_hash"], "stage": "sft"}
    assert manifest["config"]["dpo"]["beta"] == 0.3
    assert out["run_dir"].endswith("beta-0.3")
