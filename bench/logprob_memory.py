"""Memory of one DPO step with label log-probs taken as the trainers take them (the head at
labelled positions only, trainers/scoring.py; the log-softmax chunk by chunk, trainers/logprobs.py)
versus the full logits' fp32 log-softmax, at vocabularies of 32k and 152k, in one run.

    python bench/logprob_memory.py [--device cuda] [--pairs 4] [--seq 512] [--hidden 256]

A small built-in model (2 layers) so the vocabulary-sized tensors dominate, bf16 autocast, the
reference log-probs precomputed (the step runs the policy only). Per vocabulary and method:
on CUDA the allocator's peak during the step above what was allocated before it; on the CPU
the bytes autograd keeps for backward (the allocator's peak is not visible there).
Target (issue: lean training): chunked / full <= 0.5."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from alignflow.models import LlamaForCausalLM, get_preset  # noqa: E402
from alignflow.trainers import configure_optimizer, logits_of, logprobs, scoring  # noqa: E402
from alignflow.trainers.dpo import DPOTrainer, collate_pairs  # noqa: E402

CHUNKED = scoring.label_logps


def full_label_logps(model, labels, temperature=1.0, with_entropy=False, **inputs):
    """The plain way: every position's logits, then cross entropy over an fp32 copy of them all."""
    logits = logits_of(model(**inputs))
    nll = F.cross_entropy((logits.float() / temperature).flatten(0, 1), labels.flatten(),
                          ignore_index=logprobs.IGNORE_INDEX, reduction="none")
    return -nll.view(labels.shape), None


def pairs(n: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        pair = {}
        for side in ("chosen", "rejected"):
            ids = torch.randint(3, vocab, (seq,), generator=g)
            labels = ids.clone()
            labels[: seq // 4] = -100  # the prompt
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, labels
        out.append(pair)
    return out


def step_memory(vocab: int, args, method) -> int:
    scoring.label_logps = method  # label_sequence_logps looks it up when called
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = LlamaForCausalLM(get_preset("tiny", vocab_size=vocab, hidden_size=args.hidden,
                                        intermediate_size=4 * args.hidden, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=args.seq))
    ref = LlamaForCausalLM(model.config)
    ref.load_state_dict(model.state_dict())
    batch = collate_pairs(pairs(args.pairs, args.seq, vocab), pad_id=0)
    trainer = DPOTrainer(model=model, ref_model=ref, optimizer=configure_optimizer(model, lr=1e-5),
                         train_loader=[batch], precision="bf16", device=device, max_steps=1, progress_bar=False)
    trainer.precompute_reference_logps()
    trainer.ref_model.to("meta")  # the step runs the policy only: leave the reference out of the peak
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.training_step([batch])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer.autocast():
        trainer.compute_loss(trainer.model, trainer.to_device(batch))
    return sum(kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    what = "peak above start (CUDA)" if args.device.startswith("cuda") else "bytes kept for backward (CPU)"
    print(f"DPO step, {args.pairs} pairs x {args.seq} tokens, hidden {args.hidden}, bf16; {what}")
    for vocab in (32000, 151936):
        full = step_memory(vocab, args, full_label_logps)
        chunked = step_memory(vocab, args, CHUNKED)
        print(f"vocab {vocab:>6}: full {full / 2**20:8.1f} MiB, chunked {chunked / 2**20:8.1f} MiB, "
              f"chunked / full {chunked / full:.3f}  (target <= 0.5)")
    scoring.label_logps = CHUNKED


if __name__ == "__main__":
    main()
