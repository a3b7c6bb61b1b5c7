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

from alignflow.stages import Headline, Panel, algorithms, storage  # noqa: E402
from alignflow.trainers import numbers  # noqa: E402

from . import eval_report  # noqa: E402

# Every stage's curves start with its loss, training and validation together; then come its
# algorithm's panels (stages/algorithm.py: Algorithm.panels), each a quantity by the metric
# names its trainer logs.
LOSS_PANEL = Panel("loss", (("loss", "train"), ("val_loss", "validation")))
COLUMNS = 3
EVAL_CHART = "eval.png"  # in the run directory: each evaluation set's headline across the stages


def panels(stage: str) -> list[Panel]:
    found = algorithms().get(stage)  # a stage of an algorithm no longer installed: its loss only
    return [LOSS_PANEL, *(found.panels if found else ())]


def headline_rows(stage: str) -> tuple[Headline, ...]:
    """A stage's report rows of its training metrics: its algorithm's."""
    found = algorithms().get(stage)
    return found.headline if found else ()


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def curves_present(records: list[dict], stage: str) -> list[str]:
    """The metrics of the stage's panels that its records hold."""
    return [key for panel in panels(stage) for key, _ in panel.lines if any(key in r for r in records)]


def plot_curves(stage_dir: Path, stage: str) -> Path | None:
    """curves.png beside the checkpoint: a panel per logged quantity against the optimizer step."""
    records = read_metrics(stage_dir)
    present = set(curves_present(records, stage))
    drawn = [(p.title, [(k, label) for k, label in p.lines if k in present]) for p in panels(stage)]
    drawn = [p for p in drawn if p[1]]
    if not drawn:
        return None
    # At most three panels a row: wider images are shrunk to the page and become unreadable.
    cols, rows = min(COLUMNS, len(drawn)), -(-len(drawn) // COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes.flat, drawn):
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
        return "skipped (already complete)" + (", evaluated again" if result.get("reevaluated") else "")
    resumed = result["metrics"].get("resumed_from_step")
    return f"trained (resumed at step {resumed})" if resumed else "trained"


def headline(stage: str, metrics: dict) -> list[tuple[str, str]]:
    """A stage's headline rows that it has numbers for, as (label, text)."""
    return [(row.label, numbers.percent(metrics[row.metric], metrics.get(row.cases)) if row.cases
             else numbers.number(metrics[row.metric])) for row in headline_rows(stage) if row.metric in metrics]


def evaluated_seconds(record: dict | None) -> float | None:
    """What a stage's evaluation took, None when nothing was evaluated (a reward model)."""
    return record["seconds"] if record and (record.get("sets") or record.get("lm_eval")) else None


def table(results: dict[str, dict]) -> list[str]:
    """The stages side by side: headline metrics, the evaluation's (each with its change from the
    parent stage), then what each cost and where it is."""
    stages = list(results)
    lines = ["| | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]

    def row(label: str, cells: list[str]) -> None:
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    shown = {s: dict(headline(results[s]["stage"], results[s]["metrics"])) for s in stages}
    # Every algorithm's rows in pipeline order, then evaluation's: the same order in every report.
    labels = [r.label for a in algorithms().values() for r in a.headline]
    for label in dict.fromkeys(labels):
        row(label, [shown[s].get(label, "") for s in stages])
    for label, cells in eval_report.rows(results):
        row(label, cells)
    row("eval time", [numbers.duration(evaluated_seconds(results[s].get("evaluation"))) for s in stages])
    row("optimizer steps", [numbers.count(results[s]["metrics"].get("step")) for s in stages])
    row("tokens trained on", [numbers.count(results[s]["metrics"].get("tokens")) for s in stages])
    row("train time", [numbers.duration(results[s]["timings"].get("train_seconds")) for s in stages])
    row("throughput", [numbers.rate(results[s]["timings"].get("tokens_per_second"), "tok/s") for s in stages])
    row("status", [status(results[s]) for s in stages])
    row("checkpoint", [f"`{shown_path(results[s]['path'])}`" for s in stages])
    return lines


def report_card(run_dir: str, run_id: str, results: dict[str, dict], chain: list[str], inline: bool) -> str:
    """Markdown: every complete stage of the run directory side by side, then each one's curves.
    `inline`: images embedded (the Prefect artifact); otherwise linked to each stage's curves.png
    (report.md beside the stage directories)."""
    lines = [f"# alignflow report: {run_id}", "",
             f"`{shown_path(run_dir)}` · this run: {' → '.join(chain)}", "", *table(results)]
    chart = storage.local_dir(run_dir) / EVAL_CHART
    if chart.exists():
        link = inline_image(chart, "evaluation") if inline else f"![evaluation]({EVAL_CHART})"
        lines += ["", "## Evaluation", "", link]
    lines += ["", "## Curves"]
    for stage, result in results.items():
        image = storage.local_dir(result["path"]) / "curves.png"
        if not image.exists():
            lines += ["", f"### {stage}", "", "No curves were logged."]
            continue
        link = inline_image(image, f"{stage} curves") if inline else f"![{stage} curves]({stage}/curves.png)"
        lines += ["", f"### {stage}", "", link]
    return "\n".join(lines + eval_report.samples(results)) + "\n"


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
    for stage, algorithm in algorithms().items():
        if stage in results:
            every[stage] = results[stage]
        else:
            earlier = read_result(storage.join(run_dir, stage))
            if earlier is not None:
                parent = every.get(algorithm.parent)
                stale = parent is not None and earlier.get("parent_hash") != parent["content_hash"]
                every[stage] = {**earlier, "earlier": True, "stale": stale}
    return every
