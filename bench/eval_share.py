"""Evaluation's cost in a pipeline run: its share of the wall time and each set's throughput.

    python bench/eval_share.py [--align dpo] [--runs-dir DIR] [--set KEY=VALUE ...]

Runs the whole pipeline on the tiny preset (Prefect's embedded server, in this process) into a
new run directory, then reads each stage's eval.json: the seconds its evaluation took (sets and
lm-eval), and per set its prompts and seconds. Printed: evaluation's share of the flow's wall
time (target <= 15%), and per stage and set the prompts evaluated per second (each prompt is one
greedy completion plus `samples` sampled ones)."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import alignflow.flows  # noqa: F401  (Prefect defaults for an offline machine)
from alignflow.flows.pipeline import alignment_pipeline
from alignflow.stages.config import load_config, parse_override


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--align", default="dpo")
    ap.add_argument("--runs-dir", default=None, help="default: a new temporary directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    runs = args.runs_dir or tempfile.mkdtemp(prefix="alignflow-eval-share-")
    overrides = {**dict(parse_override(o) for o in args.overrides), "runs_dir": runs, "run_id": "eval-share"}
    config = load_config("tiny", overrides=overrides)

    started = time.perf_counter()
    out = alignment_pipeline(config=config, align=args.align)
    wall = time.perf_counter() - started

    total = 0.0
    print(f"\ntiny preset, pretrain -> sft -> {args.align}, runs in {runs}")
    print(f"{'stage':>9} {'set':>12} {'prompts':>8} {'samples':>8} {'seconds':>8} {'prompts/s':>10}")
    for stage, result in out["stages"].items():
        record = json.loads((Path(result["path"]) / "eval.json").read_text())
        total += record["seconds"]
        for name, got in record["sets"].items():
            samples = next(s.samples for s in config.eval.resolved_sets() if s.name == name)
            print(f"{stage:>9} {name:>12} {got['prompts']:>8} {samples:>8} {got['seconds']:>8.2f} "
                  f"{got['prompts'] / got['seconds']:>10.1f}")
    share = total / wall
    print(f"\nevaluation {total:.1f} s of the flow's {wall:.1f} s: {100 * share:.1f}% "
          f"(target <= 15%: {'met' if share <= 0.15 else 'not met'})")


if __name__ == "__main__":
    main()
