"""lm-evaluation-harness on a stage-like model directory (stages/harness.py): our own tasks, YAMLs
over local jsonl files, run through lm-eval's Python API give the numbers its CLI gives.

The model is the built-in tiny Llama with random weights, saved as a stage saves it, with a BPE
tokenizer trained here: its answers are wrong, which is fine -- the tests are about plumbing and
equality. So that exact_match is not trivially 0, three questions' answers are what the model
greedily says (asked once with transformers)."""
from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from alignflow.stages.harness import LMEvalConfig, clean_metrics, metric_name, run_lm_eval

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1"}
N = 20
PROMPT = "Question: {question}\nAnswer:"
GEN_TASK, MC_TASK = "af_arith", "af_arith_mc"
MATCHED = (0, 7, 14)  # rows whose answer is the model's own greedy output


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def questions():
    rng = random.Random(0)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(N)]
    return [(f"What is {a} plus {b}?", a + b) for a, b in pairs]


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory, questions):
    """A directory as a stage writes it: the built-in model (Llama's HF format, generation_config)
    and its tokenizer (pad, bos, eos, chat template)."""
    from alignflow.models import LlamaForCausalLM, get_preset, save_model
    from alignflow.models.tokenizer import train_tokenizer

    texts = [PROMPT.format(question=q) + f" {a}" for q, a in questions] * 5
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(get_preset("tiny", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, max_position_embeddings=128,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)).eval()
    path = tmp_path_factory.mktemp("stage") / "sft"
    save_model(model, str(path))
    tok.save_pretrained(str(path))
    return path


def greedy_answers(model_dir, prompts: list[str]) -> list[str]:
    """What the model greedily says after each prompt, up to a newline (as the task's `until`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    said = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        said.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0])
    return said


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, questions, stage_dir):
    """Two tasks of our own over local jsonl files: generate_until scored with exact_match, and
    multiple_choice scored with acc and acc_norm. datasets caches them under the directory, not
    in ~/.cache."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    said = greedy_answers(stage_dir, [PROMPT.format(question=questions[i][0]) for i in MATCHED])
    assert all(said), said  # an empty answer would match nothing the way a real one does
    gen = [{"question": q, "answer": str(a)} for q, a in questions]
    for i, s in zip(MATCHED, said):
        gen[i]["answer"] = s
    rng = random.Random(1)
    mc = []
    for q, a in questions:
        choices = [str(a + d) for d in rng.sample([-3, -2, -1, 1, 2, 3], 3)] + [str(a)]
        rng.shuffle(choices)
        mc.append({"question": q, "choices": choices, "label": choices.index(str(a))})
    write_jsonl(d / "arith.jsonl", gen)
    write_jsonl(d / "arith_mc.jsonl", mc)
    common = """dataset_path: json
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
"""
    (d / "arith.yaml").write_text(f"""task: {GEN_TASK}
{common}dataset_kwargs:
  data_files:
    test: {d / "arith.jsonl"}
  cache_dir: {d / "datasets_cache"}
output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (d / "arith_mc.yaml").write_text(f"""task: {MC_TASK}
{common}dataset_kwargs:
  data_files:
    test: {d / "arith_mc.jsonl"}
  cache_dir: {d / "datasets_cache"}
output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return d


@pytest.fixture(scope="module")
def ours(stage_dir, task_dir):
    pytest.importorskip("lm_eval")
    return run_lm_eval(stage_dir, LMEvalConfig(tasks=[GEN_TASK, MC_TASK], include_path=str(task_dir)))


def test_numbers_are_floats_in_range(ours):
    assert set(ours) == {GEN_TASK, MC_TASK}
    assert set(ours[GEN_TASK]) == {"exact_match", "exact_match_stderr"}
    assert set(ours[MC_TASK]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    for numbers in ours.values():
        assert all(type(v) is float and 0.0 <= v <= 1.0 for v in numbers.values()), numbers
    # The rows whose answer is the model's own greedy output, and only those (the random
    # model's answers are never the sums).
    assert ours[GEN_TASK]["exact_match"] == len(MATCHED) / N
    assert 0.0 < ours[MC_TASK]["acc"] < 1.0


def test_same_numbers_as_the_cli(ours, stage_dir, task_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={stage_dir},dtype=float32",
           "--tasks", f"{GEN_TASK},{MC_TASK}", "--include_path", str(task_dir), "--device", "cpu",
           "--batch_size", "8", "--output_path", str(out), "--seed", "0"]
    proc = subprocess.run(cmd, env={**os.environ, **OFFLINE}, cwd=tmp_path, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = glob.glob(str(out / "*" / "results_*.json"))
    with open(results_file) as f:
        results = json.load(f)["results"]
    assert results[GEN_TASK]["exact_match,none"] == ours[GEN_TASK]["exact_match"]
    assert results[MC_TASK]["acc,none"] == ours[MC_TASK]["acc"]
    assert clean_metrics(results) == ours


def test_unknown_task_is_one_line(stage_dir, task_dir):
    pytest.importorskip("lm_eval")
    with pytest.raises(ValueError) as err:
        run_lm_eval(stage_dir, LMEvalConfig(tasks=[GEN_TASK, "no_such_task_xyz"], include_path=str(task_dir)))
    message = str(err.value)
    assert "\n" not in message
    assert "'no_such_task_xyz'" in message and GEN_TASK not in message
    assert "eval.lm_eval.include_path" in message and "hub" in message


def test_missing_include_path_names_the_key(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ValidationError) as err:
        LMEvalConfig(tasks=["x"], include_path=str(missing))
    assert "eval.lm_eval.include_path" in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(ValidationError):
        LMEvalConfig(tasks=[])


def test_without_lm_eval_says_how_to_install(stage_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ValueError, match=r"^eval.lm_eval needs lm-eval: pip install 'alignflow\[eval\]'$"):
        run_lm_eval(stage_dir, LMEvalConfig(tasks=["x"]))


def test_metric_names():
    assert metric_name("exact_match,none") == "exact_match"
    assert metric_name("acc_stderr,none") == "acc_stderr"
    assert metric_name("exact_match,strict-match") == "exact_match/strict-match"
    assert clean_metrics({"t": {"alias": "t", "acc,none": 1, "acc_stderr,none": "N/A", "sample_len": 3}}) == \
        {"t": {"acc": 1.0}}
