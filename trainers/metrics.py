"""Where metrics go: a progress bar, `metrics.jsonl`, and optionally TensorBoard.
Only rank 0 constructs a live logger; other ranks get one that drops everything."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

_BAR_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")


class MetricsLogger:
    def __init__(self, save_dir: str | Path | None, enabled: bool, total_steps: int | None,
                 initial_step: int = 0, progress_bar: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(save_dir) / "metrics.jsonl" if (enabled and save_dir) else None
        self.bar = None
        self.tb = None
        if not enabled:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(initial_step)
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional extra: alignflow[tensorboard]
            self.tb = SummaryWriter(str(Path(save_dir or ".") / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """On resume, lines logged after the checkpoint belong to a run that died; drop them
        so the file reads as one uninterrupted run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {k: f"{metrics[k]:.4g}" for k in _BAR_KEYS if k in metrics}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
