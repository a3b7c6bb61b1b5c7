"""`python -m alignflow.stages <stage> --config FILE --parent DIR --out DIR`: one stage without Prefect.

This is also what the pipeline hands to `torchrun` when a stage asks for several processes."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from alignflow.trainers import distributed as dist_utils

from . import failures, lifeline
from .algorithm import algorithms
from .config import load_config
from .run import train_stage


def main(argv: list[str] | None = None) -> int:
    found = algorithms()
    ap = argparse.ArgumentParser(prog="python -m alignflow.stages", description=__doc__)
    ap.add_argument("stage", choices=list(found))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--config", help="YAML/JSON file laid over the preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--parent", help="the parent stage's checkpoint directory (stages that have one), or a Hugging "
                                     "Face model directory to start from")
    ap.add_argument("--out", required=True, help="this stage's checkpoint directory")
    args = ap.parse_args(argv)
    lifeline.watch()  # under the flow's torchrun: end with the process that launched us
    # Progress lines on stdout: a terminal shows them, and under torchrun the flow streams them
    # into the task's Prefect log.
    progress = logging.getLogger("alignflow")
    progress.setLevel(logging.INFO)
    if not progress.handlers:
        progress.addHandler(logging.StreamHandler(sys.stdout))
    parent = found[args.stage].parent
    if parent and not args.parent:
        ap.error(f"stage {args.stage} needs --parent (a {parent} checkpoint directory)")
    try:
        result = train_stage(args.stage, load_config(args.preset, args.config, args.overrides), args.parent, args.out)
    except Exception as e:
        failures.mark_permanent(e, dist_utils.detect().rank)
        raise
    if result is not None:  # rank 0
        print(json.dumps({k: result[k] for k in ("stage", "path", "content_hash")}))
    if dist_utils.detect().enabled:
        dist_utils.exit_worker(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
