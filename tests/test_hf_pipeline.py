"""Bring your own model, end to end inside Prefect: a Hugging Face model directory starts SFT
then DPO or GRPO (or continued pretraining), every stage directory reloads with transformers and
gives the logits the trained model gave, and a changed base re-runs the stages after it."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignflow.models import prompt_ids
from alignflow.stages import handoff
from alignflow.stages.demo import assistant, split_problems, user
from alignflow.trainers.rewards import register_reward

pytestmark = pytest.mark.slow

FAST = {"demo.sft_examples": 256, "demo.grpo_prompts": 64, "eval.max_prompts": 4, "eval.reward_samples": 1,
        "eval.max_new_tokens": 8, "sft.train.max_steps": 16, "sft.train.batch_size": 8, "sft.train.lr": 3e-3,
        "sft.train.warmup_steps": 0, "sft.train.log_interval": 1, "sft.train.save_interval": 8}


@register_reward("digits")
def digits(prompts, completions, **_):
    """A toy reward a random model can climb: the share of digits in its reply."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def losses(stage_dir: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture
def trained_logits(monkeypatch):
    """{stage directory: (ids, logits of the in-memory model)} recorded as each stage saves."""
    seen = {}
    save = handoff.save_stage

    def recording(out_dir, model, tokenizer, *args, **kwargs):
        ids = torch.tensor([prompt_ids(tokenizer, user("What is 3 plus 4?"))])
        with torch.no_grad():
            seen[Path(out_dir)] = (ids, model(input_ids=ids).logits.float())
        return save(out_dir, model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(handoff, "save_stage", recording)
    return seen


def assert_reloads_with_transformers(stage_dir: Path, trained_logits):
    ids, expected = trained_logits[stage_dir]
    model = AutoModelForCausalLM.from_pretrained(stage_dir)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - expected).abs().max() < 1e-5
    tok = AutoTokenizer.from_pretrained(stage_dir)
    assert tok.apply_chat_template(user("What is 3 plus 4?"), add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] == ids[0].tolist()


def preference_file(path: Path) -> str:
    """Pairs with a preference a tiny model learns in a few steps: a worked answer over a refusal."""
    train, _ = split_problems(0)
    rows = [{"prompt": user(p.question), "chosen": assistant(p.solution()),
             "rejected": assistant("I do not know.")} for p in random.Random(0).sample(train, 160)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_then_dpo_from_a_llama3_model_and_a_changed_base_reruns(prefect_harness, hf_model_dir, tmp_path,
                                                                   small_config, trained_logits):
    from alignflow.flows.pipeline import alignment_pipeline

    base = tmp_path / "base"
    shutil.copytree(hf_model_dir("llama3"), base)
    config = small_config(**FAST, model=str(base), start="sft", runs_dir=str(tmp_path / "runs"),
                          **{"dpo.data.source": preference_file(tmp_path / "pairs.jsonl"), "dpo.data.val_fraction": 0.2,
                             "dpo.train.max_steps": 16, "dpo.train.lr": 1e-3, "dpo.train.log_interval": 1})
    out = alignment_pipeline(config=config, align="dpo")
    assert list(out["stages"]) == ["sft", "dpo"]  # no pretraining: the model is the base
    run = Path(out["run_dir"])
    sft = losses(run / "sft")
    assert sum(sft[-4:]) / 4 < 0.9 * sum(sft[:4]) / 4, sft
    dpo = handoff.verify(run / "dpo")
    assert dpo["metrics"]["val_rewards/accuracies"] > 0.5, dpo["metrics"]
    for stage in ("sft", "dpo"):
        assert_reloads_with_transformers(run / stage, trained_logits)
    lineage = handoff.verify(run / "sft")["parent"]
    assert lineage["external"] and lineage["path"] == str(base)
    assert set(lineage["sha256"]) == {p.name for p in base.iterdir()}

    again = alignment_pipeline(config=config, align="dpo")
    assert all(r.get("skipped") for r in again["stages"].values())
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight of the base
    weights.write_bytes(bytes(data))
    changed = alignment_pipeline(config=config, align="dpo")
    assert not any(r.get("skipped") for r in changed["stages"].values())


def test_sft_then_grpo_from_a_chatml_model_raises_its_reward(prefect_harness, hf_model_dir, tmp_path, small_config,
                                                             trained_logits):
    from alignflow.flows.pipeline import alignment_pipeline

    config = small_config(**FAST, model=str(hf_model_dir("chatml")), start="sft", runs_dir=str(tmp_path / "runs"),
                          **{"grpo.reward_funcs": ["digits"], "grpo.train.max_steps": 24, "grpo.train.lr": 3e-3,
                             "grpo.train.batch_size": 8, "grpo.num_generations": 8, "grpo.max_completion_length": 12,
                             "grpo.beta": 0.0, "grpo.temperature": 1.0, "grpo.train.log_interval": 1,
                             "grpo.train.warmup_steps": 0})
    out = alignment_pipeline(config=config, align="grpo")
    assert list(out["stages"]) == ["sft", "grpo"]
    run = Path(out["run_dir"])
    rewards = losses(run / "grpo", "reward")
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 0.05, rewards
    assert_reloads_with_transformers(run / "grpo", trained_logits)


def test_continued_pretraining_of_a_neox_model_trains_no_tokenizer(prefect_harness, hf_model_dir, tmp_path,
                                                                   small_config, trained_logits):
    from alignflow.flows.pipeline import alignment_pipeline

    config = small_config(model=str(hf_model_dir("neox")), runs_dir=str(tmp_path / "runs"),
                          **{"pretrain.train.max_steps": 16, "pretrain.train.lr": 3e-3, "pretrain.train.log_interval": 1,
                             "pretrain.train.warmup_steps": 0, "pretrain.data.max_length": 64})
    out = alignment_pipeline(config=config, align="none", force=[])
    run = Path(out["run_dir"])
    pretrain = losses(run / "pretrain")
    assert sum(pretrain[-4:]) / 4 < 0.9 * sum(pretrain[:4]) / 4, pretrain
    base_tok = (hf_model_dir("neox") / "tokenizer.json").read_text()
    assert json.loads((run / "pretrain" / "tokenizer.json").read_text())["model"] == json.loads(base_tok)["model"]
    assert not (run / "pretrain" / "work" / "tokenizer").exists()
    assert_reloads_with_transformers(run / "pretrain", trained_logits)


def test_one_stage_with_the_hf_small_preset_on_a_hugging_face_parent(prefect_harness, hf_model_dir, tmp_path, capsys):
    """`stage` has no --model: its parent is the model. The preset's `start: sft` (which `run`
    reads with --model) must not ask for one."""
    from alignflow.flows.cli import main as cli

    base = hf_model_dir("llama3")
    sets = {"sft.train.max_steps": 2, "sft.train.precision": "fp32", "sft.data.max_length": 128,
            "demo.sft_examples": 64, "eval.max_prompts": 2, "eval.reward_samples": 0, "eval.max_new_tokens": 4}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    assert cli(["stage", "sft", "--preset", "hf-small", "--parent", str(base), "--runs-dir", str(tmp_path),
                "--run-id", "r", *args]) == 0, capsys.readouterr().err
    manifest = handoff.verify(tmp_path / "r" / "sft")
    assert manifest["parent"]["path"] == str(base) and manifest["parent"]["external"]
    assert manifest["metrics"]["step"] == 2
    assert cli(["eval", str(tmp_path / "r" / "sft"), "--preset", "hf-small", "--set", "eval.max_prompts=2",
                "--set", "eval.reward_samples=0"]) == 0, capsys.readouterr().err
