"""A training run in its own process, for tests that need torchrun or SIGKILL.

Single process or under `torchrun`; writes the final weights to --out (rank 0)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import SequenceDataset, loader, small_model  # noqa: E402

from alignflow.trainers import SFTTrainer, configure_optimizer, create_scheduler  # noqa: E402
from alignflow.trainers.distributed import exit_worker  # noqa: E402


class InfGradient(torch.autograd.Function):
    """Identity forward; backward sends an infinite gradient: a finite loss whose step overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class KilledTrainer(SFTTrainer):
    """Dies by SIGKILL when it is about to run step `kill_at` (no cleanup, like an OOM kill);
    on rank 1 the gradient of step `poison_at` overflows."""
    kill_at: int | None = None
    poison_at: int | None = None

    def training_step(self, micro):
        if self.kill_at is not None and self.global_step + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(micro)

    def compute_loss(self, model, batch):
        if self.poison_at == self.global_step + 1 and self.dist.rank == 1:
            inner = model

            class Poisoned(torch.nn.Module):  # the model's logits pass through InfGradient
                def forward(self, **kwargs):
                    return InfGradient.apply(inner(**kwargs))

            model = Poisoned()
        return super().compute_loss(model, batch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-dir")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--num-seqs", type=int, default=24)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--save-interval", type=int)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--poison-at", type=int, help="rank 1's gradient overflows at this step")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--hf", help="a Hugging Face model directory to train instead of the built-in model")
    ap.add_argument("--lora", type=int, help="train a LoRA adapter of this rank instead of every weight")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--save-model", help="also save the final model here as a stage does (a LoRA one merged)")
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if args.hf:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
        model.config.use_cache = False
        data = SequenceDataset(args.num_seqs, seed=1, vocab=model.config.vocab_size)
    else:
        model = small_model(seed=0)
        data = SequenceDataset(args.num_seqs, seed=1)
    if args.lora:
        from alignflow.models.lora import add_adapter

        model = add_adapter(model, r=args.lora, alpha=2.0 * args.lora, dropout=args.lora_dropout)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    train_loader = loader(data, args.global_batch // world, shuffle=args.shuffle and sampler is None,
                          sampler=sampler)
    optimizer = configure_optimizer(model, args.optimizer, lr=3e-3, weight_decay=0.1)
    trainer = KilledTrainer(model=model, optimizer=optimizer, train_loader=train_loader,
                            device="cpu", max_epochs=args.epochs, max_steps=args.max_steps,
                            grad_accum_steps=args.accum, max_grad_norm=args.max_grad_norm, log_interval=1,
                            save_dir=args.save_dir, save_interval=args.save_interval,
                            seed=1234, progress_bar=False, strategy=args.strategy, precision=args.precision,
                            activation_checkpointing=args.activation_checkpointing)
    total = trainer.estimated_total_steps()
    # trainer.optimizer: under fsdp the trainer's own, over the sharded parameters.
    trainer.scheduler = create_scheduler(trainer.optimizer, "cosine", warmup_steps=2, total_steps=total)
    trainer.kill_at, trainer.poison_at = args.kill_at, args.poison_at
    trainer.train(resume_from="latest" if args.resume else None)
    final = trainer.final_model()
    if rank == 0:
        state = {k: v.detach().clone().contiguous() for k, v in final.state_dict().items()}  # tied: two copies
        save_file(state, args.out)
        if args.save_model:
            from alignflow.models import save_model
            from alignflow.models.lora import is_adapted, merge

            save_model(merge(final) if is_adapted(final) else final, args.save_model)
    if world > 1:
        exit_worker(0)


if __name__ == "__main__":
    main()
