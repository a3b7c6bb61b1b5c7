"""Memory of one DPO step: LoRA (the reference is the policy with its adapter off) versus full
fine-tuning with a live reference model (a second copy), in one run.

    python bench/lora_memory.py [--device cuda] [--hidden 512] [--layers 8] [--vocab 32000]
                                [--pairs 2] [--seq 256] [--r 16] [--precision fp32|bf16]

Each configuration runs in a process of its own: two optimizer steps of DPOTrainer (AdamW,
reference log-probs not precomputed, so the reference runs every step), the second measured.
On CUDA: the allocator's peak over the whole run. On the CPU, where the allocator's peak is not
visible, the bytes the step needs, counted: weights (the policy's and the reference's, each
storage once), gradients, optimizer state, and the activations the forward keeps for backward
(parameters saved for backward are not counted twice); each process's peak RSS above what it
held before building the model is printed too.
With bitsandbytes installed a third configuration, qlora, runs the same model as a transformers
Llama with its linear layers in 4-bit NF4 (lora.quantize: 4bit).
Target (issue: lean training): LoRA / full <= 0.55."""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile

import torch

from alignflow.models import LlamaForCausalLM, get_preset, load_model, save_pretrained  # noqa: E402
from alignflow.models.lora import add_adapter  # noqa: E402
from alignflow.trainers import DPOTrainer, configure_optimizer  # noqa: E402
from alignflow.trainers.dpo import collate_pairs  # noqa: E402
from alignflow.trainers.reference import AdapterDisabled  # noqa: E402
from logprob_memory import pairs  # noqa: E402  (bench/, beside this script)
from step_memory import nbytes  # noqa: E402

CONFIGS = ("full", "lora")


def current_rss() -> int:
    """This process's resident memory now (Linux), to subtract the interpreter and libraries."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(config: str, args) -> dict:
    import peft  # noqa: F401  (imported by both configurations, so both baselines hold it)

    baseline = current_rss()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model_config = get_preset("tiny", vocab_size=args.vocab, hidden_size=args.hidden,
                              intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                              num_attention_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq)
    policy = LlamaForCausalLM(model_config)
    if config == "qlora":  # the same weights as a transformers model, its linear layers in 4 bits
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(policy, tmp)
            dtype = "bfloat16" if args.precision == "bf16" else "float32"
            policy = load_model(tmp, device=device, dtype=dtype, quantize="4bit")
    if config in ("lora", "qlora"):
        policy = add_adapter(policy, r=args.r, alpha=2.0 * args.r)
        reference = AdapterDisabled(policy)
    else:
        reference = LlamaForCausalLM(model_config)
        reference.load_state_dict(policy.state_dict())
    batch = collate_pairs(pairs(args.pairs, args.seq, args.vocab), pad_id=0)
    trainer = DPOTrainer(policy, reference, configure_optimizer(policy, lr=1e-5), [batch, batch], device=device,
                         max_steps=2, precompute_ref_log_probs=False, precision=args.precision, progress_bar=False)
    trainer.training_step([batch])  # the optimizer state exists from here on
    kept = []

    def pack(t):
        kept.append(t)
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.training_step([batch])
    params = list(policy.parameters()) + list(trainer.reference.model().parameters())
    weights = nbytes(params)
    param_ptrs = {p.data_ptr() for p in params}
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    result = {"weights": weights, "gradients": nbytes(trained), "optimizer": nbytes(optimizer),
              "activations": nbytes(t for t in kept if t.data_ptr() not in param_ptrs),
              "trained_parameters": sum(p.numel() for p in trained),
              "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline}
    result["counted"] = sum(result[k] for k in ("weights", "gradients", "optimizer", "activations"))
    if device.type == "cuda":
        result["peak"] = torch.cuda.max_memory_allocated(device)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--config", choices=CONFIGS + ("qlora",), help=argparse.SUPPRESS)  # one configuration, as a child
    args = ap.parse_args()
    if args.config:
        print(json.dumps(measure(args.config, args)))
        return

    results = {}
    configs = CONFIGS + (("qlora",) if importlib.util.find_spec("bitsandbytes") else ())
    for config in configs:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--config", config], capture_output=True,
                             text=True, check=True)
        results[config] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2 ** 20
    key = "peak" if args.device.startswith("cuda") else "counted"
    print(f"DPO step, built-in model hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.pairs} pairs x {args.seq} tokens, {args.precision}, {args.device}; LoRA r={args.r} on every "
          "linear layer but the head; reference run live every step")
    peak_column = f" {'peak':>8}" if key == "peak" else ""
    print(f"{'':>6} {'trained':>12} {'weights':>9} {'grads':>9} {'optim':>9} {'activ.':>9} {'counted':>9}"
          f"{peak_column} {'RSS':>9}   (MiB)")
    for config, r in results.items():
        peak = f" {r['peak'] / mib:8.0f}" if key == "peak" else ""
        print(f"{config:>6} {r['trained_parameters']:>12,} {r['weights'] / mib:9.0f} {r['gradients'] / mib:9.0f} "
              f"{r['optimizer'] / mib:9.0f} {r['activations'] / mib:9.0f} {r['counted'] / mib:9.0f}{peak} "
              f"{r['rss'] / mib:9.0f}")
    for config in results:
        if config != "full":
            print(f"{config} / full ({key}): {results[config][key] / results['full'][key]:.3f}"
                  f"{' (target <= 0.55)' if config == 'lora' else ''}; peak RSS above baseline: "
                  f"{results[config]['rss'] / results['full']['rss']:.3f}")


if __name__ == "__main__":
    main()
