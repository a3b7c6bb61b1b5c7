"""DPO step time with precomputed vs live reference log-probs, against an SFT step on the same tokens.

The SFT batch is the DPO batch's 2B chosen and rejected sequences, so all three run the same
policy forward and backward; a DPO step adds the pair bookkeeping (and, live, a no-grad
reference forward). Same model; within a round the three take turns step by step so machine
noise hits all alike; the best round of N counts.
Prints ms/step and precomputed/SFT (target <= 1.10) and live/SFT.

    python bench/dpo_step.py [--steps 20] [--rounds 3] [--batch 8] [--seq 128] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from alignflow.models import LlamaForCausalLM, get_preset
from alignflow.trainers import SFTTrainer, configure_optimizer
from alignflow.trainers.dpo import DPOTrainer, collate_pairs


def make_pair_batches(n: int, batch: int, seq: int, vocab: int) -> list[dict]:
    """Pairs sharing a prompt of seq/2 tokens, each completion seq/2 tokens."""
    g = torch.Generator().manual_seed(0)
    prompt_len = seq // 2
    out = []
    for _ in range(n):
        items = []
        for _ in range(batch):
            prompt = torch.randint(3, vocab, (prompt_len,), generator=g)
            item = {}
            for side in ("chosen", "rejected"):
                ids = torch.cat([prompt, torch.randint(3, vocab, (seq - prompt_len,), generator=g)])
                labels = ids.clone()
                labels[:prompt_len] = -100
                item[f"{side}_input_ids"], item[f"{side}_labels"] = ids, labels
            items.append(item)
        out.append(collate_pairs(items))
    return out


def as_sft_batch(pairs: dict) -> dict:
    """The 2B chosen and rejected sequences of a DPO batch as one SFT batch."""
    return {key: torch.cat([pairs[f"chosen_{key}"], pairs[f"rejected_{key}"]])
            for key in ("input_ids", "attention_mask", "labels")}


def build(kind: str, model, batches: list[dict], device: str):
    opt = configure_optimizer(model, lr=1e-4)
    common = dict(optimizer=opt, device=device, max_steps=len(batches), progress_bar=False)
    if kind == "sft":
        return SFTTrainer(model=model, train_loader=[as_sft_batch(b) for b in batches], **common)
    ref = copy.deepcopy(model)
    trainer = DPOTrainer(model=model, ref_model=ref, train_loader=batches,
                         precompute_ref_log_probs=kind == "dpo-precomputed", **common)
    if trainer.dpo.precompute_ref_log_probs:
        trainer.precompute_reference_logps()  # the one-off pass before training is not a step
    return trainer


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_round(trainers: dict, device: str) -> dict[str, float]:
    """Seconds per optimizer step of each trainer, one micro-batch per step. The trainers
    take turns step by step, so a burst of machine noise hits them alike."""
    batches = {kind: list(trainer.train_loader) for kind, trainer in trainers.items()}
    total = dict.fromkeys(trainers, 0.0)
    for step in range(len(next(iter(batches.values())))):
        for kind, trainer in trainers.items():
            sync(device)
            t0 = time.perf_counter()
            trainer.training_step([batches[kind][step]])
            sync(device)
            if step > 0:  # step 0 warms up: allocator, optimizer state
                total[kind] += time.perf_counter() - t0
    return {kind: t / (len(batches[kind]) - 1) for kind, t in total.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (the SFT step gets 2x sequences)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(args.device)
    batches = make_pair_batches(args.steps + 1, args.batch, args.seq, cfg.vocab_size)
    kinds = ("dpo-precomputed", "dpo-live", "sft")
    best = {kind: float("inf") for kind in kinds}
    for _ in range(args.rounds):
        trainers = {kind: build(kind, copy.deepcopy(base), batches, args.device) for kind in kinds}
        for kind, seconds in time_round(trainers, args.device).items():
            best[kind] = min(best[kind], seconds)
    print(f"device={args.device} model=tiny pairs={args.batch} seq={args.seq} "
          f"(SFT batch {2 * args.batch}x{args.seq}) steps={args.steps}")
    for kind in kinds:
        print(f"{kind:16s} {best[kind] * 1e3:8.2f} ms/step  (best of {args.rounds})")
    print(f"ratio precomputed/SFT = {best['dpo-precomputed'] / best['sft']:.3f}  (target <= 1.10)")
    print(f"ratio live/SFT        = {best['dpo-live'] / best['sft']:.3f}")


if __name__ == "__main__":
    main()
