"""A stage's data: read (local files or the demo), validated, tokenised, ready for its loaders.

A `DataKind` says what one kind of data is: its columns, how a row is checked, how it becomes
tokens, how rows form a batch, and the demo rows it gets without a file. Each algorithm
declares its kind (stages/algorithm.py: `Algorithm.data`); the built-in kinds are
stages/formats.py's. `read` loads and validates one split of a stage's data, `tokenize`
tokenises it, `prepare` does both. Bad rows raise `DataError` naming the file, the row and the
column, or (on_bad_rows: skip) are dropped; so are lines of jsonl or csv that cannot be read
(not UTF-8, not JSON), named by their line (stages/data_files.py)."""
from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

# The hubs are unreachable here and never needed: everything is local files.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402

from alignflow.models import ChatTemplateError, Tokenizer  # noqa: E402
from alignflow.models.chat import rendering  # noqa: E402
from alignflow.trainers import progress  # noqa: E402
from alignflow.trainers.packing import pack_examples  # noqa: E402

from . import demo  # noqa: E402
from .data_files import DataError, Place, read_file  # noqa: E402

if TYPE_CHECKING:
    from .settings import DataConfig, DemoConfig

log = logging.getLogger(__name__)
Problem = tuple[str, str]  # (column, what is wrong with it)
ROW = "_row"  # while encoding: the raw row an example came from


@dataclass(frozen=True)
class DataKind:
    name: str                                  # for messages: "pairs", "conversations", ...
    columns: tuple[tuple[str, ...], ...]       # accepted column sets; the first is named when none fits
    row_problem: Callable[[dict], Problem | None]
    token_columns: tuple[str, ...]             # an example's length is that of its longest
    collate: Callable[[list[dict], int], dict]  # (examples, pad id) -> the trainer's batch
    demo: Callable[[demo.DemoSplit], list[dict]]  # the demo task's rows of this kind
    # One row -> its token columns, or a list of them (a conversation the chat template makes one
    # example per reply); raise RowRefused (or ChatTemplateError) for a row that cannot train.
    encode: Callable[[dict, Tokenizer], dict | list[dict]] | None = None
    # Or the split as a whole cut into blocks of data.max_length tokens, (rows, tok, max_length)
    # -> blocks (pretraining): no example is then too long.
    blocks: Callable[[datasets.Dataset, Tokenizer, int], datasets.Dataset] | None = None
    packable: bool = False                     # data.packing may put several examples in a row
    # Validated rows -> the rows `encode` reads, and for each the index of the row it came from
    # (KTO: a pair file unpaired into two rows, each row given a mismatched partner).
    convert: Callable[[datasets.Dataset], tuple[datasets.Dataset, list[int]]] | None = None


@dataclass
class RawSplit:
    dataset: datasets.Dataset   # the validated rows (tokenised, in LoadedData)
    origin: str                 # the file, or "demo:<stage>/<split>"
    skipped: int = 0            # bad rows dropped under on_bad_rows=skip
    place: Place | None = None  # where each row is in its file, for errors to name it
    cut_from: int | None = None  # held-out rows before data.max_val_rows cut them (None: not cut)


@dataclass
class LoadedData(RawSplit):
    dropped_too_long: int = 0
    examples: int | None = None  # packed (data.packing): how many examples its rows hold
    rendered: Rendered | None = None  # what its chat template forced (conversational data)

    @property
    def packed(self) -> bool:
        return self.examples is not None


def progress_bars(on: bool) -> None:
    """datasets' bars only for a person at a terminal, and from one rank: in a log (Prefect's,
    torchrun's --tee) every redraw would be a line of its own."""
    (datasets.enable_progress_bars if on and sys.stderr.isatty() else datasets.disable_progress_bars)()
    progress.quiet = not on  # our own progress lines (long phases), too: from one rank


def load_split(stage: str, kind: DataKind, cfg: DataConfig, demo_cfg: DemoConfig, split: str
               ) -> tuple[datasets.Dataset, str, Place]:
    """The raw rows of one split, where they came from, and where they are in it for errors to
    name (lines dropped as bad count in the train split). Without `val_source`, `val_fraction`
    splits the file the same every run."""
    if cfg.source == "demo":
        rows = demo.demo_rows(stage, kind.demo, split, demo_cfg)
        return datasets.Dataset.from_list(rows), f"demo:{stage}/{split}", Place()
    if split == "val" and cfg.val_source:
        ds, place = read_file(cfg.val_source, cfg.on_bad_rows)
        return ds, cfg.val_source, place
    ds, place = read_file(cfg.source, cfg.on_bad_rows)
    if cfg.val_fraction <= 0 or len(ds) < 2:
        return (ds, cfg.source, place) if split == "train" else (ds.select([]), cfg.source, Place())
    order = random.Random(demo_cfg.seed).sample(range(len(ds)), len(ds))
    n_val = max(1, round(len(ds) * cfg.val_fraction))
    rows = sorted(order[:n_val] if split == "val" else order[n_val:])
    return ds.select(rows), cfg.source, Place(rows, place.lines, place.skipped if split == "train" else 0)


def at_most(ds: datasets.Dataset, place: Place, n: int | None, seed: int) -> tuple[datasets.Dataset, Place, int | None]:
    """At most `n` of the held-out rows: a seeded sample, the same every run, kept in file order;
    and how many rows there were when they were cut (None: not cut). The validation loss runs
    over every held-out row at every evaluation: 34k rows cost 9 minutes a pass."""
    if n is None or len(ds) <= n:
        return ds, place, None
    keep = sorted(random.Random(seed).sample(range(len(ds)), n))
    return ds.select(keep), Place([place.row(i) for i in keep], place.lines, place.skipped), len(ds)


def validate(ds: datasets.Dataset, stage: str, kind: DataKind, origin: str, on_bad_rows: str,
             place: Place | None = None) -> tuple[datasets.Dataset, int, Place]:
    """Missing columns always fail; bad rows fail (naming the file's row) or are skipped and
    counted. Returns the good rows, how many were skipped, and where the good rows are."""
    if not any(all(c in ds.column_names for c in option) for option in kind.columns):
        wanted = " or ".join("/".join(option) for option in kind.columns)
        missing = sorted(set(kind.columns[0]) - set(ds.column_names))
        raise DataError(f"{origin}: missing column {', '.join(repr(m) for m in missing)} for {stage} data "
                        f"(expects {wanted}; found {', '.join(ds.column_names) or 'no columns'})")
    rows = progress.Progress(f"checking {origin}", total=len(ds)).over(enumerate(ds))
    bad = [i for i, row in rows if kind.row_problem(row) is not None]
    if bad and on_bad_rows == "error":
        column, what = kind.row_problem(ds[bad[0]])
        raise DataError(f"{origin}: {(place or Place()).name(bad[0])}: column '{column}' {what}")
    return (*_without(ds, bad), (place or Place()).without(bad, len(ds)))


def _without(ds: datasets.Dataset, rows: list[int]) -> tuple[datasets.Dataset, int]:
    """`ds` less `rows`, and how many rows that dropped."""
    if not rows:
        return ds, 0
    drop = set(rows)
    return ds.select([i for i in range(len(ds)) if i not in drop]), len(rows)


class RowRefused(ValueError):
    """A row that validated but cannot train once tokenised (e.g. a pair identical after its
    chat template); named, or skipped and counted under on_bad_rows: skip, as a bad row is."""


@dataclass
class Rendered:
    """What tokenising a split's conversations chose, for its log line and the manifest."""
    refused: int = 0                                   # rows skipped (on_bad_rows: skip)
    expanded: dict[str, int] = field(default_factory=dict)  # why -> conversations made one example per reply
    merged: int = 0                                    # rows with a reply whose first token merged with the prompt


def _encoded(raw: RawSplit, kind: DataKind, tok: Tokenizer, cfg: DataConfig
             ) -> tuple[datasets.Dataset, Place, Rendered]:
    """`ds.map` (in batches) of the kind's `encode(row, tok)` (one example, or a list: a
    conversation expanded into one example per reply), whose columns replace the raw ones; where
    each example's row is in the file; and what rendering chose. A row the chat template refuses
    is a DataError naming the file's row, or (on_bad_rows: skip) dropped and counted."""
    place, notes = raw.place or Place(), Rendered()
    tokenised = progress.Progress(f"tokenising {raw.origin}", total=len(raw.dataset))

    def examples(row: dict, i: int) -> tuple[list[dict], str, int]:
        """The row's examples and what rendering chose (none: refused under skip)."""
        with rendering(cfg.multi_turn) as how:
            try:
                out = kind.encode(row, tok)
            except (ChatTemplateError, RowRefused) as e:
                if cfg.on_bad_rows == "error":
                    raise DataError(f"{raw.origin}: {place.name(i)}: {e}") from None
                return [], "", 0
        return (out if isinstance(out, list) else [out]), how.expanded, how.merged

    ds = raw.dataset
    # A batch may lose every row: it still returns every column, learned from the first row that encodes.
    first = next((out[0] for i in range(len(ds)) if (out := examples(ds[i], i)[0])), None)
    if first is None:
        notes.refused = len(ds)
        return ds.select([]).remove_columns(ds.column_names), Place([], place.lines, place.skipped), notes

    def encode(batch, indices):
        encoded, rows = [], []
        for i, values in zip(indices, zip(*batch.values())):
            out, expanded, merged = examples(dict(zip(batch, values)), i)
            notes.refused += not out
            if expanded:
                notes.expanded[expanded] = notes.expanded.get(expanded, 0) + 1
            notes.merged += merged > 0
            encoded += out
            rows += [i] * len(out)
        tokenised.advance(len(indices))
        return {ROW: rows, **{column: [e[column] for e in encoded] for column in first}}

    # Computed afresh every time (never from datasets' cache): the notes are gathered as it runs.
    ds = ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, load_from_cache_file=False,
                desc=f"tokenise {kind.name}")
    rows = ds[ROW]
    return ds.remove_columns(ROW), Place([place.row(r) for r in rows], place.lines, place.skipped), notes


def enforce_max_length(ds: datasets.Dataset, kind: DataKind, max_length: int, policy: str, origin: str,
                       place: Place | None = None) -> tuple[datasets.Dataset, int]:
    examples = progress.Progress(f"measuring {origin}", total=len(ds)).over(ds)
    lengths = [max(len(example[c]) for c in kind.token_columns) for example in examples]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long and policy == "error":
        i = too_long[0]
        raise DataError(f"{origin}: {(place or Place()).name(i)} is {lengths[i]} tokens, "
                        f"over data.max_length={max_length} "
                        f"({len(too_long)} rows are; set data.too_long=drop to drop them)")
    return _without(ds, too_long)


def read(stage: str, kind: DataKind, cfg: DataConfig, demo_cfg: DemoConfig, split: str) -> RawSplit:
    """Load one split of a stage's data, of `kind`, and validate it (an empty split is returned as
    it is). `stage` names the data in messages and draws the stage's own demo rows."""
    ds, origin, place = load_split(stage, kind, cfg, demo_cfg, split)
    cut_from = None
    if split == "val":  # before checking and tokenising: the rows cut cost nothing more
        ds, place, cut_from = at_most(ds, place, cfg.max_val_rows, demo_cfg.seed)
    ds, skipped, rows = validate(ds, stage, kind, origin, cfg.on_bad_rows, place) if len(ds) else (ds, 0, place)
    if kind.convert is not None and len(ds):
        ds, came_from = kind.convert(ds)
        rows = Place([rows.row(i) for i in came_from], rows.lines, rows.skipped)  # errors still name the file's row
    return RawSplit(ds, origin, place.skipped + skipped, rows, cut_from)


def tokenize(kind: DataKind, raw: RawSplit, tok: Tokenizer, cfg: DataConfig) -> LoadedData:
    """Tokenise a read split: cut into blocks of cfg.max_length, or encoded row by row with
    cfg.too_long applied to longer examples and, with data.packing, packed into rows of
    max_length (trainers.packing)."""
    if len(raw.dataset) == 0 and not raw.skipped:  # nothing was read: nothing to tokenise
        return LoadedData(raw.dataset, raw.origin, cut_from=raw.cut_from)
    if kind.blocks is not None:
        return LoadedData(kind.blocks(raw.dataset, tok, cfg.max_length), raw.origin, skipped=raw.skipped,
                          cut_from=raw.cut_from)
    ds, place, rendered = _encoded(raw, kind, tok, cfg)
    _log_rendering(raw.origin, rendered)
    ds, dropped = enforce_max_length(ds, kind, cfg.max_length, cfg.too_long, raw.origin, place)
    examples = None
    if kind.packable and getattr(cfg, "packing", False):  # the one place data.packing is read
        examples = len(ds)
        ds = datasets.Dataset.from_list(pack_examples(ds.select_columns(["input_ids", "labels"]).to_list(),
                                                      cfg.max_length))
    return LoadedData(ds, raw.origin, skipped=raw.skipped + rendered.refused, cut_from=raw.cut_from,
                      dropped_too_long=dropped, examples=examples, rendered=rendered)


def _log_rendering(origin: str, rendered: Rendered) -> None:
    """One line per split for each choice the chat template forced (models/chat.py)."""
    for why, n in rendered.expanded.items():
        log.info(f"{origin}: {n:,} conversations trained as one example per reply: {why} (data.multi_turn)")
    if rendered.merged:
        log.warning(f"{origin}: {rendered.merged:,} rows have a reply whose first token merges with the chat "
                    "template's generation prompt (e.g. a reply starting with a newline); each trains as the prompt's "
                    "tokens + the reply's own, what generation produces")
    if rendered.refused:
        log.warning(f"{origin}: {rendered.refused:,} rows the chat template cannot train were skipped "
                    "(data.on_bad_rows: skip)")


def prepare(stage: str, kind: DataKind, cfg: DataConfig, demo_cfg: DemoConfig, tok: Tokenizer, split: str
            ) -> LoadedData:
    """Load, validate and tokenise one split of a stage's data."""
    return tokenize(kind, read(stage, kind, cfg, demo_cfg, split), tok, cfg)
