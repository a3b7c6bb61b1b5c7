"""Input that cannot be read (empty, undecodable, unparsable files) fails on one line naming the
file, line and reason, or under on_bad_rows: skip is dropped and counted; GRPO data without a
column its reward functions read fails before training; manifests are strict JSON."""
import json
import math
from pathlib import Path

import pytest

from alignflow.models.files import write_json_atomic
from alignflow.stages import data as data_mod
from alignflow.stages.formats import PROMPTS
from alignflow.stages.recipes import grpo as grpo_stage
from alignflow.stages.settings import DataConfig, DemoConfig
from alignflow.trainers.rewards import register_reward, required_columns

GOOD = b'{"prompt": "What is 1 plus 1?", "answer": "2"}\n'
LATIN1 = '{"prompt": "Caf\xe9 has 2 cups", "answer": "2"}\n'.encode("latin-1")  # \xe9 is no UTF-8 byte


def read(path, **cfg):
    return data_mod.read("grpo", PROMPTS, DataConfig(source=str(path), val_fraction=0.0, **cfg), DemoConfig(), "train")


UNREADABLE = [
    ("empty.jsonl", b"", "empty, no rows"),
    ("blank.jsonl", b"\n  \n", "empty, no rows"),
    ("empty.csv", b"", "empty, no rows"),
    ("header.csv", b"prompt,answer\n", "a header but no rows"),
    ("trailing.jsonl", GOOD + b'{"prompt": "p", "answer": "1"} x\n',
     "line 2: invalid JSON (Extra data at column 32)"),
    ("cut.jsonl", GOOD + b'{"prompt": "p", "ans', "line 2: invalid JSON (Unterminated string starting at column 17)"),
    ("newline.jsonl", GOOD + b'{"prompt": "p\n', "line 2: invalid JSON (Invalid control character at column 14)"),
    ("list.jsonl", GOOD + b'["p", "1"]\n', "line 2: not a JSON object"),
    ("latin1.jsonl", GOOD + LATIN1, "line 2: not UTF-8 (byte 0xe9 at column 16)"),
    ("latin1.csv", b"prompt,answer\nWhat is 1 plus 1?,2\nCaf\xe9 has 2 cups,2\n",
     "line 3: not UTF-8 (byte 0xe9 at column 4)"),
    ("ragged.csv", b"prompt,answer\nWhat is 1 plus 1?,2\np,1,3\n", "line 3: 3 fields where the header has 2"),
]


@pytest.mark.parametrize("name,content,message", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_unreadable_input_is_one_line_naming_file_line_and_reason(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(data_mod.DataError) as err:
        read(path)
    assert str(err.value) == f"{path}: {message}"


def test_unreadable_lines_are_skipped_and_counted(tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_bytes(GOOD + LATIN1 + b"\n" + b'{"prompt": "p"\n' + b'{"prompt": "", "answer": "1"}\n'
                      + b'{"prompt": "What is 2 plus 1?", "answer": "3"}\n')
    raw = read(jsonl, on_bad_rows="skip")  # one undecodable, one unparsable, one bad row; the blank line is no row
    assert raw.skipped == 3 and raw.dataset["answer"] == ["2", "3"]

    csv = tmp_path / "prompts.csv"
    csv.write_bytes(b"prompt,answer\nWhat is 1 plus 1?,2\nCaf\xe9,2\np,1,3\nWhat is 2 plus 1?,3\n")
    raw = read(csv, on_bad_rows="skip")
    assert raw.skipped == 2 and raw.dataset["prompt"] == ["What is 1 plus 1?", "What is 2 plus 1?"]

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_bytes(LATIN1 + b"{\n")
    with pytest.raises(data_mod.DataError) as err:
        read(only_bad, on_bad_rows="skip")
    assert str(err.value) == f"{only_bad}: no readable rows (2 bad lines skipped)"


def test_a_bad_row_names_its_line_past_blank_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(GOOD + b"\n\n" + b'{"prompt": "", "answer": "1"}\n')
    with pytest.raises(data_mod.DataError) as err:
        read(path)
    assert str(err.value) == f"{path}: row 1 (line 4): column 'prompt' is empty"


def test_reward_functions_declare_the_columns_they_read():
    @register_reward("test_columnless")
    def columnless(prompts, completions, **columns):
        return [1.0] * len(completions)

    assert required_columns(["exact_match", "format", "contains", "test_columnless"]) == {
        "answer": ["exact_match"], "target": ["contains"]}


def test_grpo_data_without_a_column_its_rewards_read_fails_before_training(tmp_path, small_config):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "What is 1 plus 1?", "target": "2"}\n' * 4)
    source = {"grpo.data.source": str(path), "grpo.data.val_fraction": 0.0}
    config = small_config(**source)  # exact_match and format by default
    with pytest.raises(data_mod.DataError) as err:
        grpo_stage.read_prompts(config)
    assert str(err.value) == (f"{path}: no column 'answer', which reward exact_match reads "
                              "(grpo.reward_funcs; found prompt, target)")
    for rewards in (["format"], ["contains", "format"]):
        config = small_config(**source, **{"grpo.reward_funcs": rewards})
        assert len(grpo_stage.read_prompts(config).dataset) == 4


def test_json_files_are_strict_json(tmp_path):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    path = write_json_atomic(tmp_path / "manifest.json",
                             {"a": float("nan"), "b": [float("inf")], "c": {"d": -math.inf, "e": 1.5}})
    assert json.loads(Path(path).read_text(), parse_constant=refuse) == {"a": None, "b": [None],
                                                                         "c": {"d": None, "e": 1.5}}
