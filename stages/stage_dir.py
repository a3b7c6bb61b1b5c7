"""A stage's output directory through one run: held by this run alone (a lock), made ready (a
retry keeps the resumable state written for the same config and parent; one at a URL first
fetches the checkpoint mirrored there), and on success written (the model directory, the
manifest last: stages/handoff.py) and published to its URL."""
from __future__ import annotations

import errno
import functools
import os
import re
from pathlib import Path
from typing import Callable

import torch

from . import handoff, storage
from .lock import DirLock


class StageDir:
    def __init__(self, ref: str | Path, holder: str):
        self.ref = str(ref)  # where the stage is published: a path, or an fsspec URL
        self.local = storage.local_dir(ref)  # where it is worked on
        self.lock = DirLock(self.local, holder)

    def open(self, config_hash: str, parent_hash: str | None, inputs: dict[str, str] | None = None) -> None:
        """Take the lock (a held one fails here, naming its holder) before anything is written."""
        self.lock.acquire()
        handoff.prepare_out_dir(self.local, config_hash, parent_hash, inputs)
        if storage.is_url(self.ref):
            storage.restore_checkpoint(self.ref, self.local)

    def release(self) -> None:
        self.lock.release()

    def checkpoint_mirror(self) -> Callable[[Path], None] | None:
        """What the trainer calls after each checkpoint: at a URL, copy it there, so a retry in
        another pod resumes from the bucket."""
        if not storage.is_url(self.ref):
            return None
        return functools.partial(storage.mirror_checkpoint, self.local, url=self.ref)

    def write(self, model: torch.nn.Module, tokenizer, fields: dict, max_shard_size: str,
              adapter: tuple[dict, object] | None = None) -> dict:
        """The Hugging Face model directory, the manifest last, published at a URL; returns what
        the next stage needs (handoff.stage_result)."""
        try:
            handoff.save_stage(self.local, model, tokenizer, max_shard_size, adapter=adapter)
            manifest = handoff.write_manifest(self.local, fields)
        except Exception as e:
            code = os_error_code(e)
            if code is None:
                raise
            # A full disk (or quota, or a read-only mount) is the user's to fix, and the training
            # is not lost: the last checkpoint in state/ is the final step, and a re-run writes
            # the directory from it without training again.
            remedy = "free space" if code in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
            cause = os.strerror(code) + (f": {e.filename}" if getattr(e, "filename", None) else "")
            raise OSError(code, f"writing the stage's model directory {self.local} failed: {cause}; "
                                f"the training is kept in {self.local / 'state'} (its last checkpoint): {remedy} "
                                "and re-run the same command, which writes the directory from there without "
                                "training again") from e
        if storage.is_url(self.ref):
            storage.publish(self.local, self.ref)
        return handoff.stage_result(self.ref, manifest)


def os_error_code(e: BaseException) -> int | None:
    """The errno of an I/O failure: an OSError's, or one a serializer reports only in its message
    (safetensors: "I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None
