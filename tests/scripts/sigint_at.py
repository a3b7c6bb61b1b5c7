"""`python sigint_at.py POINT ARGS...`: the `alignflow` command with ARGS, which sends itself one
SIGINT at POINT of its run, as a `kill -INT <pid>` landing exactly there would. POINT:

  server-start     the embedded Prefect server was launched and is not answering yet
  checkpoint-save  the first training checkpoint of this run has its weights written, not yet
                   its trainer_state.json nor its rename into place
  stage-output     the first stage output (the Hugging Face model directory) of this run is
                   written, its manifest not yet
  flow-final       the flow run has just been reported Completed (its result is final)
  none             no signal from inside (the test sends one from outside)
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import time


def send() -> None:
    # CLOCK_MONOTONIC is the machine's: the test compares it with the moment the command ended.
    print(f"sigint_at: SIGINT at {time.monotonic():.3f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGINT)


def sigint_after(owner, name: str, before: bool = False) -> None:
    """Replace `owner.name` by itself plus one SIGINT to this process, after (or before) its
    first call."""
    original = getattr(owner, name)
    sent = []

    @functools.wraps(original)
    def call(*args, **kwargs):
        first = not sent
        sent.append(True)
        if first and before:
            send()
        result = original(*args, **kwargs)
        if first and not before:
            send()
        return result

    setattr(owner, name, call)


def main(point: str, argv: list[str]) -> int:
    from alignflow.flows import cli, embedded_server

    if point == "server-start":
        sigint_after(embedded_server, "_healthy", before=True)
    elif point == "checkpoint-save":
        from alignflow.trainers import checkpoint

        sigint_after(checkpoint, "save_state")
    elif point == "stage-output":
        from alignflow.stages import handoff

        sigint_after(handoff, "save_stage")
    elif point == "flow-final":
        from prefect.flow_engine import FlowRunEngine

        sigint_after(FlowRunEngine, "handle_success")
    elif point != "none":
        raise SystemExit(f"unknown point {point!r}")
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))
