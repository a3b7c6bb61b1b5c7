"""The stage graph with a learned reward: `--align grpo --set grpo.reward_model=rm` runs
pretrain → sft → rm → grpo, rm and grpo both on sft and grpo also reading rm. Skipping, the
lineage, the report's rm column and the Prefect task graph follow the graph; changing an rm
setting re-runs rm and grpo, not sft; one grpo stage re-runs against an earlier run's rm."""
import json
import re
from pathlib import Path

import pytest

from conftest import SMALL_PIPELINE
from alignflow.stages.algorithm import chain
from alignflow.stages.config import load_config

SETTINGS = {**SMALL_PIPELINE, "grpo.reward_model": "rm", "grpo.reward_model_weight": 0.5,
            "rm.train.max_steps": 6, "rm.train.batch_size": 8, "rm.train.eval_interval": 3,
            "grpo.train.max_steps": 2, "grpo.train.batch_size": 2, "grpo.num_generations": 4,
            "grpo.max_completion_length": 8, "eval.max_prompts": 4}


def config_with(runs: Path, **extra):
    return load_config("tiny", overrides={**SETTINGS, "runs_dir": str(runs), "run_id": "graph", **extra})


@pytest.fixture(scope="module")
def graph_run(prefect_harness, tmp_path_factory):
    from alignflow.flows.pipeline import alignment_pipeline

    runs = tmp_path_factory.mktemp("graph") / "runs"
    state = alignment_pipeline(config=config_with(runs), align="grpo", return_state=True)
    return runs, {**state.result(), "flow_run_id": state.state_details.flow_run_id}


def manifest(result: dict, stage: str) -> dict:
    return json.loads((Path(result["stages"][stage]["path"]) / "manifest.json").read_text())


def test_the_chain_takes_the_reward_model_and_its_ancestors(tmp_path):
    assert chain("grpo", None, config_with(tmp_path)) == ["pretrain", "sft", "rm", "grpo"]
    assert chain("grpo", None, config_with(tmp_path, **{"grpo.reward_model": None})) == ["pretrain", "sft", "grpo"]
    assert chain("grpo", "sft", config_with(tmp_path)) == ["sft", "rm", "grpo"]
    assert chain("dpo", None, config_with(tmp_path)) == ["pretrain", "sft", "dpo"]  # grpo's inputs are grpo's
    with pytest.raises(ValueError, match="not a stage that trains a reward model"):
        config_with(tmp_path, **{"grpo.reward_model": "sft"})


def test_four_stages_run_in_order_and_grpo_records_both_inputs(graph_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    runs, result = graph_run
    assert list(result["stages"]) == ["pretrain", "sft", "rm", "grpo"]
    rm, grpo = manifest(result, "rm"), manifest(result, "grpo")
    assert rm["parent"]["stage"] == "sft" and rm["model_kind"] == "reward"
    assert grpo["parent"]["content_hash"] == manifest(result, "sft")["content_hash"]
    assert grpo["inputs"] == {"rm": {"path": result["stages"]["rm"]["path"], "content_hash": rm["content_hash"],
                                     "stage": "rm"}}
    # The reward model scored every completion beside the functions: its own mean is logged.
    assert "val_rewards/rm" in result["stages"]["grpo"]["metrics"]
    logged = (Path(result["stages"]["grpo"]["path"]) / "metrics.jsonl").read_text().splitlines()
    assert all("rewards/rm" in json.loads(line) for line in logged if '"reward"' in line)
    card = (runs / "graph" / "report.md").read_text()
    assert "| | pretrain | sft | rm | grpo |" in card
    assert re.search(r"\n\| RM val accuracy \| +\| +\| \d+\.\d% \(\d+/6\) \| +\|\n", card), card
    assert "![rm curves](rm/curves.png)" in card
    assert re.search(r"\n\| eval time \| [\d.]+ s \| [\d.]+ s \|  \| [\d.]+ s \|\n", card), card  # rm: not evaluated
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(result["flow_run_id"])
        tasks = {t.name: t for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [result["flow_run_id"]]}))}
    assert flow_run.name == "graph · pretrain→sft→rm→grpo"
    # In Prefect's task graph both sft (the policy's parent) and rm are upstream of grpo, each
    # through its own parameter.
    refs = {name: {ref.id for ref in found} for name, found in tasks["grpo"].task_inputs.items()}
    assert tasks["sft"].id in refs["parent"] and refs["inputs"] == {tasks["rm"].id}
    assert tasks["sft"].id in {ref.id for ref in tasks["rm"].task_inputs["parent"]}


def test_a_rerun_skips_all_and_an_rm_setting_reruns_rm_and_grpo_only(graph_run):
    from alignflow.flows.pipeline import alignment_pipeline

    runs, first = graph_run
    again = alignment_pipeline(config=config_with(runs), align="grpo")
    assert all(r.get("skipped") for r in again["stages"].values()), again["stages"]
    changed = alignment_pipeline(config=config_with(runs, **{"rm.train.lr": 5e-4}), align="grpo")
    assert [s for s, r in changed["stages"].items() if not r.get("skipped")] == ["rm", "grpo"]
    assert changed["stages"]["rm"]["content_hash"] != first["stages"]["rm"]["content_hash"]
    assert manifest(changed, "grpo")["inputs"]["rm"]["content_hash"] == changed["stages"]["rm"]["content_hash"]


def test_one_grpo_stage_on_an_earlier_runs_sft_and_rm(graph_run):
    from alignflow.flows.pipeline import run_stage

    runs, first = graph_run
    sft, rm = first["stages"]["sft"]["path"], first["stages"]["rm"]["path"]
    # Scored by the reward model alone: no reward function.
    config = config_with(runs, **{"grpo.reward_model": None, "grpo.reward_models": [{"path": rm, "weight": 2.0}],
                                  "grpo.reward_funcs": []})
    out = run_stage(stage="grpo", config=config, parent=sft)
    grpo = manifest(out, "grpo")
    assert grpo["inputs"]["reward_models_0"]["path"] == rm
    assert grpo["inputs"]["reward_models_0"]["content_hash"] == json.loads(
        (Path(rm) / "manifest.json").read_text())["content_hash"]
    got = out["stages"]["grpo"]["metrics"]
    assert "val_rewards/reward_models_0" in got and "val_rewards/format" not in got
    assert got["val_reward"] == pytest.approx(2.0 * got["val_rewards/reward_models_0"], rel=1e-6)
    # grpo.reward_model names a stage of a pipeline run; one stage alone has none to read.
    with pytest.raises(ValueError, match=r"grpo.reward_model: rm is not a stage of this run \(grpo\)"):
        run_stage(stage="grpo", config=config_with(runs), parent=sft)
    # A directory that is not a reward model is refused before training, naming it.
    wrong = config_with(runs, **{"grpo.reward_model": None, "grpo.reward_models": [{"path": sft}]})
    with pytest.raises(ValueError, match=r"holds a sft stage, not a reward model"):
        run_stage(stage="grpo", config=wrong, parent=sft)


def test_grpo_batches_keep_a_conversational_prompt_for_the_reward_model_to_render(graph_run):
    """A reward model renders prompt + completion as the rm stage's pairs were: through the chat
    template, which needs the prompt's messages, not the plain text reward functions read."""
    from alignflow.stages import loaders
    from alignflow.stages.formats import PROMPTS
    from alignflow.stages.handoff import load_stage
    from alignflow.stages.reward_models import RewardModelScorer

    runs, result = graph_run
    config = config_with(runs)
    rm, tok, _ = load_stage(result["stages"]["rm"]["path"])
    data = loaders.load("grpo", PROMPTS, config.grpo.data, config.demo, tok)
    batch = next(iter(data.loaders(tok.pad_token_id, 2, 0)[0]))
    messages = batch["prompt_messages"]
    assert messages[0][-1]["role"] == "user" and messages[0][-1]["content"] == batch["prompt"][0]
    scorer = RewardModelScorer("rm", rm, tok, rm.device)
    rendered = scorer.sequences(batch["prompt"], ["3 + 4 = 7."] * 2, prompt_messages=messages)
    assert tok.decode(rendered[0]) == tok.apply_chat_template(
        [*messages[0], {"role": "assistant", "content": "3 + 4 = 7."}], tokenize=False)


def test_a_plain_hugging_face_reward_model_directory_is_read_and_a_causal_lm_is_refused(graph_run, tmp_path):
    """A sequence-classification directory from elsewhere (no manifest) scores as an rm stage's
    does, its files hashed into the lineage as an external parent's are."""
    import shutil

    from alignflow.flows.pipeline import run_stage

    runs, first = graph_run
    sft, rm = Path(first["stages"]["sft"]["path"]), Path(first["stages"]["rm"]["path"])
    plain = tmp_path / "plain-rm"
    shutil.copytree(rm, plain, ignore=shutil.ignore_patterns("manifest.json", "eval.json", "metrics.jsonl", "state",
                                                             "work", "*.png"))
    config = config_with(runs, **{"grpo.reward_model": None, "grpo.reward_models": [{"path": str(plain)}]})
    out = run_stage(stage="grpo", config=config, parent=str(sft))
    lineage = manifest(out, "grpo")["inputs"]["reward_models_0"]
    assert lineage["external"] and lineage["path"] == str(plain) and "model.safetensors" in lineage["sha256"]
    plain_lm = tmp_path / "plain-lm"
    shutil.copytree(sft, plain_lm, ignore=shutil.ignore_patterns("manifest.json", "eval.json", "metrics.jsonl",
                                                                 "state", "work", "*.png"))
    wrong = config_with(runs, **{"grpo.reward_model": None, "grpo.reward_models": [{"path": str(plain_lm)}]})
    with pytest.raises(ValueError, match=r"plain-lm is not a reward model \(its config.json has architectures "
                                         r"\['LlamaForCausalLM'\]"):
        run_stage(stage="grpo", config=wrong, parent=str(sft))
