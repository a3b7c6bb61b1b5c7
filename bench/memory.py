"""Memory per rank and tokens/s of `ddp`, `fsdp` and `fsdp + activation_checkpointing`, each
configuration a torchrun job of its own, the ratios printed from one run of this script.

    python bench/memory.py                                # gpt2-small, 2 CPU ranks (gloo), fp32
    python bench/memory.py --device cuda --ranks 1 --model llama-1b --precision bf16 \\
        --configs ddp ddp+ac fsdp+offload                 # one GPU: checkpointing and CPU offload

Per rank it reports:
  state       bytes of the parameters, gradients and optimizer state this rank holds (local
              shards under fsdp), counted tensor by tensor after training;
  activations bytes the forward keeps for backward (on CUDA: memory allocated after the
              forward minus before it; on the CPU: the tensors autograd saved plus, with
              checkpointing, each layer's inputs, which non-reentrant checkpointing keeps);
  in layers   the same from the first decoder layer's input to the last one's output: what
              activation checkpointing can cut (the logits and the loss are outside it);
  peak        peak RSS of the rank's process (CPU) or torch.cuda.max_memory_allocated (CUDA);
  tok/s       tokens per second over all ranks, after one warm-up step.

Targets (issue: FSDP2): state under fsdp <= 0.55x ddp's with 2 ranks; activation checkpointing
cuts the layers' activations >= 2x at <= 1.4x the step time."""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"ddp": {}, "ddp+ac": {"activation_checkpointing": True}, "fsdp": {"strategy": "fsdp"},
           "fsdp+ac": {"strategy": "fsdp", "activation_checkpointing": True},
           "fsdp+offload": {"strategy": "fsdp", "fsdp_cpu_offload": True},
           "fsdp+ac+offload": {"strategy": "fsdp", "activation_checkpointing": True, "fsdp_cpu_offload": True}}
# A Llama-3.2-1B-shaped model (random weights): what one GPU holds with room to compare.
MODELS = {"llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                           tie_word_embeddings=True)}


def tensor_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def state_bytes(model, optimizer) -> int:
    """Parameters, gradients and optimizer state held by this rank (shards only, under fsdp).
    Gradients are counted at their parameters' size: they exist during each step and are freed
    (set to None) after it."""
    import torch

    total = 0
    for p in model.parameters():
        total += tensor_bytes(p) * (2 if p.requires_grad else 1)
    for state in optimizer.state.values():
        total += sum(tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def worker(args) -> None:
    """One rank of one configuration: train `steps` steps, write this rank's numbers as JSON."""
    import torch

    from alignflow.models import LlamaForCausalLM, get_preset
    from alignflow.trainers import PretrainTrainer, configure_optimizer, sharding

    settings = CONFIGS[args.config]
    torch.manual_seed(0)
    config = get_preset("tiny", **MODELS[args.model]) if args.model in MODELS else get_preset(args.model)
    model = LlamaForCausalLM(config)
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", 0)))
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)}
               for _ in range(args.steps + 1)]
    optimizer = configure_optimizer(model, lr=1e-4, weight_decay=0.1)

    class Measured(PretrainTrainer):
        """Times each step; measures what the forward keeps for backward, overall and in the
        decoder layers (the part activation checkpointing can cut; the logits are outside)."""
        times: list[float] = []
        activations: list[tuple[int, int]] = []

        def training_step(self, micro):
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = super().training_step(micro)
            sync()
            self.times.append(time.perf_counter() - t0)
            return out

        def compute_loss(self, model, batch):
            layers = sharding.decoder_layers(model)
            kept = [0]  # CPU: bytes saved for backward so far
            marks = {}

            def now() -> int:
                return torch.cuda.memory_allocated(device) if device.type == "cuda" else kept[0]

            def count_inputs(module, inputs):  # what non-reentrant checkpointing keeps per layer
                if settings.get("activation_checkpointing") and device.type != "cuda":
                    kept[0] += sum(tensor_bytes(x) for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad)

            def mark(name):  # a hook that returns something would replace the layer's inputs/output
                return lambda *_: marks.setdefault(name, now()) and None

            hooks = [layers[0].register_forward_pre_hook(mark("first")),
                     layers[-1].register_forward_hook(mark("last"))]
            hooks += [layer.register_forward_pre_hook(count_inputs) for layer in layers]

            def pack(t):
                kept[0] += t.numel() * t.element_size()
                return t

            before = now()
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    result = super().compute_loss(model, batch)
            finally:
                for h in hooks:
                    h.remove()
            self.activations.append((now() - before, marks["last"] - marks["first"]))
            return result

    trainer = Measured(model=model, optimizer=optimizer, train_loader=batches, device=device,
                       max_steps=args.steps + 1, max_grad_norm=1.0, precision=args.precision,
                       log_interval=10_000, progress_bar=False, **settings)
    trainer.train()
    tokens = args.batch * args.seq * world
    step = sum(trainer.times[1:]) / max(len(trainer.times) - 1, 1)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    measured = trainer.activations[1:] or trainer.activations  # after the warm-up step
    result = {"state": state_bytes(trainer.model, trainer.optimizer), "activations": max(a for a, _ in measured),
              "in_layers": max(b for _, b in measured),
              "peak": peak, "step_s": step, "tok_s": tokens / step}
    Path(args.out).with_suffix(f".rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(result))
    if world > 1:
        from alignflow.trainers.distributed import exit_worker
        exit_worker(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, config: str, tmp: Path) -> dict:
    out = tmp / config
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", "--config", config, "--out", str(out),
           "--model", args.model, "--device", args.device, "--precision", args.precision,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{config} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(args.ranks)]
    return {k: max(r[k] for r in ranks) if k != "tok_s" else ranks[0][k] for k in ranks[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", help="a built-in preset, or llama-1b")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--configs", nargs="+", default=["ddp", "fsdp", "fsdp+ac"], choices=list(CONFIGS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    print(f"model={args.model} ranks={args.ranks} device={args.device} precision={args.precision} "
          f"batch={args.batch}x{args.seq} per rank, {args.steps} timed steps")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {c: run(args, c, Path(tmp)) for c in args.configs}
    mib = 2 ** 20
    print(f"{'config':18s} {'state MiB':>10s} {'activ. MiB':>11s} {'in layers':>10s} {'peak MiB':>9s} {'step s':>7s} "
          f"{'tok/s':>8s}")
    for name, r in rows.items():
        print(f"{name:18s} {r['state'] / mib:10.1f} {r['activations'] / mib:11.1f} {r['in_layers'] / mib:10.1f} "
              f"{r['peak'] / mib:9.1f} {r['step_s']:7.3f} {r['tok_s']:8.0f}")

    def ratio(a: str, b: str, key: str, target: str) -> None:
        if a in rows and b in rows:
            print(f"{key:11s} {a} / {b}: {rows[a][key] / rows[b][key]:.3f}  (target {target})")

    ratio("fsdp", "ddp", "state", "<= 0.55 with 2 ranks" if args.ranks == 2 else "none: one rank holds it all")
    for base in ("fsdp", "ddp"):
        ratio(f"{base}+ac", base, "in_layers", "<= 0.5")
        ratio(f"{base}+ac", base, "activations", "none: the logits are not checkpointed")
        ratio(f"{base}+ac", base, "step_s", "<= 1.4")


if __name__ == "__main__":
    main()
