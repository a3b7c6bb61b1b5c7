"""Which failures a retry can fix.

A retry resumes a stage from its last checkpoint: worth it after a killed process, a lost
node or flaky storage. Bad data, bad settings, a refused or damaged parent, a directory held
by another run, a read-only path, or a loss gone NaN fail the same way every time; retrying
them only repeats the traceback. The flow retries only what is not permanent (flows/pipeline.py). Under torchrun
the flow sees only an exit code, so `python -m stages` leaves a marker file for it
(`mark_permanent`) in $ALIGNFLOW_FAILURE_DIR."""
from __future__ import annotations

import errno
import os
from pathlib import Path

FAILURE_DIR_ENV = "ALIGNFLOW_FAILURE_DIR"
MARKER = "permanent-failure-rank{rank}.txt"
SUMMARY = "failure-summary.txt"  # a launcher's one line on which rank failed how (the Ray driver's)


def is_permanent(exc: BaseException) -> bool:
    from alignflow.trainers.base import NonFiniteLossError

    from .handoff import StageDirError
    from .lock import LockError

    # ValueError covers DataError, pydantic's ValidationError and the parent check; KeyError
    # and TypeError are bugs, which a retry does not fix either.
    permanent = (ValueError, KeyError, TypeError, StageDirError, LockError, NonFiniteLossError)
    # A read-only or forbidden path stays so; a full disk may be freed meanwhile, so it is retried.
    unwritable = isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    return isinstance(exc, permanent) or unwritable or getattr(exc, "permanent", False)


def one_line(exc: BaseException) -> str:
    """The error as the one line a user reads: pydantic's ValidationError (a bad setting) spans
    several lines per field, with type tags and a URL; here each field is `key: reason (got x)`."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors(include_url=False):
        key = ".".join(str(part) for part in error["loc"])
        reason = error["msg"].removeprefix("Value error, ")  # a validator's own message names its key
        got = f" (got {error['input']!r})" if key and not isinstance(error.get("input"), dict) else ""
        parts.append(f"{key}: {reason}{got}" if key else reason)
    return "; ".join(parts)


def mark_permanent(exc: BaseException, rank: int) -> None:
    """Leave the one-line reason where the launching flow looks (nothing when not launched by it)."""
    directory = os.environ.get(FAILURE_DIR_ENV)
    if directory and is_permanent(exc):
        Path(directory, MARKER.format(rank=rank)).write_text(f"{type(exc).__name__}: {exc}\n")


def permanent_reasons(directory: Path) -> list[str]:
    return [p.read_text().strip() for p in sorted(directory.glob(MARKER.format(rank="*")))]


def leave_summary(text: str) -> None:
    """The launcher's own one line on the failure, for the flow's error (nothing when not launched by it)."""
    directory = os.environ.get(FAILURE_DIR_ENV)
    if directory:
        Path(directory, SUMMARY).write_text(text.strip() + "\n")


def summary(directory: Path) -> str | None:
    path = directory / SUMMARY
    return path.read_text().strip() if path.exists() else None
