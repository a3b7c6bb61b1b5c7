"""Evaluation on the user's own sets (eval.sets), keyed apart from training: a changed eval
setting re-evaluates every stage and retrains none."""
import glob
import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from alignflow.flows.cli import main as cli
from alignflow.flows.pipeline import alignment_pipeline
from alignflow.stages import demo, eval_record, handoff
from alignflow.stages.config import load_config

from conftest import SMALL_PIPELINE

STAGES = ("pretrain", "sft")
GEN_TASK, MC_TASK = "demo_arith", "demo_arith_mc"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1"}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def held_out_rows(config) -> list[dict]:
    """The demo's held-out prompts, as the demo set draws them."""
    return demo.demo_rows("eval", demo.held_out_prompts, "val", config.demo)


def lm_eval_tasks(d, rows) -> str:
    """Two lm-eval tasks of our own over 20 held-out demo questions in a local jsonl: one
    generate_until scored by exact match, one multiple_choice scored by acc."""
    questions = [{"question": r["prompt"][-1]["content"], "answer": str(r["answer"]),
                  "choices": [str(r["answer"]), str(int(r["answer"]) + 1), str(int(r["answer"]) + 2)], "label": 0}
                 for r in rows[:20]]
    jsonl(d / "questions.jsonl", questions)
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / "questions.jsonl"}
  cache_dir: {d / "datasets_cache"}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
    (d / "gen.yaml").write_text(f"""task: {GEN_TASK}
{common}output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    (d / "mc.yaml").write_text(f"""task: {MC_TASK}
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""")
    return str(d)


@pytest.fixture(scope="module")
def evaluated(prefect_harness, tmp_path_factory):
    """pretrain -> sft with three sets: the demo's, the same prompts from a file, and a file of
    plain-text prompts without answers scored by its own reward function; and two lm-eval tasks."""
    tmp = tmp_path_factory.mktemp("evaluation")
    base = load_config("tiny", overrides=SMALL_PIPELINE)
    rows = held_out_rows(base)
    (tmp / "tasks").mkdir()
    lm_eval = {"tasks": [GEN_TASK, MC_TASK], "include_path": lm_eval_tasks(tmp / "tasks", rows)}
    sets = [{"name": "demo"},
            {"name": "as_file", "source": jsonl(tmp / "with_answers.jsonl", rows)},
            {"name": "no_answers", "source": jsonl(tmp / "no_answers.jsonl",
                                                   [{"prompt": r["prompt"][-1]["content"]} for r in rows[:5]]),
             "reward_funcs": ["format"], "samples": 0}]
    overrides = {**SMALL_PIPELINE, "runs_dir": str(tmp / "runs"), "run_id": "ev", "eval.sets": sets,
                 "eval.lm_eval": lm_eval}
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


def test_lm_eval_runs_on_every_stage_and_its_numbers_are_those_of_lm_eval_by_hand(evaluated, tmp_path):
    overrides, out = evaluated
    for stage in STAGES:
        got = out["stages"][stage]["evaluation"]["lm_eval"]
        assert set(got) == {GEN_TASK, MC_TASK} and 0.0 <= got[MC_TASK]["acc"] <= 1.0, stage
    card = open(os.path.join(overrides["runs_dir"], "ev", "report.md")).read()
    assert f"| lm-eval {MC_TASK}: acc |" in card and f"| lm-eval {GEN_TASK}: exact_match |" in card

    sft = out["stages"]["sft"]["path"]
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={sft},dtype=float32",
           "--tasks", f"{GEN_TASK},{MC_TASK}", "--include_path", overrides["eval.lm_eval"]["include_path"],
           "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path / "cli"), "--seed", "0"]
    proc = subprocess.run(cmd, env={**os.environ, **OFFLINE}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results] = glob.glob(str(tmp_path / "cli" / "*" / "results_*.json"))
    by_hand = json.loads(open(results).read())["results"]
    recorded = out["stages"]["sft"]["evaluation"]["lm_eval"]
    assert recorded[GEN_TASK]["exact_match"] == by_hand[GEN_TASK]["exact_match,none"]
    assert recorded[MC_TASK]["acc"] == by_hand[MC_TASK]["acc,none"]


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


def test_a_first_stage_without_a_chat_template_is_left_out_unless_eval_stages_names_it():
    from types import SimpleNamespace

    from alignflow.stages.evaluation import is_evaluated

    plain, chat = SimpleNamespace(chat_template=None), SimpleNamespace(chat_template="{{ messages }}")
    config = load_config("tiny")
    assert not is_evaluated(config, "pretrain", plain) and is_evaluated(config, "pretrain", chat)
    assert is_evaluated(config, "sft", plain)  # a later stage renders plain-text prompts as they are
    named = load_config("tiny", overrides={"eval.stages": ["pretrain", "dpo"]})
    assert is_evaluated(named, "pretrain", plain) and not is_evaluated(named, "sft", chat)
    with pytest.raises(ValidationError, match=r"eval.stages names sfft, which no algorithm is; stages: pretrain, sft"):
        load_config("tiny", overrides={"eval.stages": ["sfft"]})
