"""Crash-safe file writing and sealed directories, the one place alignflow does either.

Two problems, each solved once here so every writer gets the same guarantees:

* A process can die (OOM, preemption, Ctrl-C) in the middle of a write. `atomic_write`
  writes to a temporary name and renames it over the target, so a reader sees the old file
  or the complete new one, never a torn one.
* A directory of several files (a training checkpoint, a stage hand-off) must be recognisably
  complete and unaltered. `seal` hashes the files and writes a JSON record of the digests
  LAST: a directory without its record is incomplete, and `verify_seal` re-hashes every file
  before anything trusts it, so truncation or bit rot is reported with the file named
  instead of surfacing later as a confusing load error.

Standard library only (models/ must stay importable without the pipeline, see
models/__init__.py), so trainers/ and stages/ can both build on it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

SHA256_KEY = "sha256"  # where a sealed record keeps its {file name: digest} map


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call write(tmp_path), fsync, then rename over `path`; returns the absolute path.

    `write` receives a path rather than a file object because most writers we use
    (safetensors, tokenizers, torch.save) insist on opening the file themselves."""
    path = os.path.abspath(path)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    # The pid keeps two processes saving the same file from clobbering each other's tmp.
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        # Flush to disk before the rename; otherwise a power loss could leave the new
        # name pointing at a file whose data never reached the disk.
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        # Only still there if something failed; never leave half a file behind.
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> str:
    """`obj` as JSON through `atomic_write`. Sorted keys and indentation make the files
    diffable and their bytes stable for the same content. Strict JSON: a NaN or infinite
    float (a metric with nothing to average) is written as null, since other readers (jq,
    JavaScript, strict parsers) reject Python's bare NaN."""
    def finite(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, Mapping):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(finite(obj), f, indent=2, sort_keys=True, allow_nan=False)

    return atomic_write(path, write)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights never sit in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def seal(directory: str | os.PathLike, record_name: str, fields: Mapping, names: Iterable[str],
         derive: Callable[[dict[str, str]], Mapping] | None = None) -> dict:
    """Hash each of `names` in `directory`, then write `{**fields, "sha256": {name: digest}}`
    as `record_name`, atomically and LAST: from then on the directory counts as complete.

    `derive`, if given, maps the digests to extra fields for the same record (e.g. a content
    hash over some of the files), so the record is still written exactly once. A named file
    that does not exist raises FileNotFoundError: callers check for the files they require
    first when they want a friendlier error. Returns the record as written."""
    directory = Path(directory)
    names = sorted(names)
    if record_name in names:  # the record cannot contain its own digest
        raise ValueError(f"{record_name} cannot seal itself")
    digests = {name: sha256_file(directory / name) for name in names}
    record = {**fields, **(derive(digests) if derive else {}), SHA256_KEY: digests}
    write_json_atomic(directory / record_name, record)
    return record


def read_seal(directory: str | os.PathLike, record_name: str, error: type[Exception]) -> dict:
    """The record `seal` wrote, without checking any file; `error` (naming the record's path)
    if it is missing or unreadable. Cheap: for listings and skip checks."""
    path = Path(directory) / record_name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{directory} is incomplete: {path} is missing") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from e


def plain_relative_path(name: str) -> bool:
    """A file name a record (a manifest, a checkpoint's meta) may list: relative, '/'-separated,
    with no empty, '.' or '..' part, no backslash, NUL or drive letter, so it stays inside the
    directory it names a file of (unless through a symlink the directory itself holds)."""
    parts = name.split("/")
    return not (any(p in ("", ".", "..") for p in parts) or "\\" in name or "\0" in name or ":" in parts[0])


def verify_seal(directory: str | os.PathLike, record_name: str, error: type[Exception],
                required: Iterable[str] = ()) -> dict:
    """The record, after re-hashing every file it lists. Raises `error` naming the record for
    a missing or malformed record or one that leaves out a `required` file (an unlisted file
    would otherwise be trusted unchecked), and naming the file for a missing or altered one."""
    directory = Path(directory)
    record_path = directory / record_name
    record = read_seal(directory, record_name, error)
    digests = record.get(SHA256_KEY) if isinstance(record, dict) else None
    if not isinstance(digests, dict):
        raise error(f"{record_path} records no {SHA256_KEY} digests")
    unlisted = [name for name in required if name not in digests]
    if unlisted:
        raise error(f"{record_path} does not list {', '.join(unlisted)} in {SHA256_KEY}: cannot verify it")
    for name, expected in digests.items():
        if not plain_relative_path(name):  # the record may come from anyone: never open /etc/x or ../../x
            raise error(f"{record_path}: refusing {SHA256_KEY} entry {name!r}: not a plain relative path")
        path = directory / name
        if not path.is_file():
            raise error(f"{path} is missing, though {record_path} lists it")
        actual = sha256_file(path)
        if actual != expected:
            raise error(f"{path} is corrupt: its sha256 {actual} does not match {expected} "
                        f"recorded in {record_path}")
    return record
