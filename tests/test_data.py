"""Stage data: formats TRL users have, and bad data with errors that name file, row and column."""
import json
import logging

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


# ---- big held-out splits: bounded (data.max_val_rows), and long phases say how far they are ----

def numbered_rows(n):
    return [{"prompt": f"What is {i} plus 1?", "completion": f"Answer: {i + 1}"} for i in range(n)]


def test_a_held_out_split_over_max_val_rows_is_cut_to_it_the_same_every_read(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", numbered_rows(200))
    whole = data_mod.read("sft", CONVERSATIONS, DataConfig(source=path, val_fraction=0.25, max_val_rows=None),
                          DemoConfig(), "val")
    cfg = DataConfig(source=path, val_fraction=0.25, max_val_rows=20)
    first, again = (data_mod.prepare("sft", CONVERSATIONS, cfg, DemoConfig(), tok, "val") for _ in range(2))
    assert len(whole.dataset) == 50 and whole.cut_from is None
    assert len(first.dataset) == 20 and first.cut_from == 50
    assert first.dataset["input_ids"] == again.dataset["input_ids"]  # seeded: the same 20 rows each read
    cut = data_mod.read("sft", CONVERSATIONS, cfg, DemoConfig(), "val")
    assert set(cut.dataset["prompt"]) < set(whole.dataset["prompt"])  # held-out rows, none from training
    assert cut.dataset["prompt"] != whole.dataset["prompt"][:20]  # a sample, not the first rows
    # The training split is what it was: the cut takes nothing from it and gives nothing to it.
    train = data_mod.read("sft", CONVERSATIONS, cfg, DemoConfig(), "train")
    assert len(train.dataset) == 150 and not set(train.dataset["prompt"]) & set(whole.dataset["prompt"])
    # A held-out file (val_source) is cut the same way, and an error still names a row by where
    # it is in the file.
    rows = numbered_rows(30)
    for row in rows[1::2]:
        row["completion"] = ""
    val_path = write_jsonl(tmp_path / "val.jsonl", rows)
    cfg = DataConfig(source=path, val_source=val_path, max_val_rows=10, on_bad_rows="skip")
    held = data_mod.read("sft", CONVERSATIONS, cfg, DemoConfig(), "val")
    assert held.cut_from == 30 and len(held.dataset) + held.skipped == 10 and held.skipped > 0
    assert [rows[held.place.row(i)]["prompt"] for i in range(len(held.dataset))] == held.dataset["prompt"]
    assert all(held.place.row(i) % 2 == 0 for i in range(len(held.dataset)))


def test_validation_says_when_its_held_out_rows_were_cut(tmp_path, small_config, caplog):
    """A real pretrain stage on a file whose held-out split is over data.max_val_rows: its log
    says so next to the stage's start line, and the manifest records how many there were."""
    from alignflow.stages.run import train_stage

    words = "the cat sat on the mat and then it ran to the big red barn where a dog slept".split()
    docs = [{"text": " ".join(words[(i + j) % len(words)] for j in range(60))} for i in range(80)]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    config = small_config(**{"pretrain.data.source": path, "pretrain.data.val_fraction": 0.5,
                             "pretrain.data.max_val_rows": 12, "pretrain.data.max_length": 32,
                             "pretrain.train.max_steps": 1})
    with caplog.at_level(logging.INFO, logger="alignflow"):
        result = train_stage("pretrain", config, None, str(tmp_path / "pretrain"))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("alignflow")]
    assert "pretrain validation: 12 of 40 held-out rows (data.max_val_rows)" in lines
    manifest = json.loads((tmp_path / "pretrain" / "manifest.json").read_text())
    assert manifest["data"]["val"]["cut_from"] == 40 and "cut_from" not in manifest["data"]["train"]
    assert result["metrics"]["val_loss"] > 0


class SlowClock:
    """time.monotonic for trainers.progress, as if each look at it came `step` seconds later."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "alignflow.progress"]


def test_long_phases_say_how_far_they_are_short_ones_say_nothing(tmp_path, tok, caplog, monkeypatch):
    from alignflow.trainers import progress

    path = write_jsonl(tmp_path / "sft.jsonl", numbered_rows(40))
    with caplog.at_level(logging.INFO, logger="alignflow"):
        prepare("sft", path, tok)  # on the real clock: a phase of milliseconds
    assert progress_lines(caplog) == []

    monkeypatch.setattr(progress, "clock", SlowClock(step=4.0))  # every row (batch) takes 4 s: lines every 3rd
    with caplog.at_level(logging.INFO, logger="alignflow"):
        prepare("sft", path, tok)
    lines = progress_lines(caplog)
    assert f"reading {path}: 3 rows · 12.0 s" in lines
    assert f"checking {path}: 3 of 40 rows · 12.0 s · eta 2m28s" in lines
    assert f"measuring {path}: 3 of 40 rows · 12.0 s · eta 2m28s" in lines
    # At most one line per 10 s of the phase: 40 rows of 4 s each, 160 s, 13 lines.
    assert len([line for line in lines if line.startswith("reading")]) == 13
    # Tokenising counts datasets' batches (1,000 rows): here one, of 4 s, which says nothing; of 12 s, one line.
    assert not [line for line in lines if line.startswith("tokenising")]
    monkeypatch.setattr(progress, "clock", SlowClock(step=12.0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignflow"):
        prepare("sft", path, tok)
    assert f"tokenising {path}: 40 of 40 rows · 12.0 s · eta 0.0 s" in progress_lines(caplog)


def test_a_long_validation_pass_says_how_far_it_is(monkeypatch, caplog):
    from conftest import SequenceDataset, loader, small_model

    from alignflow.trainers import SFTTrainer, configure_optimizer, progress

    model = small_model(seed=0)
    trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model), train_loader=loader(SequenceDataset(8), 4),
                         val_loader=loader(SequenceDataset(40, seed=3), 4), device="cpu", max_steps=1,
                         progress_bar=False)
    quiet = trainer.evaluate()
    monkeypatch.setattr(progress, "clock", SlowClock(step=5.0))
    with caplog.at_level(logging.INFO, logger="alignflow"):
        slow = trainer.evaluate()
    assert progress_lines(caplog)[:2] == ["validation: 2 of 10 batches · 10.0 s · eta 40.0 s",
                                          "validation: 4 of 10 batches · 20.0 s · eta 30.0 s"]
    assert slow == quiet  # the same numbers, only said
