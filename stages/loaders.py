"""A stage's data as its trainer takes it: both splits read and tokenised (stages/data.py), what
was read noted for the manifest, and the loaders that batch them."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from torch.utils.data import DataLoader, DistributedSampler

from alignflow.models import Tokenizer
from alignflow.trainers import distributed as dist_utils

from . import data
from .settings import DataConfig, DemoConfig


@dataclass
class StageData:
    kind: data.DataKind
    train: data.LoadedData
    val: data.LoadedData

    def notes(self) -> dict[str, dict]:
        """Per split: where the rows came from, how many were used, skipped and dropped, what the
        chat template forced (models/chat.py), and the dataset's fingerprint (the manifest's `data`)."""
        out = {}
        for split, loaded in (("train", self.train), ("val", self.val)):
            out[split] = {"origin": loaded.origin, "rows": loaded.examples or len(loaded.dataset),
                          "skipped_bad_rows": loaded.skipped, "dropped_too_long": loaded.dropped_too_long,
                          "fingerprint": getattr(loaded.dataset, "_fingerprint", None)}
            if loaded.packed:
                out[split]["packed_rows"] = len(loaded.dataset)
            rendered = loaded.rendered
            if rendered and rendered.expanded:  # conversations trained as one example per reply, by why
                out[split]["conversations_expanded"] = rendered.expanded
            if rendered and rendered.merged:  # rows trained as prompt tokens + the reply's own
                out[split]["replies_merged"] = rendered.merged
            if loaded.cut_from is not None:  # data.max_val_rows: the rows there were
                out[split]["cut_from"] = loaded.cut_from
        return out

    def loaders(self, pad_id: int, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader | None]:
        """(training loader, held-out loader or None when there are no held-out rows), batched by
        the kind's collate. A DistributedSampler even in one process: its order is a function of
        (seed, epoch), and N ranks with batch B together see exactly the batches one process sees
        with batch N*B."""
        dist = dist_utils.detect()
        collate = functools.partial(self.kind.collate, pad_id=pad_id)

        def loader(dataset, shuffle: bool) -> DataLoader:
            sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle,
                                         seed=seed)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)

        return loader(self.train.dataset, True), loader(self.val.dataset, False) if len(self.val.dataset) else None


def load(stage: str, kind: data.DataKind, cfg: DataConfig, demo: DemoConfig, tok: Tokenizer,
         train_raw: data.RawSplit | None = None) -> StageData:
    """Both splits of a stage's data; `train_raw` when the recipe already read the training rows.
    No training example left is a DataError saying why."""
    train = (data.tokenize(kind, train_raw, tok, cfg) if train_raw is not None
             else data.prepare(stage, kind, cfg, demo, tok, "train"))
    val = data.prepare(stage, kind, cfg, demo, tok, "val")
    if len(train.dataset) == 0:
        why = (f"too little text for one block of data.max_length={cfg.max_length} tokens" if kind.blocks else
               f"{train.dropped_too_long} rows longer than data.max_length={cfg.max_length} dropped, "
               f"{train.skipped} bad rows skipped")
        raise data.DataError(f"{train.origin}: no training examples left ({why})")
    return StageData(kind, train, val)
