"""The `alignflow` command. The pipeline commands (run, stage, eval, generate, runs) arrive
with the pipeline; until then it describes the project and lists the model presets."""
from __future__ import annotations

import argparse

from models import PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignflow",
        description="alignflow: pretraining -> SFT -> DPO/GRPO as one resumable pipeline. "
                    "Today the trainers (trainers/) and the built-in model (models/) are usable from "
                    "Python; see README.md.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("presets", help="list the built-in model presets and their sizes")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "presets":
        for name, cfg in PRESETS.items():
            print(f"{name:12s} {cfg.num_parameters() / 1e6:8.1f}M params  hidden {cfg.hidden_size}  "
                  f"layers {cfg.num_hidden_layers}  heads {cfg.num_attention_heads}  "
                  f"context {cfg.max_position_embeddings}")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
