"""Steps/s of SFTTrainer vs a bare hand-written PyTorch loop, in one run.

Same model, data, batch, accumulation, clipping and optimizer; the two are timed in
alternating rounds so machine noise hits both alike. Prints trainer/bare (target >= 0.97).

    python bench/trainer_overhead.py [--steps 30] [--rounds 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from alignflow.models import LlamaForCausalLM, get_preset
from alignflow.trainers import SFTTrainer, configure_optimizer


def make_batches(n: int, batch: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def bare_loop(model, optimizer, batches, accum, max_norm, device):
    """What a user writes by hand: mean loss per micro-batch divided by accum."""
    model.train()
    for i in range(0, len(batches), accum):
        for b in batches[i:i + accum]:
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)
            logits = model(ids, b["attention_mask"].to(device))
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trainer_loop(model, optimizer, batches, accum, max_norm, device):
    trainer = SFTTrainer(model=model, optimizer=optimizer, train_loader=batches, device=device,
                         max_epochs=1, grad_accum_steps=accum, max_grad_norm=max_norm,
                         log_interval=10, progress_bar=False)
    trainer.train()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(args.device)
    batches = make_batches(args.steps * args.accum, args.batch, args.seq, cfg.vocab_size)
    loops = {"bare": bare_loop, "trainer": trainer_loop}
    best = {name: float("inf") for name in loops}
    for round_idx in range(args.rounds + 1):  # round 0 warms up and is discarded
        for name, loop in loops.items():
            model = copy.deepcopy(base)
            opt = configure_optimizer(model, lr=1e-3)
            sync(args.device)
            t0 = time.perf_counter()
            loop(model, opt, batches, args.accum, 1.0, args.device)
            sync(args.device)
            elapsed = time.perf_counter() - t0
            if round_idx > 0:
                best[name] = min(best[name], elapsed)
    rate = {name: args.steps / t for name, t in best.items()}
    print(f"device={args.device} model=tiny batch={args.batch}x{args.seq} accum={args.accum} steps={args.steps}")
    for name in loops:
        print(f"{name:8s} {rate[name]:8.2f} steps/s  (best of {args.rounds})")
    print(f"ratio trainer/bare = {rate['trainer'] / rate['bare']:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
