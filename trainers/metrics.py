"""Metrics: summed over a step's micro-batches and ranks (`MetricSums`), then logged to
`metrics.jsonl`, one readable line each on the `alignflow.train` logger (what a person watches
in Prefect's logs), a progress bar when stderr is a terminal, and optionally TensorBoard
(`MetricsLogger`: only rank 0 constructs a live logger; other ranks get one that drops
everything)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignflow.models.files import atomic_write

from . import distributed as dist_utils
from .numbers import duration, number, rate

_BAR_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")
Shown = tuple[tuple[str, str], ...]  # (metric, label): an algorithm's numbers in its progress lines
log = logging.getLogger("alignflow.train")


def progress_line(step: int, total: int | None, metrics: dict, eta_seconds: float | None = None,
                  shown: Shown = ()) -> str:
    """`step 20/300 · loss 1.153 · lr 5.50e-04 · grad_norm 0.84 · 11.8k tok/s · eta 4m10s`, the
    loop's own numbers followed by `shown`, the algorithm's (DPO's `acc 0.75`); a validation
    record reads `step 20/300 · val_loss 1.2 · val acc 0.75`."""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    val = "loss" not in metrics and any(k.startswith("val_") for k in metrics)
    prefix = "val_" if val else ""
    for key in ("loss", "lr", "grad_norm"):
        if prefix + key in metrics:
            parts.append(f"{prefix}{key} {number(metrics[prefix + key])}")
    for key, label in shown:
        if prefix + key in metrics:
            parts.append(f"{'val ' if val else ''}{label} {number(metrics[prefix + key])}")
    if "tokens_per_s" in metrics:
        parts.append(rate(metrics["tokens_per_s"], "tok/s"))
    if eta_seconds is not None:
        parts.append(f"eta {duration(eta_seconds)}")
    return " · ".join(parts)


class MetricsLogger:
    def __init__(self, save_dir: str | Path | None, enabled: bool, total_steps: int | None,
                 initial_step: int = 0, progress_bar: bool = True, tensorboard: bool = False, shown: Shown = ()):
        self.enabled, self.shown = enabled, shown
        self.path = Path(save_dir) / "metrics.jsonl" if (enabled and save_dir) else None
        self.bar = None
        self.tb = None
        self.total, self.first_step, self.started = total_steps, initial_step, time.perf_counter()
        if not enabled:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(initial_step)
        # A bar redraws itself with carriage returns: in a log file, a pipe (torchrun's --tee) or
        # Prefect's logs each redraw would be a line of its own. The progress lines say the same.
        if progress_bar and sys.stderr.isatty():
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
        log.info(progress_line(step, self.total, metrics, self._eta(step), self.shown))
        if self.bar is not None:
            shown = {k: f"{metrics[k]:.4g}" for k in _BAR_KEYS if k in metrics}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def _eta(self, step: int) -> float | None:
        done = step - self.first_step
        if not self.total or done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * max(self.total - step, 0)

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

    def reduce(self, extra: dict[str, torch.Tensor], n_items: float | None, device) -> tuple[dict[str, float], dict]:
        """All-reduce `extra` and the sums in one collective: (extra totals, metric means). A
        plain sum is divided by `n_items` (default: extra's "items")."""
        totals = dist_utils.sum_over_ranks({**{f"extra:{k}": v for k, v in extra.items()},
                                            **{f"sum:{k}": v for k, v in self.sums.items()},
                                            **{f"count:{k}": v for k, v in self.counts.items()}}, device)
        divisor = n_items if n_items is not None else totals["extra:items"]
        means = {k: totals[f"sum:{k}"] / max(totals.get(f"count:{k}", divisor), 1.0) for k in self.sums}
        return {k: totals[f"extra:{k}"] for k in extra}, means
