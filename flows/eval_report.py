"""The report's evaluation: one row per (set, metric) and per lm-eval task and metric, each stage a
column with its change from its parent stage (▲/▼), and a chart of each set's headline metric
across the stages (eval.png in the run directory)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignflow.stages import algorithms  # noqa: E402
from alignflow.stages.evaluation import METRICS, RATES  # noqa: E402
from alignflow.trainers import numbers  # noqa: E402

LABELS = dict(METRICS)


def sets_of(result: dict) -> dict[str, dict]:
    return (result.get("evaluation") or {}).get("sets") or {}


def tasks_of(result: dict) -> dict[str, dict]:
    return (result.get("evaluation") or {}).get("lm_eval") or {}


def by_name(results: dict[str, dict], of) -> list[tuple[str, dict[str, dict]]]:
    """Every set (of=sets_of) or lm-eval task (of=tasks_of) any stage has, in the order they first
    appear, with each stage's numbers for it ({} where a stage lacks it)."""
    names = dict.fromkeys(n for r in results.values() for n in of(r))
    return [(n, {s: of(r).get(n, {}) for s, r in results.items()}) for n in names]


def parent_of(stage: str, results: dict[str, dict]) -> str | None:
    """The stage a stage's changes are measured from: its parent, when the report has it."""
    found = algorithms().get(stage)
    parent = found.parent if found else None
    return parent if parent in results else None


def change(key: str, value: float, before: float | None) -> str:
    """` ▲ 12.3 pts` (a rate), ` ▼ 0.0412`, ` ±0` or "" (nothing to compare with)."""
    if before is None or not numbers.is_number(before):
        return ""
    diff = value - before
    if abs(diff) < 1e-12:
        return " ±0"
    arrow = "▲" if diff > 0 else "▼"
    return f" {arrow} {100 * abs(diff):.1f} pts" if key in RATES else f" {arrow} {numbers.number(abs(diff))}"


def cell(key: str, value, before, cases: int | None) -> str:
    if not numbers.is_number(value):
        return ""
    shown = numbers.percent(value, cases) if key in RATES else numbers.number(value)
    return shown + change(key, value, before)


def rows(results: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(label, a cell per stage) for every set's metrics, then every lm-eval task's."""
    stages = list(results)
    parents = {s: parent_of(s, results) for s in stages}
    out = []
    for name, got in by_name(results, sets_of):
        for key, label in METRICS:
            if any(key in got[s] for s in stages):
                out.append((f"{name}: {label}", [
                    cell(key, got[s].get(key), got[parents[s]].get(key) if parents[s] else None, got[s].get("prompts"))
                    for s in stages]))
    for task, got in by_name(results, tasks_of):
        for metric in dict.fromkeys(m for s in stages for m in got[s] if not m.endswith("_stderr")):
            out.append((f"lm-eval {task}: {metric}", [
                cell(metric, got[s].get(metric), got[parents[s]].get(metric) if parents[s] else None, None)
                for s in stages]))
    return out


def headlines(results: dict[str, dict]) -> list[tuple[str, str, dict[str, float]]]:
    """(title, metric, {stage: value}) for each set's headline (the first of METRICS it has) and
    each lm-eval task's first metric: what the chart draws."""
    out = []
    for name, got in by_name(results, sets_of):
        key = next((k for k, _ in METRICS if any(k in g for g in got.values())), None)
        if key:
            out.append((name, key, {s: g[key] for s, g in got.items() if numbers.is_number(g.get(key))}))
    for task, got in by_name(results, tasks_of):
        key = next((m for g in got.values() for m in g if not m.endswith("_stderr")), None)
        if key:
            out.append((f"lm-eval {task}", key, {s: g[key] for s, g in got.items() if numbers.is_number(g.get(key))}))
    return out


def headline_text(result: dict) -> list[str]:
    """`demo accuracy 82.6% (38/46)`: each set's headline and each task's first metric, for a
    listing of one stage (`alignflow runs`)."""
    out = []
    for title, key, values in headlines({"": result}):
        got = sets_of(result).get(title, {})
        out += [f"{title} {LABELS.get(key, key)} {cell(key, v, None, got.get('prompts'))}" for v in values.values()]
    return out


def plot(results: dict[str, dict], out: Path) -> Path | None:
    """eval.png: a bar chart per set (its headline metric) with the stages in pipeline order."""
    drawn = headlines(results)
    if not drawn:
        return None
    cols = min(3, len(drawn))
    rows_ = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3 * rows_), squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    for ax, (title, key, values) in zip(axes.flat, drawn):
        scale = 100 if key in RATES else 1
        bars = ax.bar(list(values), [scale * v for v in values.values()], color="tab:blue")
        ax.bar_label(bars, fmt="%.1f" if scale == 100 else "%.3g", fontsize="small")
        ax.set_title(f"{title}: {LABELS.get(key, key)}" + (" (%)" if scale == 100 else ""), fontsize="medium")
        ax.set_ylim(bottom=min(0, *(scale * v for v in values.values())))  # bars start at 0, even all-zero ones
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def samples(results: dict[str, dict]) -> list[str]:
    """Two greedy completions per stage from each of its sets."""
    lines = []
    for stage, result in results.items():
        for name, got in sets_of(result).items():
            for row in (got.get("samples") or [])[:2]:
                completion = row["completion"].replace("\n", " ⏎ ")
                answer = f" (answer {row['answer']})" if "answer" in row else ""
                lines.append(f"- **{stage}** · {name} — {row['prompt']} → `{completion}`{answer}")
    return ["", "## Sample completions (greedy, evaluation sets)", "", *lines] if lines else []

