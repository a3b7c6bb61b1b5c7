"""Progress lines for the long phases that print nothing else: reading a data file, checking and
tokenising its rows, a validation pass. A 50 MB jsonl read and tokenised for a minute, then its
validation loss ran 9 minutes over 34k held-out rows, all in silence.

A phase says how far it is at most once every `EVERY_SECONDS`, and only once it has lasted that
long: a phase of a second (the demo data, a small file) prints nothing.

    progress = Progress("validation", total=len(loader), unit="batches")
    for batch in progress.over(loader):
        ...
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .numbers import duration

EVERY_SECONDS = 10.0
clock = time.monotonic  # read through the module, so a test can make a phase slow without waiting
log = logging.getLogger("alignflow.progress")
quiet = False  # set on the ranks other than the main one (stages.data.progress_bars): one line, not one per rank

T = TypeVar("T")


class Progress:
    def __init__(self, what: str, total: int | None = None, unit: str = "rows", every: float | None = None,
                 quiet: bool = False):
        self.what, self.total, self.unit, self.quiet = what, total, unit, quiet
        self.every = EVERY_SECONDS if every is None else every
        self.done = 0
        self.started = self.last = clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = clock()
        if now - self.last >= self.every and not (quiet or self.quiet):
            self.last = now
            log.info(self.line(now - self.started))

    def line(self, seconds: float) -> str:
        """`validation: 120 of 500 batches · 30.0 s · eta 1m35s`, timed as the training lines are."""
        count = f"{self.done:,} of {self.total:,} {self.unit}" if self.total else f"{self.done:,} {self.unit}"
        text = f"{self.what}: {count} · {duration(seconds)}"
        if self.total and self.done:
            text += f" · eta {duration(seconds * (self.total - self.done) / self.done)}"
        return text

    def over(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, counted as they are taken."""
        for item in items:
            yield item
            self.advance()
