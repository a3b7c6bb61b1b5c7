"""Stage data: formats TRL users have, and bad data with errors that name file, row and column."""
import json

import pytest

from alignflow.models import train_tokenizer
from alignflow.stages import algorithms, demo
from alignflow.stages import data as data_mod
from alignflow.stages.demo import split_problems
from alignflow.stages.formats import CONVERSATIONS
from alignflow.stages.settings import DataConfig, DemoConfig


@pytest.fixture(scope="module")
def tok():
    rows = demo.demo_rows("pretrain", demo.documents, "train", DemoConfig(pretrain_docs=300))
    return train_tokenizer([r["text"] for r in rows], vocab_size=400)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(stage, path, tok, **cfg):
    kind = algorithms()[stage].data
    return data_mod.prepare(stage, kind, DataConfig(source=path, val_fraction=0.0, **cfg), DemoConfig(), tok, "train")


def test_demo_held_out_problems_are_unseen():
    train, held_out = split_problems(0)
    assert not {(p.question, p.a, p.b) for p in train} & {(p.question, p.a, p.b) for p in held_out}
    rows = demo.demo_rows("dpo", demo.preference_pairs, "train", DemoConfig(preference_pairs=50))
    replies = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]  # conversational
    assert all(c != r and c.endswith(f"Answer: {c.split()[-1]}") for c, r in replies)
    assert (demo.demo_rows("sft", demo.solutions, "train", DemoConfig())
            == demo.demo_rows("sft", demo.solutions, "train", DemoConfig()))  # seeded


def test_sft_plain_text_learns_the_completion_and_eos_without_a_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "What is 2 plus 2?", "completion": "2 + 2 = 4.\nAnswer: 4"},
        {"prompt": "What is 3 plus 1?", "completion": "3 + 1 = 4.\nAnswer: 4"}])
    ex = prepare("sft", path, tok).dataset[0]
    prompt = tok("What is 2 plus 2?", add_special_tokens=False)["input_ids"]
    completion = tok("2 + 2 = 4.\nAnswer: 4", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt + completion + [tok.eos_token_id]  # as TRL: no chat template
    assert ex["labels"] == [-100] * len(prompt) + completion + [tok.eos_token_id]  # EOS learned: it stops


def test_sft_conversations_use_the_template_in_either_format(tmp_path, tok):
    user, reply = {"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}
    pair = write_jsonl(tmp_path / "pair.jsonl", [{"prompt": [user], "completion": [reply]}])
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"messages": [user, reply]}])
    ex = prepare("sft", pair, tok).dataset[0]
    assert prepare("sft", conv, tok).dataset[0] == ex
    assert ex["input_ids"] == tok.apply_chat_template([user, reply], tokenize=True, return_dict=True)["input_ids"]
    learned = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert tok.decode(learned, skip_special_tokens=False) == "2 + 2 = 4.<|eos|>"


def test_dpo_pairs_and_prompt_masking(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "What is 2 plus 2?", "chosen": "Answer: 4", "rejected": "Answer: 5"}])
    ex = prepare("dpo", path, tok).dataset[0]
    for side, text in (("chosen", "Answer: 4"), ("rejected", "Answer: 5")):
        learned = [t for t, lab in zip(ex[f"{side}_input_ids"], ex[f"{side}_labels"]) if lab != -100]
        assert tok.decode(learned, skip_special_tokens=True) == text


def test_pretrain_packing_blocks_with_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "What is 2 plus 2? 2 + 2 = 4."}] * 40)
    ds = prepare("pretrain", path, tok, max_length=32).dataset
    assert len(ds) > 5 and all(len(ids) == 32 for ids in ds["input_ids"])
    assert tok.eos_token_id in ds[0]["input_ids"]


def test_parquet_csv_and_save_to_disk(tmp_path, tok):
    import datasets

    rows = [{"prompt": "What is 1 plus 1?", "answer": "2"}, {"prompt": "What is 2 plus 1?", "answer": "3"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in ("p.parquet", "p.csv", "saved"):
        out = prepare("grpo", str(tmp_path / source), tok).dataset
        assert [str(a) for a in out["answer"]] == ["2", "3"] and out["prompt"] == [r["prompt"] for r in rows]


BAD = [
    ("sft", [{"prompt": "hi"}], None, "missing column 'completion'"),
    ("sft", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "}], 1, "column 'completion' is empty"),
    ("sft", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 7}], 1,
     "column 'completion' must be a string or a list of messages, got int"),
    ("dpo", [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "p", "chosen": "same", "rejected": "same"}], 1,
     "column 'rejected' is identical to chosen"),
    ("sft", [{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}], 0,
     "column 'messages' message 1 must be"),
    ("pretrain", [{"text": "fine"}, {"text": ""}], 1, "column 'text' must be a non-empty string"),
]


@pytest.mark.parametrize("kind,rows,bad_row,message", BAD)
def test_bad_rows_error_names_file_row_and_column(tmp_path, tok, kind, rows, bad_row, message):
    path = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    with pytest.raises(data_mod.DataError) as err:
        prepare(kind, path, tok)
    text = str(err.value)
    assert path in text and message in text
    if bad_row is not None:
        assert f"row {bad_row} (line {bad_row + 1})" in text


def test_bad_rows_skipped_and_counted(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "p", "chosen": "s", "rejected": "s"},
            {"prompt": "", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "x", "rejected": "z"}]
    loaded = prepare("dpo", write_jsonl(tmp_path / "pairs.jsonl", rows), tok, on_bad_rows="skip")
    assert loaded.skipped == 2 and len(loaded.dataset) == 2


def test_too_long_dropped_or_rejected(tmp_path, tok):
    rows = [{"prompt": "What is 1 plus 1?", "completion": "short"},
            {"prompt": "What is 1 plus 1? " * 30, "completion": "long"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    loaded = prepare("sft", path, tok, max_length=40)
    assert loaded.dropped_too_long == 1 and len(loaded.dataset) == 1
    with pytest.raises(data_mod.DataError, match=r"row 1 \(line 2\) is \d+ tokens, over data.max_length=40"):
        prepare("sft", path, tok, max_length=40, too_long="error")


def test_missing_file_and_unsupported_type(tmp_path, tok):
    with pytest.raises(data_mod.DataError, match="no such file"):
        prepare("sft", str(tmp_path / "nope.jsonl"), tok)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(data_mod.DataError, match="unsupported file type"):
        prepare("sft", str(tmp_path / "data.txt"), tok)


def test_a_bad_row_is_named_by_its_row_in_the_file_after_the_val_split(tmp_path, tok):
    rows = [{"prompt": f"What is {i} plus 1?", "completion": f"Answer: {i + 1}"} for i in range(10)]
    rows[7]["completion"] = ""
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = DataConfig(source=path, val_fraction=0.3)
    errors = []
    for split in ("train", "val"):
        try:
            data_mod.prepare("sft", CONVERSATIONS, cfg, DemoConfig(), tok, split)
        except data_mod.DataError as e:
            errors.append(str(e))
    assert errors == [f"{path}: row 7 (line 8): column 'completion' is empty"]
