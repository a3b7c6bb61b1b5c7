"""What each stage does on the demo, per seed: pretrain -> SFT -> each aligner, on several demo
seeds (the problems' split, every stage's data draw and the training seeds change with it), so
a claim like "DPO does not lower task accuracy" is a range, not one draw.

    python bench/demo_seeds.py [--seeds 0 1 2] [--align dpo simpo orpo grpo] [--runs-dir DIR]
                               [--set KEY=VALUE ...]

Per seed, one run directory holds pretrain and sft (trained once) and a stage per aligner, each
on that sft checkpoint (`alignflow run --align A` with the same run id). Printed per seed: each
stage's task accuracy (greedy exact match on the held-out prompts), held-out reward, and the
aligners' preference accuracy on held-out pairs; then each aligner's change over SFT per seed.
Target (issue: preference family): DPO >= SFT - 2 points of task accuracy on every seed, DPO
val accuracy >= 0.8. One held-out prompt is 100/eval_prompts points (2.2 on the tiny preset)."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import alignflow.flows  # noqa: F401  (Prefect defaults for an offline machine)
from alignflow.flows.pipeline import alignment_pipeline
from alignflow.stages.config import load_config, parse_override


def metrics(run_dir: Path, stage: str) -> dict:
    """Its training metrics and its numbers on the demo's held-out prompts (eval.json), as
    task_accuracy, heldout_reward (sampled) and eval_prompts."""
    demo = json.loads((run_dir / stage / "eval.json").read_text())["sets"]["demo"]
    return {**json.loads((run_dir / stage / "manifest.json").read_text())["metrics"],
            "task_accuracy": demo["accuracy"], "heldout_reward": demo["sampled_reward"], "eval_prompts": demo["prompts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--align", nargs="+", default=["dpo", "simpo", "orpo", "grpo"])
    ap.add_argument("--runs-dir", default=None, help="default: a new temporary directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="alignflow-seeds-"))
    overrides = dict(parse_override(o) for o in args.overrides)

    rows = {}
    for seed in args.seeds:
        config = load_config("tiny", overrides={**overrides, "demo.seed": seed, "runs_dir": str(runs),
                                                "run_id": f"seed{seed}"})
        for align in args.align:
            run_dir = Path(alignment_pipeline(config=config, align=align)["run_dir"])
        rows[seed] = {stage: metrics(run_dir, stage) for stage in ["pretrain", "sft", *args.align]}

    prompts = next(iter(rows.values()))["sft"]["eval_prompts"]
    print(f"\ntiny preset, demo seeds {args.seeds}, {prompts} held-out prompts (one = {100 / prompts:.1f} points); "
          f"runs in {runs}")
    print(f"{'seed':>4} {'stage':>8} {'task acc':>9} {'held-out reward':>16} {'val pref acc':>13}")
    for seed, stages in rows.items():
        for stage, m in stages.items():
            pref = m.get("val_rewards/accuracies")
            print(f"{seed:>4} {stage:>8} {100 * m['task_accuracy']:8.1f}% {m['heldout_reward']:16.3f} "
                  f"{'' if pref is None else f'{100 * pref:12.1f}%':>13}")
    print("\nchange over SFT per seed (task accuracy in points, held-out reward)")
    for align in args.align:
        deltas = [(100 * (s[align]["task_accuracy"] - s["sft"]["task_accuracy"]),
                   s[align]["heldout_reward"] - s["sft"]["heldout_reward"]) for s in rows.values()]
        task = " ".join(f"{d:+.1f}" for d, _ in deltas)
        reward = " ".join(f"{r:+.3f}" for _, r in deltas)
        print(f"{align:>8}: task accuracy {task}   held-out reward {reward}   "
              f"(task range {min(d for d, _ in deltas):+.1f} .. {max(d for d, _ in deltas):+.1f})")
    if "dpo" in args.align:
        worst = min(100 * (s["dpo"]["task_accuracy"] - s["sft"]["task_accuracy"]) for s in rows.values())
        val = min(s["dpo"]["val_rewards/accuracies"] for s in rows.values())
        print(f"\nDPO targets: task accuracy >= SFT - 2 points on every seed: worst {worst:+.1f} "
              f"({'met' if worst >= -2 else 'not met'}); val accuracy >= 0.8: lowest {val:.3f} "
              f"({'met' if val >= 0.8 else 'not met'})")


if __name__ == "__main__":
    main()
