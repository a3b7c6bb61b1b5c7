"""The Ray launcher's overhead against torchrun's, for the same two-process CPU stage.

    python bench/ray_launcher.py [--rounds 2] [--steps 60]

One SFT stage (the tiny preset's model, on a pretrained parent made first) is launched the way
the flow launches it (`flows/launch.py: run_stage_processes`), alternately with
`launcher: torchrun` (`nproc_per_node: 2`, one machine) and `launcher: ray` (`nnodes: 2`, one
worker on each node of a two-node Ray cluster on loopback: tests/ray_cluster.py, started here
and stopped at the end). Both run two gloo ranks of one CPU thread each with the same global
batch. Per launch it reads the stage's own metrics.jsonl:

- start-up: seconds from the launch to the end of the first optimizer step (the launcher, the
  rendezvous, imports, loading the parent and the data, and the first step itself), read from
  the first record (step 5) less four steady steps;
- steady state: the median seconds per step between consecutive records after step 10.

It prints each launch and the medians over rounds, then the ratio ray ÷ torchrun of each.
Target: steady state ≤ 1.05×. Start-up is reported, with no target (Ray schedules actors and
starts worker processes; torchrun forks two).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback cluster

from ray_cluster import DRIVER_ENV, start_cluster  # noqa: E402

from alignflow.flows.launch import run_stage_processes  # noqa: E402
from alignflow.stages.config import load_config  # noqa: E402
from alignflow.stages.run import train_stage  # noqa: E402

LOG_EVERY = 5  # metrics.jsonl has a record every this many steps
SETTINGS = {"vocab_size": 300, "demo.pretrain_docs": 300, "demo.sft_examples": 2000, "pretrain.train.max_steps": 10,
            "eval.stages": [], "sft.train.batch_size": 8, "sft.train.log_interval": LOG_EVERY,
            "sft.train.save_interval": 10_000}


def launch(launcher: str, parent: Path, out: Path, steps: int, address: str) -> dict:
    extra = {"sft.train.nproc_per_node": 2} if launcher == "torchrun" else \
        {"sft.train.launcher": "ray", "sft.train.nnodes": 2, "ray.address": address}
    config = load_config("tiny", overrides={**SETTINGS, "sft.train.max_steps": steps, **extra})
    quiet = logging.getLogger("bench.ray_launcher")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    t0 = time.time()
    run_stage_processes("sft", config, str(parent), str(out), quiet)
    wall = time.time() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["time"]) for r in records if "loss" in r]
    first_step = logged[0][1] - (logged[1][1] - logged[0][1]) / LOG_EVERY * (logged[0][0] - 1)  # ~ step 1's end
    steady = [(s, t) for s, t in logged if s > 10]
    gaps = [(tb - ta) / (sb - sa) for (sa, ta), (sb, tb) in zip(steady, steady[1:])]
    return {"startup_s": first_step - t0, "step_s": statistics.median(gaps), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    parent = root / "pretrain"
    train_stage("pretrain", load_config("tiny", overrides=SETTINGS), None, parent)
    cluster = start_cluster()
    os.environ.update(DRIVER_ENV)
    got: dict[str, list[dict]] = {"torchrun": [], "ray": []}
    try:
        for r in range(args.rounds):
            for launcher in ("torchrun", "ray"):
                m = launch(launcher, parent, root / f"{launcher}-{r}", args.steps, cluster.address)
                got[launcher].append(m)
                print(f"round {r + 1} {launcher:8s} start-up {m['startup_s']:.2f} s · step {m['step_s'] * 1000:.1f} ms"
                      f" · wall {m['wall_s']:.1f} s", flush=True)
    finally:
        cluster.stop()
    med = {k: {f: statistics.median(m[f] for m in v) for f in ("startup_s", "step_s")} for k, v in got.items()}
    for launcher, m in med.items():
        print(f"median   {launcher:8s} start-up {m['startup_s']:.2f} s · step {m['step_s'] * 1000:.1f} ms")
    print(f"ray ÷ torchrun: start-up {med['ray']['startup_s'] / med['torchrun']['startup_s']:.2f}× "
          f"(+{med['ray']['startup_s'] - med['torchrun']['startup_s']:.1f} s) · "
          f"steady-state step {med['ray']['step_s'] / med['torchrun']['step_s']:.3f}× (target ≤ 1.05×)")


if __name__ == "__main__":
    main()
