"""Stage data: load (local files or the demo), validate, normalise to messages, tokenise.

Accepted formats are the ones TRL users already have:
  pretrain  `text`
  sft       `prompt` + `completion`, or conversational `messages`
  dpo       `prompt` + `chosen` + `rejected` (strings or message lists)
  grpo      `prompt` (string or message list) + any columns the reward functions read
Bad rows raise `DataError` naming the file, the row and the column, or with
`on_bad_rows: skip` are dropped and counted."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

# The hubs are unreachable here and never needed: everything is local files.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402

from models import Tokenizer, render_chat  # noqa: E402

from . import demo  # noqa: E402
from .config import DataConfig, DemoConfig  # noqa: E402

REQUIRED = {
    "pretrain": [("text",)],
    "sft": [("prompt", "completion"), ("messages",)],
    "dpo": [("prompt", "chosen", "rejected")],
    "grpo": [("prompt",)],
    "eval": [("prompt", "answer")],
}
ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """A data file (or one of its rows) does not fit the stage; the message says where."""


@dataclass
class LoadedData:
    dataset: datasets.Dataset
    origin: str                 # the file, or "demo:<kind>/<split>"
    skipped: int = 0            # bad rows dropped under on_bad_rows=skip
    dropped_too_long: int = 0


# ---------------------------------------------------------------- loading

def _read(source: str) -> datasets.Dataset:
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{source}: holds several splits ({', '.join(loaded)}); point at one of them")
        return loaded
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if builder is None:
        raise DataError(f"{source}: unsupported file type {path.suffix!r} (use jsonl, json, parquet, csv or a "
                        "save_to_disk directory)")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # the builders raise many types; the user needs the file name
        raise DataError(f"{source}: cannot be read as {path.suffix[1:]}: {e}") from e


def load_split(kind: str, cfg: DataConfig, demo_cfg: DemoConfig, split: str
               ) -> tuple[datasets.Dataset, str, list[int] | None]:
    """The raw rows of one split, where they came from, and their row numbers in that file (so
    errors name the file's row; None when the rows are the whole file). A file source without
    `val_source` is split by `val_fraction` with the demo seed: the same split on every run."""
    if cfg.source == "demo":
        rows = demo.demo_data(kind, split, demo_cfg, demo_cfg.seed)
        return datasets.Dataset.from_list(rows), f"demo:{kind}/{split}", None
    if split == "val" and cfg.val_source:
        return _read(cfg.val_source), cfg.val_source, None
    ds = _read(cfg.source)
    if cfg.val_fraction <= 0 or len(ds) < 2:
        return (ds, cfg.source, None) if split == "train" else (ds.select([]), cfg.source, [])
    order = random.Random(demo_cfg.seed).sample(range(len(ds)), len(ds))
    n_val = max(1, round(len(ds) * cfg.val_fraction))
    rows = sorted(order[:n_val] if split == "val" else order[n_val:])
    return ds.select(rows), cfg.source, rows


# ---------------------------------------------------------------- validation

def _message_list_problem(value) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of {role, content} messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"message {j} must be {{role: system|user|assistant, content: str}}"
    return None


def _text_or_messages_problem(value, allow_empty: bool = False) -> str | None:
    if isinstance(value, str):
        return None if (allow_empty or value.strip()) else "is empty"
    if not isinstance(value, list):
        return f"must be a string or a list of messages, got {type(value).__name__}"
    return _message_list_problem(value)


def row_problem(kind: str, row: dict) -> tuple[str, str] | None:
    """(column, what is wrong) for the first problem of a row, or None when it is fine."""
    def check(column, problem):
        return (column, problem) if problem else None

    if kind == "pretrain":
        v = row["text"]
        return check("text", None if isinstance(v, str) and v.strip() else "must be a non-empty string")
    if kind == "sft":
        if "messages" in row and row["messages"] is not None:
            problem = _message_list_problem(row["messages"])
            if not problem and not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
                problem = "has no non-empty assistant message to learn from"
            return check("messages", problem)
        return (check("prompt", _text_or_messages_problem(row["prompt"], allow_empty=True))
                or check("completion", _text_or_messages_problem(row["completion"])))
    if kind == "dpo":
        problem = (check("prompt", _text_or_messages_problem(row["prompt"]))
                   or check("chosen", _text_or_messages_problem(row["chosen"]))
                   or check("rejected", _text_or_messages_problem(row["rejected"])))
        if problem is None and row["chosen"] == row["rejected"]:
            problem = ("rejected", "is identical to chosen: the pair carries no preference")
        return problem
    if kind in ("grpo", "eval"):
        return check("prompt", _text_or_messages_problem(row["prompt"]))
    raise ValueError(kind)


def validate(ds: datasets.Dataset, kind: str, origin: str, on_bad_rows: str,
             file_rows: list[int] | None = None) -> tuple[datasets.Dataset, int]:
    """Missing columns always fail; bad rows fail (naming the file's row) or are skipped and counted."""
    options = REQUIRED[kind]
    if not any(all(c in ds.column_names for c in option) for option in options):
        wanted = " or ".join("/".join(option) for option in options)
        missing = sorted(set(options[0]) - set(ds.column_names))
        raise DataError(f"{origin}: missing column {', '.join(repr(m) for m in missing)} for {kind} data "
                        f"(expects {wanted}; found {', '.join(ds.column_names) or 'no columns'})")
    bad = []
    for i, row in enumerate(ds):
        problem = row_problem(kind, row)
        if problem is None:
            continue
        if on_bad_rows == "error":
            column, what = problem
            row_number = file_rows[i] if file_rows is not None else i
            line = f" (line {row_number + 1})" if origin.endswith(".jsonl") else ""
            raise DataError(f"{origin}: row {row_number}{line}: column '{column}' {what}")
        bad.append(i)
    if not bad:
        return ds, 0
    bad_set = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in bad_set]), len(bad)


# ---------------------------------------------------------------- messages

def as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def sft_messages(row: dict) -> list[dict]:
    if row.get("messages") is not None:
        return row["messages"]
    return as_messages(row["prompt"], "user") + as_messages(row["completion"], "assistant")


def prompt_text(value) -> str:
    """A prompt's plain text (the last user message of a conversation), for reward functions."""
    if isinstance(value, str):
        return value
    return next((m["content"] for m in reversed(value) if m["role"] == "user"), value[-1]["content"])


# ---------------------------------------------------------------- tokenisation

def tokenize_pretrain(ds: datasets.Dataset, tok: Tokenizer, block: int) -> datasets.Dataset:
    """Concatenate documents with EOS between them and cut fixed-length blocks (the tail that
    does not fill a block is dropped)."""
    eos = tok.eos_id

    def pack(batch):
        stream: list[int] = []
        for ids in tok.encode_batch(batch["text"]):
            stream.extend(ids)
            stream.append(eos)
        n = len(stream) // block
        return {"input_ids": [stream[i * block:(i + 1) * block] for i in range(n)]}

    return ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenise+pack")


def _labels(ids: list[int], mask: list[int]) -> list[int]:
    return [t if m else -100 for t, m in zip(ids, mask)]


def tokenize_sft(ds: datasets.Dataset, tok: Tokenizer) -> datasets.Dataset:
    def encode(batch):
        out = {"input_ids": [], "labels": []}
        for row in _rows(batch):
            ids, mask = render_chat(tok, sft_messages(row))
            out["input_ids"].append(ids)
            out["labels"].append(_labels(ids, mask))
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenise sft")


def tokenize_dpo(ds: datasets.Dataset, tok: Tokenizer) -> datasets.Dataset:
    def encode(batch):
        out = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
        for row in _rows(batch):
            prompt = as_messages(row["prompt"], "user")
            for side in ("chosen", "rejected"):
                ids, mask = render_chat(tok, prompt + as_messages(row[side], "assistant"))
                out[f"{side}_input_ids"].append(ids)
                out[f"{side}_labels"].append(_labels(ids, mask))
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenise dpo")


def tokenize_prompts(ds: datasets.Dataset, tok: Tokenizer) -> datasets.Dataset:
    """Prompt ids (ending with the assistant marker) plus every original column, with
    `prompt` replaced by its plain text for the reward functions."""
    def encode(batch):
        rows = _rows(batch)
        out = {k: v for k, v in batch.items() if k != "prompt"}
        out["prompt_input_ids"] = [render_chat(tok, as_messages(r["prompt"], "user"), add_generation_prompt=True)[0]
                                   for r in rows]
        out["prompt"] = [prompt_text(r["prompt"]) for r in rows]
        return out

    return ds.map(encode, batched=True, remove_columns=["prompt"], desc="tokenise prompts")


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def length_of(kind: str, example: dict) -> int:
    if kind == "dpo":
        return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))
    if kind in ("grpo", "eval"):
        return len(example["prompt_input_ids"])
    return len(example["input_ids"])


def enforce_max_length(ds: datasets.Dataset, kind: str, max_length: int, policy: str, origin: str
                       ) -> tuple[datasets.Dataset, int]:
    too_long = [i for i, ex in enumerate(ds) if length_of(kind, ex) > max_length]
    if not too_long:
        return ds, 0
    if policy == "error":
        i = too_long[0]
        raise DataError(f"{origin}: row {i} is {length_of(kind, ds[i])} tokens, over data.max_length={max_length} "
                        f"({len(too_long)} rows are; set data.too_long=drop to drop them)")
    drop = set(too_long)
    return ds.select([i for i in range(len(ds)) if i not in drop]), len(too_long)


TOKENIZERS = {"sft": tokenize_sft, "dpo": tokenize_dpo, "grpo": tokenize_prompts, "eval": tokenize_prompts}


def prepare(kind: str, cfg: DataConfig, demo_cfg: DemoConfig, tok: Tokenizer, split: str) -> LoadedData:
    """Load, validate and tokenise one split of one stage's data."""
    raw, origin, file_rows = load_split(kind, cfg, demo_cfg, split)
    if len(raw) == 0:
        return LoadedData(raw, origin)
    raw, skipped = validate(raw, kind, origin, cfg.on_bad_rows, file_rows)
    if kind == "pretrain":
        ds = tokenize_pretrain(raw, tok, cfg.max_length)
        return LoadedData(ds, origin, skipped=skipped)
    ds = TOKENIZERS[kind](raw, tok)
    ds, dropped = enforce_max_length(ds, kind, cfg.max_length, cfg.too_long, origin)
    return LoadedData(ds, origin, skipped=skipped, dropped_too_long=dropped)
