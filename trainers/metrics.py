"""Metrics: summed over a step's micro-batches and ranks (`MetricSums`), then logged to a
progress bar, `metrics.jsonl`, and optionally TensorBoard (`MetricsLogger`: only rank 0
constructs a live logger; other ranks get one that drops everything)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models.files import atomic_write

from . import distributed as dist_utils

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
        lines = [(n, line) for n, line in enumerate(self.path.read_text().splitlines(), 1) if line.strip()]
        kept = []
        for i, (n, line) in enumerate(lines):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as e:
                # A crash mid-append tears only the last line, which was written after the
                # checkpoint anyway: drop it. Damage anywhere else is not ours to guess at.
                if i == len(lines) - 1:
                    break
                why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise ValueError(f"{self.path}: line {n} is not a valid metrics record: {why}") from e
            if record.get("step", 0) <= step:
                kept.append(line)
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))  # a crash here loses no line

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


class MetricSums:
    """A step's (or an evaluation's) metrics, summed over micro-batches. `compute_loss` returns
    each metric as a sum over its loss items, or as a `(sum, count)` pair when it is a mean
    over another unit (GRPO's per-token statistics under a per-sequence loss)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict) -> None:
        for name, value in metrics.items():
            total, count = value if isinstance(value, tuple) else (value, None)
            self.sums[name] = self.sums.get(name, 0) + total.detach().double()
            if count is not None:
                self.counts[name] = self.counts.get(name, 0) + torch.as_tensor(count).detach().double()

    def reduce(self, extra: list[torch.Tensor], n_items: float | None, device) -> tuple[list[float], dict]:
        """All-reduce `extra` and the sums in one collective: (extra totals, metric means). A
        plain sum is divided by `n_items` (default: the last of `extra`)."""
        names, paired = sorted(self.sums), sorted(self.counts)
        values = [*extra, *(self.sums[k] for k in names), *(self.counts[k] for k in paired)]
        packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        reduced = dist_utils.all_reduce_sum(packed).tolist()
        totals = reduced[:len(extra)]
        sums = dict(zip(names, reduced[len(extra):]))
        counts = dict(zip(paired, reduced[len(extra) + len(names):]))
        divisor = n_items if n_items is not None else totals[-1]
        return totals, {k: v / max(counts.get(k, divisor), 1.0) for k, v in sums.items()}
