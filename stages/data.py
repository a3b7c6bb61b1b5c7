"""Stage data: load (local files or the demo), validate, normalise to messages, tokenise.

A data kind is what one stage consumes, declared once as a `DataKind` in `KINDS` (its columns,
row check, tokeniser, and the token columns that must fit data.max_length); adding a kind is
adding one entry there, and its demo rows to `demo.DEMO_ROWS`. The kinds, in TRL's formats:
  pretrain  `text` (packed into blocks of data.max_length tokens)
  sft       `prompt` + `completion`, or conversational `messages`
  dpo       `prompt` + `chosen` + `rejected` (strings or message lists)
  grpo      `prompt` (string or message list) + any columns the reward functions read
  eval      `prompt` + `answer`
`read` loads and validates one split, `tokenize` tokenises it, `prepare` does both. Bad rows
raise `DataError` naming the file, the row and the column, or (on_bad_rows: skip) are dropped;
so are lines of jsonl or csv that cannot be read (not UTF-8, not JSON), named by their line."""
from __future__ import annotations

import csv
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

# The hubs are unreachable here and never needed: everything is local files.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402

from alignflow.models import ChatTemplateError, Tokenizer, render_chat  # noqa: E402
from alignflow.models import prompt_ids as chat_prompt_ids  # noqa: E402
from alignflow.models.chat import ROLES  # noqa: E402
from alignflow.trainers.packing import pack_examples  # noqa: E402

from . import demo  # noqa: E402
from .config import DataConfig, DemoConfig  # noqa: E402

Problem = tuple[str, str]  # (column, what is wrong with it)


class DataError(ValueError):
    """A data file (or one of its rows) does not fit the stage; the message says where."""


@dataclass
class RawSplit:
    dataset: datasets.Dataset   # the validated rows (tokenised, in LoadedData)
    origin: str                 # the file, or "demo:<kind>/<split>"
    skipped: int = 0            # bad rows dropped under on_bad_rows=skip
    place: "Place | None" = None  # where each row is in its file, for errors to name it


@dataclass
class LoadedData(RawSplit):
    dropped_too_long: int = 0
    examples: int | None = None  # packed (sft.data.packing): how many examples its rows hold


# ---------------------------------------------------------------- loading

@dataclass
class Place:
    """Where a split's rows are in their file, for errors to name them."""
    rows: list[int] | None = None   # each row's number in the file (None: its index)
    lines: list[int] | None = None  # each file row's line (jsonl and csv)
    skipped: int = 0                # unreadable lines dropped under on_bad_rows=skip

    def row(self, i: int) -> int:
        return i if self.rows is None else self.rows[i]

    def name(self, i: int) -> str:
        row = self.row(i)
        return f"row {row}" + ("" if self.lines is None else f" (line {self.lines[row]})")

    def without(self, dropped: list[int], n: int) -> "Place":
        """Where the rows are once `dropped` of the `n` rows are gone."""
        gone = set(dropped)
        return Place([self.row(i) for i in range(n) if i not in gone], self.lines, self.skipped)


def _lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, None) per line, or (number, text with U+FFFD, why) for one that is not
    UTF-8: read as bytes and decoded line by line, so a bad byte costs its line, not the file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            encoding = "utf-8-sig" if number == 1 else "utf-8"  # -sig: drop a byte order mark
            try:
                yield number, raw.decode(encoding), None
            except UnicodeDecodeError as e:
                why = f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                yield number, raw.decode(encoding, "replace"), why


def _json_object(text: str) -> dict | str:
    """The row on a line of jsonl, or what is wrong with the line."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"  # some msgs end in "at"
    return row if isinstance(row, dict) else "not a JSON object"


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line number, row or what is wrong) per line; blank lines are no rows."""
    for number, text, problem in _lines(path):
        if problem or text.strip():
            yield number, problem or _json_object(text)


def _csv_rows(source: str, path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line number, row or what is wrong) per record after the header; blank lines are no rows."""
    csv.field_size_limit(2**31 - 1)  # not 128 KiB: a field may be a whole document
    lines = list(_lines(path))
    reader = csv.reader(text for _, text, _ in lines)
    header, n_rows, start = None, 0, 0
    for record in reader:
        # The lines read for this record (a quoted field may span several); one not UTF-8 spoils it.
        first, start = start, reader.line_num
        problem = next((why for _, _, why in lines[first:start] if why), None)
        if not record:  # a blank line
            continue
        if header is None:
            if problem:
                raise DataError(f"{source}: line {first + 1} (the header): {problem}")
            header = record
            continue
        n_rows += 1
        yield first + 1, problem or (dict(zip(header, record)) if len(record) == len(header) else
                                     f"{len(record)} fields where the header has {len(header)}")
    if header and not n_rows:
        raise DataError(f"{source}: a header but no rows")


def _from_lines(source: str, parsed: Iterable[tuple[int, dict | str]], on_bad_rows: str
                ) -> tuple[datasets.Dataset, Place]:
    """The rows of a jsonl or csv file; a line that is no row raises, or is skipped and counted."""
    rows, lines, skipped = [], [], 0
    for number, row in parsed:
        if isinstance(row, str):
            if on_bad_rows == "error":
                raise DataError(f"{source}: line {number}: {row}")
            skipped += 1
        else:
            rows.append(row)
            lines.append(number)
    if not rows:
        raise DataError(f"{source}: no readable rows ({skipped} bad lines skipped)" if skipped else
                        f"{source}: empty, no rows")
    # As the json builder did: a key missing from a row is None there, and a column of mixed
    # types is kept (as JSON) for validation to name the row rather than failing the file.
    columns = dict.fromkeys(key for row in rows for key in row)
    table = {column: [row.get(column) for row in rows] for column in columns}
    return datasets.Dataset.from_dict(table, on_mixed_types="use_json"), Place(lines=lines, skipped=skipped)


def _read(source: str, on_bad_rows: str) -> tuple[datasets.Dataset, Place]:
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{source}: holds several splits ({', '.join(loaded)}); point at one of them")
        return loaded, Place()
    if path.stat().st_size == 0:
        raise DataError(f"{source}: empty, no rows")
    # jsonl and csv are read here, line by line, so a bad line is named (or skipped) by its number.
    if path.suffix == ".jsonl":
        return _from_lines(source, _jsonl_rows(path), on_bad_rows)
    if path.suffix == ".csv":
        return _from_lines(source, _csv_rows(source, path), on_bad_rows)
    builder = {".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if builder is None:
        raise DataError(f"{source}: unsupported file type {path.suffix!r} (use jsonl, json, parquet, csv or a "
                        "save_to_disk directory)")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train"), Place()
    except Exception as e:  # the builders raise many types; the user needs the file name
        raise DataError(f"{source}: cannot be read as {path.suffix[1:]}: {e}") from e


def progress_bars(on: bool) -> None:
    """datasets' bars only for a person at a terminal, and from one rank: in a log (Prefect's,
    torchrun's --tee) every redraw would be a line of its own."""
    (datasets.enable_progress_bars if on and sys.stderr.isatty() else datasets.disable_progress_bars)()


def load_split(kind: str, cfg: DataConfig, demo_cfg: DemoConfig, split: str
               ) -> tuple[datasets.Dataset, str, Place]:
    """The raw rows of one split, where they came from, and where they are in it for errors to
    name (lines dropped as bad count in the train split). Without `val_source`, `val_fraction`
    splits the file the same every run."""
    if cfg.source == "demo":
        rows = demo.demo_data(kind, split, demo_cfg, demo_cfg.seed)
        return datasets.Dataset.from_list(rows), f"demo:{kind}/{split}", Place()
    if split == "val" and cfg.val_source:
        ds, place = _read(cfg.val_source, cfg.on_bad_rows)
        return ds, cfg.val_source, place
    ds, place = _read(cfg.source, cfg.on_bad_rows)
    if cfg.val_fraction <= 0 or len(ds) < 2:
        return (ds, cfg.source, place) if split == "train" else (ds.select([]), cfg.source, Place())
    order = random.Random(demo_cfg.seed).sample(range(len(ds)), len(ds))
    n_val = max(1, round(len(ds) * cfg.val_fraction))
    rows = sorted(order[:n_val] if split == "val" else order[n_val:])
    return ds.select(rows), cfg.source, Place(rows, place.lines, place.skipped if split == "train" else 0)


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


def _texts_problem(row: dict, columns: tuple[str, ...], allow_empty: str = "") -> Problem | None:
    """The first of `columns` that is not text or a message list (`allow_empty` may be "")."""
    return next(((c, p) for c in columns if (p := _text_or_messages_problem(row[c], c == allow_empty))), None)


def _text_row_problem(row: dict) -> Problem | None:
    return None if isinstance(row["text"], str) and row["text"].strip() else ("text", "must be a non-empty string")


def _sft_row_problem(row: dict) -> Problem | None:
    if "messages" in row and row["messages"] is not None:
        problem = _message_list_problem(row["messages"])
        if not problem and not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
            problem = "has no non-empty assistant message to learn from"
        return ("messages", problem) if problem else None
    return _texts_problem(row, ("prompt", "completion"), allow_empty="prompt")


def _pair_row_problem(row: dict) -> Problem | None:
    problem = _texts_problem(row, ("prompt", "chosen", "rejected"))
    if problem is None and row["chosen"] == row["rejected"]:
        problem = ("rejected", "is identical to chosen: the pair carries no preference")
    return problem


def _prompt_row_problem(row: dict) -> Problem | None:
    return _texts_problem(row, ("prompt",))


def row_problem(kind: str, row: dict) -> Problem | None:
    """(column, what is wrong) for the first problem of a row, or None when it is fine."""
    if kind not in KINDS:
        raise ValueError(kind)
    return KINDS[kind].row_problem(row)


def validate(ds: datasets.Dataset, kind: str, origin: str, on_bad_rows: str,
             place: Place | None = None) -> tuple[datasets.Dataset, int, Place]:
    """Missing columns always fail; bad rows fail (naming the file's row) or are skipped and
    counted. Returns the good rows, how many were skipped, and where the good rows are."""
    spec = KINDS[kind]
    if not any(all(c in ds.column_names for c in option) for option in spec.columns):
        wanted = " or ".join("/".join(option) for option in spec.columns)
        missing = sorted(set(spec.columns[0]) - set(ds.column_names))
        raise DataError(f"{origin}: missing column {', '.join(repr(m) for m in missing)} for {kind} data "
                        f"(expects {wanted}; found {', '.join(ds.column_names) or 'no columns'})")
    bad = [i for i, row in enumerate(ds) if spec.row_problem(row) is not None]
    if bad and on_bad_rows == "error":
        column, what = spec.row_problem(ds[bad[0]])
        raise DataError(f"{origin}: {(place or Place()).name(bad[0])}: column '{column}' {what}")
    return (*_without(ds, bad), (place or Place()).without(bad, len(ds)))


def _without(ds: datasets.Dataset, rows: list[int]) -> tuple[datasets.Dataset, int]:
    """`ds` less `rows`, and how many rows that dropped."""
    if not rows:
        return ds, 0
    drop = set(rows)
    return ds.select([i for i in range(len(ds)) if i not in drop]), len(rows)


def as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def prompt_text(value) -> str:
    """A prompt's plain text (the last user message of a conversation), for reward functions."""
    if isinstance(value, str):
        return value
    return next((m["content"] for m in reversed(value) if m["role"] == "user"), value[-1]["content"])


# ---------------------------------------------------------------- tokenisation
# Conversational rows (message lists) go through the tokenizer's own chat template
# (models.chat); plain-text rows are tokenised as they are, as TRL does: the prompt with the
# tokenizer's special tokens (e.g. BOS), the completion after it, then EOS.

def tokenize_pretrain(ds: datasets.Dataset, tok: Tokenizer, block: int) -> datasets.Dataset:
    """Documents joined by EOS, cut into blocks of `block` tokens (a tail short of a block is dropped)."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

    def pack(batch):
        stream: list[int] = []
        for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(eos)
        n = len(stream) // block
        return {"input_ids": [stream[i * block:(i + 1) * block] for i in range(n)]}

    return ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenise+pack")


def _map_rows(ds: datasets.Dataset, encode_row: Callable[[dict], dict], desc: str, origin: str,
              place: Place | None) -> datasets.Dataset:
    """`ds.map` (in batches) of `encode_row(row) -> {column: value}`, whose columns replace ds's; a
    conversation the chat template cannot split is a DataError naming the file's row."""
    def encode(batch, indices):
        encoded = []
        for i, values in zip(indices, zip(*batch.values())):
            try:
                encoded.append(encode_row(dict(zip(batch, values))))
            except ChatTemplateError as e:
                raise DataError(f"{origin}: {(place or Place()).name(i)}: {e}") from None
        return {column: [e[column] for e in encoded] for column in encoded[0]}

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=desc)


def _labelled(ids: list[int], mask: list[int], prefix: str = "") -> dict:
    """`{prefix}input_ids` and `{prefix}labels` (-100 on the tokens not learned)."""
    return {f"{prefix}input_ids": ids, f"{prefix}labels": [t if m else -100 for t, m in zip(ids, mask)]}


def _prompt_and_completion(tok: Tokenizer, prompt, completion, prefix: str = "") -> dict:
    """A prompt and its completion as one sequence whose labels cover only the completion."""
    if isinstance(prompt, list) or isinstance(completion, list):
        messages = as_messages(prompt, "user")
        ids, mask = render_chat(tok, messages + as_messages(completion, "assistant"), learn_from=len(messages))
        return _labelled(ids, mask, prefix)
    start = tok(prompt, add_special_tokens=True)["input_ids"]
    end = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return _labelled(start + end, [0] * len(start) + [1] * len(end), prefix)


def _prompt_ids(tok: Tokenizer, prompt) -> list[int]:
    """A prompt for the model to continue: rendered with the generation prompt when it is a
    conversation, tokenised as it is when plain text."""
    if isinstance(prompt, list):
        return chat_prompt_ids(tok, prompt)
    return tok(prompt, add_special_tokens=True)["input_ids"]


def tokenize_sft(ds: datasets.Dataset, tok: Tokenizer, origin: str = "", place: Place | None = None
                 ) -> datasets.Dataset:
    def encode(row):
        if row.get("messages") is not None:
            return _labelled(*render_chat(tok, row["messages"]))
        return _prompt_and_completion(tok, row["prompt"], row["completion"])

    return _map_rows(ds, encode, "tokenise sft", origin, place)


def tokenize_dpo(ds: datasets.Dataset, tok: Tokenizer, origin: str = "", place: Place | None = None
                 ) -> datasets.Dataset:
    def encode(row):
        prompt = row["prompt"]
        if any(isinstance(row[c], list) for c in ("prompt", "chosen", "rejected")):
            prompt = as_messages(prompt, "user")  # one side a conversation: both are
        return {**_prompt_and_completion(tok, prompt, row["chosen"], "chosen_"),
                **_prompt_and_completion(tok, prompt, row["rejected"], "rejected_")}

    return _map_rows(ds, encode, "tokenise dpo", origin, place)


def tokenize_prompts(ds: datasets.Dataset, tok: Tokenizer, origin: str = "", place: Place | None = None
                     ) -> datasets.Dataset:
    """Prompt ids, every other column, and `prompt` as plain text (what reward functions read)."""
    def encode(row):
        return {**row, "prompt_input_ids": _prompt_ids(tok, row["prompt"]), "prompt": prompt_text(row["prompt"])}

    return _map_rows(ds, encode, "tokenise prompts", origin, place)


def enforce_max_length(ds: datasets.Dataset, kind: str, max_length: int, policy: str, origin: str,
                       place: Place | None = None) -> tuple[datasets.Dataset, int]:
    lengths = [max(len(example[c]) for c in KINDS[kind].token_columns) for example in ds]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long and policy == "error":
        i = too_long[0]
        raise DataError(f"{origin}: {(place or Place()).name(i)} is {lengths[i]} tokens, "
                        f"over data.max_length={max_length} "
                        f"({len(too_long)} rows are; set data.too_long=drop to drop them)")
    return _without(ds, too_long)


# ---------------------------------------------------------------- the kinds; read, tokenize, prepare

@dataclass(frozen=True)
class DataKind:
    columns: tuple[tuple[str, ...], ...]       # accepted column sets; the first is named when none fits
    row_problem: Callable[[dict], Problem | None]
    tokenize: Callable[..., datasets.Dataset]  # (rows, tok, origin, place), or (rows, tok, max_length) when it packs
    token_columns: tuple[str, ...]             # an example's length is that of its longest
    packs: bool = False                        # blocks of exactly max_length: none is too long


KINDS: dict[str, DataKind] = {
    "pretrain": DataKind((("text",),), _text_row_problem, tokenize_pretrain, ("input_ids",), packs=True),
    "sft": DataKind((("prompt", "completion"), ("messages",)), _sft_row_problem, tokenize_sft, ("input_ids",)),
    "dpo": DataKind((("prompt", "chosen", "rejected"),), _pair_row_problem, tokenize_dpo,
                    ("chosen_input_ids", "rejected_input_ids")),
    "grpo": DataKind((("prompt",),), _prompt_row_problem, tokenize_prompts, ("prompt_input_ids",)),
    "eval": DataKind((("prompt", "answer"),), _prompt_row_problem, tokenize_prompts, ("prompt_input_ids",)),
}


def read(kind: str, cfg: DataConfig, demo_cfg: DemoConfig, split: str) -> RawSplit:
    """Load one split of one stage's data and validate it (an empty split is returned as it is)."""
    ds, origin, place = load_split(kind, cfg, demo_cfg, split)
    ds, skipped, rows = validate(ds, kind, origin, cfg.on_bad_rows, place) if len(ds) else (ds, 0, place)
    return RawSplit(ds, origin, place.skipped + skipped, rows)


def tokenize(kind: str, raw: RawSplit, tok: Tokenizer, cfg: DataConfig) -> LoadedData:
    """Tokenise a read split: pack blocks of cfg.max_length, or apply cfg.too_long to longer examples."""
    spec = KINDS[kind]
    if len(raw.dataset) == 0 and not raw.skipped:  # nothing was read: nothing to tokenise
        return LoadedData(raw.dataset, raw.origin)
    if spec.packs:
        return LoadedData(spec.tokenize(raw.dataset, tok, cfg.max_length), raw.origin, skipped=raw.skipped)
    ds = spec.tokenize(raw.dataset, tok, raw.origin, raw.place)
    ds, dropped = enforce_max_length(ds, kind, cfg.max_length, cfg.too_long, raw.origin, raw.place)
    examples = None
    if kind == "sft" and getattr(cfg, "packing", False):  # (held-out prompts read the same settings)
        examples = len(ds)
        ds = datasets.Dataset.from_list(pack_examples(ds.select_columns(["input_ids", "labels"]).to_list(),
                                                      cfg.max_length))
    return LoadedData(ds, raw.origin, skipped=raw.skipped, dropped_too_long=dropped, examples=examples)


def prepare(kind: str, cfg: DataConfig, demo_cfg: DemoConfig, tok: Tokenizer, split: str) -> LoadedData:
    """Load, validate and tokenise one split of one stage's data."""
    return tokenize(kind, read(kind, cfg, demo_cfg, split), tok, cfg)
