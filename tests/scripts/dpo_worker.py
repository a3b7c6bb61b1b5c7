"""A DPO run (or SimPO, CPO, ORPO, KTO: --method) in its own process, single or under `torchrun`;
rank 0 writes the final weights.

Also home of `preference_pairs`, the toy preference data the DPO tests share."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import small_model  # noqa: E402

from alignflow.trainers import configure_optimizer  # noqa: E402
from alignflow.trainers.distributed import exit_worker  # noqa: E402
from alignflow.trainers.dpo import DPOTrainer, collate_pairs  # noqa: E402
from alignflow.trainers.kto import KTOTrainer, collate_feedback  # noqa: E402
from alignflow.trainers.orpo import ORPOTrainer  # noqa: E402
from alignflow.trainers.simpo import SimPOTrainer  # noqa: E402

PAIR_VOCAB = 40
FIRST_TOKEN = 3  # 0-2 are left for special tokens and padding


def preference_pairs(n: int, seed: int, vocab: int = PAIR_VOCAB) -> list[dict]:
    """Random prompts; the chosen completion is the successor of the prompt's last token
    (wrapping around), the rejected one is any other token. The rule holds for every prompt,
    so a policy that learned it, rather than the training prompts, prefers the chosen
    completion on new prompts too."""
    g = torch.Generator().manual_seed(seed)
    span = vocab - FIRST_TOKEN
    pairs = []
    for _ in range(n):
        length = int(torch.randint(3, 7, (1,), generator=g))
        prompt = torch.randint(FIRST_TOKEN, vocab, (length,), generator=g)
        right = (prompt[-1:] - FIRST_TOKEN + 1) % span + FIRST_TOKEN
        wrong = torch.randint(FIRST_TOKEN, vocab - 1, (1,), generator=g)
        wrong = wrong + (wrong >= right).long()  # uniform over the tokens other than `right`
        pair = {}
        for side, completion in (("chosen", right), ("rejected", wrong)):
            ids = torch.cat([prompt, completion])
            labels = ids.clone()
            labels[:length] = -100
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, labels
        pairs.append(pair)
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache-dir")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--num-pairs", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--live-reference", action="store_true")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--method", default="dpo", choices=["dpo", "simpo", "cpo", "orpo", "kto"])
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    model = small_model(seed=0, vocab_size=PAIR_VOCAB)
    data = preference_pairs(args.num_pairs, seed=1)
    collate = collate_pairs
    if args.method == "kto":
        from test_kto import feedback_items
        data, collate = feedback_items(args.num_pairs, seed=1), collate_feedback
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    train_loader = DataLoader(data, batch_size=args.global_batch // world // args.accum, sampler=sampler,
                              collate_fn=collate)
    # SGD with momentum: the update is proportional to the gradient, so the comparison sees
    # what DDP changes and not Adam's amplified rounding of near-zero gradients.
    optimizer = configure_optimizer(model, "sgd", lr=0.5, weight_decay=0.0)
    loop = dict(device="cpu", max_epochs=None, max_steps=args.max_steps, grad_accum_steps=args.accum, max_grad_norm=1.0,
                log_interval=1, seed=1234, progress_bar=False, strategy=args.strategy)
    if args.method == "dpo":
        trainer = DPOTrainer(model=model, ref_model=small_model(seed=0, vocab_size=PAIR_VOCAB), optimizer=optimizer,
                             train_loader=train_loader, precompute_ref_log_probs=not args.live_reference,
                             ref_cache_dir=args.cache_dir, **loop)
    elif args.method == "kto":
        trainer = KTOTrainer(model=model, ref_model=small_model(seed=0, vocab_size=PAIR_VOCAB), optimizer=optimizer,
                             train_loader=train_loader, precompute_ref_log_probs=not args.live_reference,
                             ref_cache_dir=args.cache_dir, **loop)
    elif args.method == "orpo":
        trainer = ORPOTrainer(model=model, optimizer=optimizer, train_loader=train_loader, **loop)
    else:
        trainer = SimPOTrainer(model=model, optimizer=optimizer, train_loader=train_loader, loss_type=args.method,
                               **loop)
    trainer.train()
    final = trainer.final_model()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in final.state_dict().items()}, args.out)
    exit_worker(0)  # rank 0 has written the weights


if __name__ == "__main__":
    main()
