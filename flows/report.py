"""Curves, a card per stage and the run's report card, as files and Prefect artifacts.

Everything written here is also a plain file in the run directory (curves.png beside each
checkpoint, report.md at the top, linking them), readable without the Prefect UI."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from alignflow.stages import STAGES, storage  # noqa: E402
from alignflow.trainers import numbers  # noqa: E402

# One panel per quantity, its training and validation lines together, by the metric names the
# trainers log (trainers/grpo.py logs its training reward as `reward`, its held-out one as
# `val_reward`).
PANELS = [("loss", [("loss", "train"), ("val_loss", "validation")]),
          ("reward", [("reward", "train"), ("val_reward", "held-out")]),
          ("KL to the reference", [("kl", "train")]),
          ("completion length (tokens)", [("completion_length/mean", "train")]),
          ("clip ratio", [("clip_ratio/region", "train")]),
          ("DPO accuracy", [("rewards/accuracies", "train"), ("val_rewards/accuracies", "validation")]),
          ("DPO margin", [("rewards/margins", "train"), ("val_rewards/margins", "validation")])]

COLUMNS = 3
LM_STAGES = ("pretrain", "sft")  # stages whose val_loss is a language-model loss
# The report card's rows: label, metric, which stages have it (None: all), and for a rate the
# metric counting its cases (printed `87.0% (40/46)`). DPO's validation loss is a preference
# loss, so it gets its own row instead of sitting beside the language-model losses as if it
# were one.
HEADLINE = [("LM val loss", "val_loss", LM_STAGES, None),
            ("LM val perplexity", "val_ppl", LM_STAGES, None),
            ("DPO val loss", "val_loss", ("dpo",), None),
            ("DPO val accuracy", "val_rewards/accuracies", ("dpo",), "val_items"),
            ("DPO val margin", "val_rewards/margins", ("dpo",), None),
            ("GRPO val reward", "val_reward", ("grpo",), None),
            ("task accuracy", "task_accuracy", None, "eval_prompts"),
            ("format rate", "format_rate", None, "eval_prompts"),
            ("held-out reward", "heldout_reward", None, None)]


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def curves_present(records: list[dict]) -> list[str]:
    """The metrics of PANELS that a stage's records hold."""
    return [key for _, lines in PANELS for key, _ in lines if any(key in r for r in records)]


def plot_curves(stage_dir: Path) -> Path | None:
    """curves.png beside the checkpoint: a panel per logged quantity against the optimizer step."""
    records = read_metrics(stage_dir)
    present = set(curves_present(records))
    panels = [(title, [(k, label) for k, label in lines if k in present]) for title, lines in PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    # At most three panels a row: wider images are shrunk to the page and become unreadable.
    cols, rows = min(COLUMNS, len(panels)), -(-len(panels) // COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for key, label in lines:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label,
                    marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(stage_dir.name)
    fig.tight_layout()
    out = stage_dir / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def inline_image(image: Path, alt: str) -> str:
    """An image inside the markdown itself (Prefect artifacts cannot reference files)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()})"


def shown_path(path: str) -> str:
    """Checkpoints as absolute paths (or their URL), which a reader can open from anywhere."""
    return path if storage.is_url(path) else str(Path(path).resolve())


def status(result: dict) -> str:
    if result.get("earlier"):
        return "from an earlier run" + (", on an older parent" if result.get("stale") else "")
    if result.get("skipped"):
        return "skipped (already complete)"
    resumed = result["metrics"].get("resumed_from_step")
    return f"trained (resumed at step {resumed})" if resumed else "trained"


def headline(stage: str, metrics: dict) -> list[tuple[str, str]]:
    """A stage's HEADLINE rows that it has, as (label, text)."""
    return [(label, numbers.percent(metrics[key], metrics.get(cases)) if cases else numbers.number(metrics[key]))
            for label, key, only, cases in HEADLINE if key in metrics and (only is None or stage in only)]


def table(results: dict[str, dict]) -> list[str]:
    """The stages side by side: headline metrics, then what each cost and where it is."""
    stages = list(results)
    lines = ["| | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]

    def row(label: str, cells: list[str]) -> None:
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    shown = {s: dict(headline(results[s]["stage"], results[s]["metrics"])) for s in stages}
    for label, *_ in HEADLINE:
        row(label, [shown[s].get(label, "") for s in stages])
    row("optimizer steps", [numbers.count(results[s]["metrics"].get("step")) for s in stages])
    row("tokens trained on", [numbers.count(results[s]["metrics"].get("tokens")) for s in stages])
    row("train time", [numbers.duration(results[s]["timings"].get("train_seconds")) for s in stages])
    row("throughput", [numbers.rate(results[s]["timings"].get("tokens_per_second"), "tok/s") for s in stages])
    row("status", [status(results[s]) for s in stages])
    row("checkpoint", [f"`{shown_path(results[s]['path'])}`" for s in stages])
    return lines


def samples(results: dict[str, dict]) -> list[str]:
    lines = []
    for stage, result in results.items():
        for row in (result["metrics"].get("samples") or [])[:2]:
            completion = row["completion"].replace("\n", " ⏎ ")
            lines.append(f"- **{stage}** — {row['prompt']} → `{completion}` (answer {row['answer']})")
    return ["", "## Sample completions (greedy, held-out prompts)", "", *lines] if lines else []


def report_card(run_dir: str, run_id: str, results: dict[str, dict], chain: list[str], inline: bool) -> str:
    """Markdown: every complete stage of the run directory side by side, then each one's curves.
    `inline`: images embedded (the Prefect artifact); otherwise linked to each stage's curves.png
    (report.md beside the stage directories)."""
    lines = [f"# alignflow report: {run_id}", "",
             f"`{shown_path(run_dir)}` · this run: {' → '.join(chain)}", "", *table(results), "", "## Curves"]
    for stage, result in results.items():
        image = storage.local_dir(result["path"]) / "curves.png"
        if not image.exists():
            lines += ["", f"### {stage}", "", "No curves were logged."]
            continue
        link = inline_image(image, f"{stage} curves") if inline else f"![{stage} curves]({stage}/curves.png)"
        lines += ["", f"### {stage}", "", link]
    return "\n".join(lines + samples(results)) + "\n"


def stage_card(stage: str, result: dict, image: Path | None) -> str:
    """One stage as it finishes: its headline numbers, its curves, and every final metric."""
    lines = [f"# {stage}", "", *table({stage: result}), ""]
    lines += [inline_image(image, f"{stage} curves") if image else "No curves were logged.", ""]
    lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {numbers.number(v)} |" for k, v in sorted(result["metrics"].items())
              if numbers.is_number(v)]
    return "\n".join(lines) + "\n"


def complete_stages(run_dir: str, results: dict[str, dict], read_result) -> dict[str, dict]:
    """This run's stages and every other complete stage in its directory, in pipeline order: a
    GRPO chain run after a DPO chain on the same directory reports both aligners. One trained
    on an older version of its parent than the directory now holds says so."""
    every = {}
    for stage in STAGES:
        if stage in results:
            every[stage] = results[stage]
        else:
            earlier = read_result(storage.join(run_dir, stage))
            if earlier is not None:
                parent = every.get(STAGES[stage].parent)
                stale = parent is not None and earlier.get("parent_hash") != parent["content_hash"]
                every[stage] = {**earlier, "earlier": True, "stale": stale}
    return every
