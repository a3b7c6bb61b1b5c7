"""Curves, per-stage metric tables and the run's report card, as files and Prefect artifacts.

Everything written here is also a plain file in the run directory (curves.png beside each
checkpoint, report.md at the top), readable without the Prefect UI."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402

# The metric names the trainers log (trainers/grpo.py logs its training reward as `reward`).
CURVES = {"loss": "train loss", "val_loss": "validation loss", "reward": "reward (train)",
          "val_reward": "reward (validation)", "kl": "KL to the reference (train)",
          "completion_length/mean": "completion length (train)", "clip_ratio/region": "clip ratio (train)",
          "rewards/margins": "DPO margin", "rewards/accuracies": "DPO accuracy"}
HEADLINE = [("val_loss", "val loss"), ("val_ppl", "val ppl"), ("task_accuracy", "task acc"),
            ("format_rate", "format"), ("heldout_reward", "held-out reward"),
            ("val_rewards/accuracies", "DPO val acc"), ("val_rewards/margins", "DPO val margin")]


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def curves_present(records: list[dict]) -> list[str]:
    """The CURVES a stage's metrics records hold."""
    return [k for k in CURVES if any(k in r for r in records)]


def plot_curves(stage_dir: Path) -> Path | None:
    """curves.png beside the checkpoint: each logged curve against the step."""
    records = read_metrics(stage_dir)
    present = curves_present(records)
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, key in zip(axes[0], present):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(CURVES[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(stage_dir.name)
    fig.tight_layout()
    out = stage_dir / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def metrics_rows(metrics: dict) -> list[dict]:
    return [{"metric": k, "value": fmt(v)} for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]


def curves_markdown(stage: str, image: Path | None) -> str:
    if image is None:
        return f"# {stage}\n\nNo curves were logged."
    data = base64.b64encode(image.read_bytes()).decode()
    return f"# {stage} curves\n\n![{stage} curves](data:image/png;base64,{data})\n\nFile: `{image}`\n"


def report_card(run_dir: Path, results: dict[str, dict]) -> str:
    """Markdown comparing the stages side by side."""
    stages = list(results)
    lines = [f"# alignflow report: {run_dir.name}", "", "| | " + " | ".join(stages) + " |",
             "|---|" + "---|" * len(stages)]
    for key, label in HEADLINE:
        if any(key in results[s]["metrics"] for s in stages):
            lines.append(f"| {label} | " + " | ".join(fmt(results[s]["metrics"].get(key)) for s in stages) + " |")
    rows = [("train time (s)", lambda r: r["timings"].get("train_seconds")),
            ("tokens", lambda r: r["metrics"].get("tokens")),
            ("tokens/s", lambda r: r["timings"].get("tokens_per_second")),
            ("steps", lambda r: r["metrics"].get("step")),
            ("skipped (already complete)", lambda r: "yes" if r.get("skipped") else "no"),
            ("checkpoint", lambda r: f"`{r['path']}`")]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(get(results[s])) for s in stages) + " |")
    samples = [(s, results[s]["metrics"].get("samples") or []) for s in stages]
    lines += ["", "## Sample completions (greedy, held-out prompts)", ""]
    for stage, rows_ in samples:
        for row in rows_[:2]:
            completion = row["completion"].replace("\n", " ⏎ ")
            lines.append(f"- **{stage}** — {row['prompt']} → `{completion}` (answer {row['answer']})")
    return "\n".join(lines) + "\n"
