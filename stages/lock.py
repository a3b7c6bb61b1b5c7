"""One writer per run or stage directory.

Two `alignflow run` on the same run directory (or two `python -m stages` on the same --out)
would both train every stage and interleave their files. `DirLock` makes the second fail at
once, naming the holder. The lock is a file, linked into place atomically with its record
(host, PID, start time) complete; a lock whose process is gone (same host, PID not running)
is taken over, so a killed run never blocks the next one. A lock held from another host is obeyed: we cannot see
whether that process still runs, so the error says which file to delete if it does not.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .lifeline import alive

LOCK_FILE = ".alignflow.lock"


class LockError(RuntimeError):
    """The directory is in use by another live run."""


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a process that died while creating it: stale


def _stale(holder: dict) -> bool:
    if not holder.get("pid"):
        return True  # unreadable: the lock is written whole (below), so this is damage, not a race
    if holder.get("host") != socket.gethostname():
        return False  # another host's: we cannot tell, so assume it runs
    return not alive(int(holder["pid"]))


class DirLock:
    """`with DirLock(directory, what):` hold `directory/.alignflow.lock` for the body."""

    def __init__(self, directory: str | Path, what: str):
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self.held = False

    def acquire(self) -> "DirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(record))
        try:
            for _ in range(3):  # a stale lock removed by a racing process: try again, boundedly
                try:
                    os.link(tmp, self.path)  # atomic, and the lock appears with its record complete
                except FileExistsError:
                    holder = _holder(self.path)
                    if holder is not None and not _stale(holder):
                        raise LockError(
                            f"{self.path.parent} is in use by {holder.get('what', 'another run')} (pid {holder['pid']} "
                            f"on {holder['host']}, since {holder.get('since', '?')}); wait for it to finish, or "
                            f"delete {self.path} if that process is gone") from None
                    if holder is not None and _holder(self.path) == holder:  # not retaken meanwhile
                        self.path.unlink(missing_ok=True)  # its process is gone: take the lock over
                    continue
                self.held = True
                return self
        finally:
            tmp.unlink(missing_ok=True)
        raise LockError(f"could not take {self.path}: other processes keep taking it")

    def release(self) -> None:
        if self.held and (_holder(self.path) or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
