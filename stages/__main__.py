"""`python -m alignflow.stages <stage> --config FILE --parent DIR --out DIR`: one stage without Prefect.

This is also what the pipeline hands to `torchrun` when a stage asks for several processes."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from alignflow.trainers import distributed as dist_utils

from . import failures, lifeline
from .algorithm import algorithms, roots
from .config import load_config
from .run import train_stage


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C or `kill -INT` stops the stage also where SIGINT was inherited ignored (a script's
    # background job): Python then installs no handler of its own, and the signal was lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(_interrupted(sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return 130


def _interrupted(argv: list[str]) -> str:
    """The one line an interrupted stage ends with: where its next run starts (the trainer
    resumes from the last checkpoint in --out)."""
    from alignflow.trainers.checkpoint import latest_checkpoint, step_of

    from . import storage

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("stage", nargs="?", default="")
    parser.add_argument("--out")
    args = parser.parse_known_args(argv)[0]
    try:
        last = latest_checkpoint(storage.local_dir(args.out))
        where = f"from step {step_of(last)} (its last checkpoint)" if last else "from the start (no checkpoint yet)"
    except Exception:  # the hint must never hide the interruption itself
        where = "from its last checkpoint"
    return f"python -m alignflow.stages {args.stage}: interrupted. Re-running the same command resumes it {where}."


def stage_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The arguments of one stage's run: here, and the Ray driver's (stages/ray_job.py)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("stage", choices=list(algorithms()))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--config", help="YAML/JSON file laid over the preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--parent", help="the parent stage's checkpoint directory (stages that have one), or a Hugging "
                                     "Face model directory to start from")
    ap.add_argument("--input", dest="inputs", action="append", default=[], metavar="STAGE=DIR",
                    help="the directory of a stage of the run it reads besides its parent (grpo.reward_model=rm: "
                         "--input rm=DIR)")
    ap.add_argument("--out", required=True, help="this stage's checkpoint directory")
    ap.add_argument("--debug", action="store_true", default=bool(os.environ.get("ALIGNFLOW_DEBUG")),
                    help="show the traceback of an error that is otherwise one line (also: ALIGNFLOW_DEBUG=1)")
    return ap


def parsed(ap: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    """The arguments and the stage's inputs ({stage: directory}); `ap.error` on a missing parent
    or a malformed --input."""
    args = ap.parse_args(argv)
    parent = algorithms()[args.stage].parent
    if parent and not args.parent:
        ap.error(f"stage {args.stage} needs --parent (a {parent} checkpoint directory)")
    bad = [item for item in args.inputs if "=" not in item]
    if bad:
        ap.error(f"--input {bad[0]!r} is not STAGE=DIR (e.g. --input rm=runs/tiny/rm)")
    return args, dict(item.split("=", 1) for item in args.inputs)


def stage_config(args: argparse.Namespace):
    """The preset, with --config and --set laid over it."""
    # `start` is the full pipeline's first stage (from --model); one stage names its own parent,
    # so a preset's start (hf-small: sft, which wants a model) does not apply here.
    return load_config(args.preset, args.config, [*args.overrides, f"start={roots()[0]}"])


def _main(argv: list[str] | None) -> int:
    ap = stage_parser("python -m alignflow.stages", __doc__)
    args, inputs = parsed(ap, argv)
    lifeline.watch()  # under the flow's torchrun: end with the process that launched us
    # Progress lines on stdout: a terminal shows them, and under torchrun the flow streams them
    # into the task's Prefect log.
    progress = logging.getLogger("alignflow")
    progress.setLevel(logging.INFO)
    if not progress.handlers:
        progress.addHandler(logging.StreamHandler(sys.stdout))
    try:
        result = train_stage(args.stage, stage_config(args), args.parent, args.out, inputs)
    except Exception as e:
        failures.mark_permanent(e, dist_utils.detect().rank)
        # What a user causes (a setting, the data, a parent, a path, a full disk) is one line, as
        # in flows/cli.py; anything else is a bug, whose traceback is wanted. Under the flow's
        # torchrun the traceback stays: the flow reports each rank's from its log
        # (flows/launch.py), and the marker above carries the one-line reason.
        launched_by_flow = bool(os.environ.get(failures.FAILURE_DIR_ENV))
        if args.debug or launched_by_flow or not isinstance(e, (ValueError, RuntimeError, OSError)):
            raise
        print(f"{ap.prog} {args.stage}: error: {failures.one_line(e)}", file=sys.stderr)
        return 1
    if result is not None:  # rank 0
        print(json.dumps({k: result[k] for k in ("stage", "path", "content_hash")}))
    if dist_utils.detect().enabled:
        dist_utils.exit_worker(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
