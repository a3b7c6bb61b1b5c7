"""A GRPO run in its own process, alone or under torchrun, for the DDP equivalence test.

Both launches see the same 4 prompts per step: alone as 2 micro-batches of 2, under torchrun
with 2 ranks as 2 micro-batches of 1 per rank. Rank 0 writes the final weights to
<out>.safetensors and the last step's metrics to <out>.json."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_grpo import LetterTokenizer, prompt_items, prompt_loader, row_seeded, tiny_policy  # noqa: E402

from alignflow.trainers.distributed import exit_worker  # noqa: E402
from alignflow.trainers.grpo import GRPOTrainer  # noqa: E402

GLOBAL_BATCH, ACCUM, GENERATIONS = 4, 2, 4


class LastMetricsTrainer(GRPOTrainer):
    def training_step(self, micro):
        self.last_metrics = super().training_step(micro)
        return self.last_metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", default="ddp")
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    items = prompt_items(8, seed=0)  # a seed whose groups differ in reward, so both steps train
    sampler = DistributedSampler(items, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    policy = tiny_policy(seed=0)
    trainer = LastMetricsTrainer(
        policy, copy.deepcopy(policy), torch.optim.SGD(policy.parameters(), lr=0.5),
        prompt_loader(items, GLOBAL_BATCH // ACCUM // world, sampler=sampler), ["contains"],
        generate_fn=row_seeded(GENERATIONS), tokenizer=LetterTokenizer(),
        num_generations=GENERATIONS, max_completion_length=6,
        num_iterations=2, beta=0.04, loss_type="dapo", device="cpu", max_steps=2, grad_accum_steps=ACCUM,
        max_grad_norm=1.0, seed=0, progress_bar=False, strategy=args.strategy)
    trainer.train()
    final = trainer.final_model()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in final.state_dict().items()}, args.out + ".safetensors")
        Path(args.out + ".json").write_text(json.dumps(trainer.last_metrics))
    exit_worker(0)  # rank 0 has written the files


if __name__ == "__main__":
    main()
