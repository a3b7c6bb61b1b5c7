"""Early stopping on a validation metric."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """Stop when `metric` has not improved by more than `min_delta` for `patience` evaluations."""
    metric: str = "val_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    best: float | None = None
    bad_evals: int = 0

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"early stopping mode must be 'min' or 'max', got {self.mode!r}")

    def update(self, value: float) -> bool:
        """Record an evaluation; True when training should stop."""
        improved = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience
