"""Reading a data file's rows, each remembered by where it stands in the file, so that an error
names the row (and, in jsonl and csv, the line): jsonl and csv line by line (a line that is not
UTF-8 or not JSON costs that line, raised or skipped under on_bad_rows), json and parquet through
the datasets builders, and `save_to_disk` directories."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import datasets

from alignflow.trainers.progress import Progress


class DataError(ValueError):
    """A data file (or one of its rows) does not fit the stage; the message says where."""


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
    for number, row in Progress(f"reading {source}", unit="rows").over(parsed):
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


def read_file(source: str, on_bad_rows: str) -> tuple[datasets.Dataset, Place]:
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
