"""Tokens/s and model-FLOPs utilisation of SFTTrainer on the gpt2-small preset, bf16, CUDA.

MFU = achieved model FLOPs/s / the GPU's peak dense bf16 FLOPs/s, with the FLOPs of
`models.flops_per_token` (6N + 12·L·H·Q·T). Skips (exit 0) without CUDA.

    python bench/mfu.py [--batch 16] [--seq 1024] [--steps 30] [--compile]
"""
from __future__ import annotations

import argparse
import time

import torch

from alignflow.models import LlamaForCausalLM, flops_per_token, get_preset
from alignflow.trainers import SFTTrainer, configure_optimizer

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' datasheets.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


class TimedSFT(SFTTrainer):
    """Records wall time per optimizer step so warm-up (compile, allocator) can be excluded."""
    step_times: list[float]

    def training_step(self, micro):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = super().training_step(micro)
        torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - t0)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="override the GPU's peak bf16 TFLOP/s")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("SKIP: bench/mfu.py needs CUDA")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    cfg = get_preset(args.preset, max_position_embeddings=max(args.seq, 1024))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)}
               for _ in range((args.steps + args.warmup) * args.accum)]
    trainer = TimedSFT(model=model, optimizer=configure_optimizer(model, lr=3e-4), train_loader=batches,
                       device=device, max_epochs=1, grad_accum_steps=args.accum, use_amp=True,
                       amp_dtype="bfloat16", compile=args.compile, log_interval=10**9, progress_bar=False)
    trainer.step_times = []
    trainer.train()

    timed = trainer.step_times[args.warmup:]
    tokens_per_step = args.batch * args.seq * args.accum
    tok_s = tokens_per_step * len(timed) / sum(timed)
    achieved = tok_s * flops_per_token(cfg, args.seq)
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    print(f"{name}: {args.preset} ({model.num_parameters() / 1e6:.1f}M params) batch {args.batch}x{args.seq} "
          f"accum {args.accum} bf16 compile={args.compile}")
    print(f"tokens/s {tok_s:,.0f}  model TFLOP/s {achieved / 1e12:.1f}  "
          f"step {1000 * sum(timed) / len(timed):.1f} ms  peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if peak:
        print(f"MFU = {achieved / peak:.3f}  (peak {peak / 1e12:.0f} TFLOP/s; target >= 0.45 on an H100)")
    else:
        print("MFU unknown: pass --peak-tflops for this GPU")


if __name__ == "__main__":
    main()
