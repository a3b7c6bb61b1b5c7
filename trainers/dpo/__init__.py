"""Direct Preference Optimization (docs/algorithms.md), one file per part:

    loss.py       the losses, pure functions of sequence log-probs, with their formulas
    pairs.py      the batch of preference pairs, the forward over both sides, pair keys
    reference.py  the frozen reference and its precomputed, cached log-probs (`DPOReference`)
    trainer.py    `DPOArgs` and `DPOTrainer`, which ties them to the loop
"""
from .loss import LOSS_TYPES, dpo_loss
from .pairs import collate_pairs, concatenated_inputs, concatenated_logps, pair_keys, preference_metrics
from .reference import DPOReference, ReferenceLogps
from .trainer import DPOArgs, DPOTrainer

__all__ = ["LOSS_TYPES", "dpo_loss", "collate_pairs", "concatenated_inputs", "concatenated_logps", "pair_keys",
           "preference_metrics", "DPOReference", "ReferenceLogps", "DPOArgs", "DPOTrainer"]
