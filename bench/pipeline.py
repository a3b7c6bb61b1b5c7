"""Wall time of the tiny pipeline split into stage work vs Prefect/orchestration overhead, and
the pretraining stage's tokenise-into-blocks throughput, measured in one run.

The embedded server is started (by a trivial flow) before timing, so its one-off start-up is
reported separately. Stage work is each stage's own wall time from its manifest; overhead is
the rest of the flow's wall time (target <= 10%).

    python bench/pipeline.py [--align dpo|grpo] [--runs-dir /tmp/alignflow-bench]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import alignflow.flows  # noqa: F401  (Prefect defaults for an offline machine)
from prefect import flow

from alignflow.flows.pipeline import alignment_pipeline
from alignflow.models import train_tokenizer
from alignflow.stages import data as data_mod
from alignflow.stages.config import load_config
from alignflow.stages.formats import TEXT, blocks_of_text


@flow
def warm_up() -> int:
    return 1


def block_throughput(config) -> tuple[float, int]:
    raw = data_mod.read("pretrain", TEXT, config.pretrain.data, config.demo, "train").dataset
    tok = train_tokenizer((r["text"] for r in raw), vocab_size=config.vocab_size)
    start = time.perf_counter()
    blocks = blocks_of_text(raw, tok, config.pretrain.data.max_length)
    seconds = time.perf_counter() - start
    tokens = len(blocks) * config.pretrain.data.max_length
    return tokens / seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--align", default="dpo", choices=["dpo", "grpo", "none"])
    ap.add_argument("--runs-dir")
    args = ap.parse_args()
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="alignflow-bench-")
    config = load_config("tiny", overrides={"runs_dir": runs_dir, "run_id": "bench"})

    start = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - start

    start = time.perf_counter()
    out = alignment_pipeline(config=config, align=args.align)
    wall = time.perf_counter() - start
    stage_work = sum(r["timings"]["wall_seconds"] for r in out["stages"].values())
    overhead = wall - stage_work

    rate, tokens = block_throughput(config)
    print(f"embedded server start (once): {server_start:.1f} s")
    for name, r in out["stages"].items():
        print(f"  {name:9s} {r['timings']['wall_seconds']:7.1f} s  (training {r['timings']['train_seconds']:.1f} s)")
    print(f"pipeline wall {wall:.1f} s = stage work {stage_work:.1f} s + orchestration {overhead:.1f} s")
    print(f"orchestration overhead = {overhead / wall:.1%} of wall time (target <= 10%)")
    print(f"tokenise into blocks: {rate:,.0f} tokens/s ({tokens:,} tokens of the demo corpus)")
    if not args.runs_dir:
        shutil.rmtree(runs_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
