"""Evaluation on the user's own sets (eval.sets), keyed apart from training: a changed eval
setting re-evaluates every stage and retrains none."""
import json

import pytest
from pydantic import ValidationError

from alignflow.flows.cli import main as cli
from alignflow.flows.pipeline import alignment_pipeline
from alignflow.stages import demo, eval_record, handoff
from alignflow.stages.config import load_config

from conftest import SMALL_PIPELINE

STAGES = ("pretrain", "sft")


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def held_out_rows(config) -> list[dict]:
    """The demo's held-out prompts, as the demo set draws them."""
    return demo.demo_rows("eval", demo.held_out_prompts, "val", config.demo)


@pytest.fixture(scope="module")
def evaluated(prefect_harness, tmp_path_factory):
    """pretrain -> sft with three sets: the demo's, the same prompts from a file, and a file of
    plain-text prompts without answers scored by its own reward function."""
    tmp = tmp_path_factory.mktemp("evaluation")
    base = load_config("tiny", overrides=SMALL_PIPELINE)
    rows = held_out_rows(base)
    sets = [{"name": "demo"},
            {"name": "as_file", "source": jsonl(tmp / "with_answers.jsonl", rows)},
            {"name": "no_answers", "source": jsonl(tmp / "no_answers.jsonl",
                                                   [{"prompt": r["prompt"][-1]["content"]} for r in rows[:5]]),
             "reward_funcs": ["format"], "samples": 0}]
    overrides = {**SMALL_PIPELINE, "runs_dir": str(tmp / "runs"), "run_id": "ev", "eval.sets": sets}
    config = load_config("tiny", overrides=overrides)
    out = alignment_pipeline(config=config, align="none")
    return overrides, out


def test_a_file_of_the_demo_prompts_scores_as_the_demo_set_and_one_without_answers_gets_reward_only(evaluated):
    _, out = evaluated
    for stage in STAGES:
        sets = out["stages"][stage]["evaluation"]["sets"]
        keys = ("accuracy", "greedy_reward", "sampled_reward", "format_rate", "completion_tokens", "prompts")
        assert {k: sets["as_file"][k] for k in keys} == {k: sets["demo"][k] for k in keys}, stage
        assert sets["demo"]["prompts"] == SMALL_PIPELINE["eval.max_prompts"]
        no_answers = sets["no_answers"]
        assert "accuracy" not in no_answers and "sampled_reward" not in no_answers
        assert no_answers["prompts"] == 5 and 0.0 <= no_answers["greedy_reward"] == no_answers["format_rate"] <= 1.0
    # SFT learned the answer format the pretrained model never writes.
    assert out["stages"]["sft"]["evaluation"]["sets"]["demo"]["format_rate"] > \
        out["stages"]["pretrain"]["evaluation"]["sets"]["demo"]["format_rate"]


def test_recorded_accuracy_is_the_greedy_exact_match_of_the_stage_model(evaluated):
    """Worked by hand: generate each prompt greedily with the stage's model, compare answers."""
    from alignflow.models import generate_text
    from alignflow.stages.formats import prompt_ids
    from alignflow.trainers.rewards import answers_match, final_answer

    overrides, out = evaluated
    config = load_config("tiny", overrides=overrides)
    model, tok, _ = handoff.load_stage(out["stages"]["sft"]["path"])
    rows = held_out_rows(config)[:SMALL_PIPELINE["eval.max_prompts"]]
    texts = generate_text(model, tok, [prompt_ids(tok, r["prompt"]) for r in rows], config.eval.max_new_tokens).texts
    hits = sum(answers_match(final_answer(t), r["answer"]) for t, r in zip(texts, rows))
    assert out["stages"]["sft"]["evaluation"]["sets"]["as_file"]["accuracy"] == hits / len(rows)


def test_an_eval_setting_reevaluates_and_retrains_nothing(evaluated, capsys):
    overrides, out = evaluated
    paths = {s: out["stages"][s]["path"] for s in STAGES}
    weights = {s: (handoff.verify(p)["sha256"], _mtimes(p)) for s, p in paths.items()}
    records = {s: eval_record.read_record(p) for s, p in paths.items()}

    again = alignment_pipeline(config=load_config("tiny", overrides={**overrides, "eval.temperature": 0.5}),
                               align="none")
    for stage, path in paths.items():
        result = again["stages"][stage]
        assert result["skipped"] and result["reevaluated"], stage
        assert (handoff.verify(path)["sha256"], _mtimes(path)) == weights[stage]  # not one file rewritten
        record = eval_record.read_record(path)
        assert record["eval_hash"] != records[stage]["eval_hash"] and record["model_hash"] == result["content_hash"]
        greedy = ("accuracy", "greedy_reward", "format_rate")  # greedy decoding ignores the temperature
        assert {k: record["sets"]["demo"][k] for k in greedy} == {k: records[stage]["sets"]["demo"][k] for k in greedy}

    # Once current, a run neither trains nor evaluates again.
    third = alignment_pipeline(config=load_config("tiny", overrides={**overrides, "eval.temperature": 0.5}),
                               align="none")
    assert not any(third["stages"][s].get("reevaluated") for s in STAGES)

    # `alignflow eval DIR` records its numbers for the flow to find.
    capsys.readouterr()
    assert cli(["eval", paths["sft"], "--set", "vocab_size=300", "--set", "eval.max_prompts=3",
                "--set", "eval.reward_samples=0"]) == 0
    printed = capsys.readouterr().out
    assert "  demo: accuracy " in printed and "(3 prompts)" in printed and "eval.json" in printed
    assert eval_record.read_record(paths["sft"])["sets"]["demo"]["prompts"] == 3


def _mtimes(path) -> dict:
    from pathlib import Path

    return {p.name: p.stat().st_mtime_ns for p in Path(path).iterdir() if p.is_file() and p.name != "eval.json"}


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: str(tmp / "missing.jsonl"), r"eval.sets mine: .*missing.jsonl: no such file"),
    (lambda tmp: jsonl(tmp / "rows.jsonl", [{"prompt": "What is 1 plus 1?"}, {"prompt": 7}]),
     r"eval.sets mine: .*rows.jsonl: row 1 \(line 2\): column 'prompt'"),
    (lambda tmp: jsonl(tmp / "no_prompt.jsonl", [{"question": "What is 1 plus 1?"}]),
     r"eval.sets mine: .*no_prompt.jsonl.*prompt"),
])
def test_a_bad_eval_file_fails_at_config_load_with_one_line_naming_it(tmp_path, make, expected):
    with pytest.raises(ValidationError, match=expected) as e:
        load_config("tiny", overrides={"eval.sets": [{"name": "mine", "source": make(tmp_path)}]})
    message = str(e.value).splitlines()[2]  # pydantic's title, the field, then the one line
    assert "\n" not in message.strip()


def test_a_reward_function_needs_its_column_in_the_set_file(tmp_path):
    source = jsonl(tmp_path / "rows.jsonl", [{"prompt": "Say hi", "answer": "hi"}])
    with pytest.raises(ValidationError, match=r"eval.sets\[0\].reward_funcs \(set mine\): .*rows.jsonl has only the "
                                              r"columns prompt, answer; contains reads 'target'"):
        load_config("tiny", overrides={"eval.sets": [{"name": "mine", "source": source,
                                                      "reward_funcs": ["contains"]}]})
    with_target = jsonl(tmp_path / "target.jsonl", [{"prompt": "Say hi", "target": "hi"}])
    config = load_config("tiny", overrides={"eval.sets": [{"name": "mine", "source": with_target,
                                                           "reward_funcs": ["contains"]}]})
    assert config.eval.resolved_sets()[0].reward_funcs == ["contains"]
