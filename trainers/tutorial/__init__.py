"""Training from scratch, for reading (教学包: 手搓优化器与训练循环).

Suggested reading order:

1. ``optimizer_from_scratch.py`` - ``AdamWFromScratch`` and ``SGDFromScratch``:
   moments, bias correction, decoupled vs coupled weight decay, momentum and
   Nesterov, each line matching ``torch.optim`` exactly.
2. ``trainer_from_scratch.py`` - ``TrainerFromScratch``: one plain loop with
   gradient accumulation, clipping, mixed precision, warmup + cosine LR,
   validation and checkpoints.
3. ``trainers/base.py`` - alignflow's production trainer, which does the same
   things plus what real runs need (token-exact accumulation, distributed
   training, exact resumption).

Example::

    from alignflow.trainers.tutorial import AdamWFromScratch, SGDFromScratch, TrainerFromScratch

    optimizer = AdamWFromScratch(params=model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    trainer = TrainerFromScratch(model=model, optimizer=optimizer, train_loader=train_loader,
                                 val_loader=val_loader, device="cpu", max_epochs=10)
    trainer.train()
"""

from .optimizer_from_scratch import AdamWFromScratch, SGDFromScratch
from .trainer_from_scratch import TrainerFromScratch

__all__ = ["AdamWFromScratch", "SGDFromScratch", "TrainerFromScratch"]
