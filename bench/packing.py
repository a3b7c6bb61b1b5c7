"""SFT throughput with packing (sft.data.packing) versus padded batches, in one run.

    python bench/packing.py [--model builtin|hf] [--examples 96] [--device cuda] [--precision bf16]

The same examples, lengths log-uniform in 16..1024 like chat data, trained for one pass each
way by SFTTrainer: padded batches of `--batch` examples (each padded to its batch's longest),
and packed rows of 1024 tokens (best-fit decreasing), `--rows` rows per step. Real (non-pad)
tokens per second of each; the ratio packed / padded. `--model hf` runs the same shape as a
transformers LlamaForCausalLM (sdpa, loaded as the pipeline loads one), which builds its own
block mask from the position ids.
Target (issue: lean training): packed / padded >= 2 on CPU."""
from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from alignflow.models import LlamaForCausalLM, get_preset, load_model, save_pretrained  # noqa: E402
from alignflow.trainers import SFTTrainer, configure_optimizer  # noqa: E402
from alignflow.trainers.packing import pack_examples  # noqa: E402
from alignflow.trainers.sft import collate_causal_lm  # noqa: E402

MAX_LEN = 1024


def chat_like(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Lengths log-uniform in 16..1024; the first quarter (at least 4 tokens) is the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(math.exp(math.log(16) + torch.rand((), generator=g).item() * math.log(MAX_LEN / 16)))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = max(4, length // 4)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def build_model(kind: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = get_preset("tiny", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                        max_position_embeddings=MAX_LEN)
    model = LlamaForCausalLM(config)
    if kind == "builtin":
        return model
    with tempfile.TemporaryDirectory() as tmp:  # as the pipeline loads a Hugging Face model
        save_pretrained(model, tmp)
        return load_model(tmp, attn_implementation="sdpa")


def one_pass(kind: str, items: list[dict], collate, batch_size: int, args) -> tuple[float, int]:
    """(seconds, real tokens) of one epoch over `items`, after one untimed warm-up step."""
    device = torch.device(args.device)
    model = build_model(kind, args)
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, collate_fn=lambda b: collate(b, 0))
    trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model, lr=1e-4), train_loader=loader,
                         device=device, max_epochs=1, precision=args.precision, progress_bar=False,
                         log_interval=10 ** 6)
    batches = list(loader)
    trainer.training_step(batches[:1])  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = 0
    for batch in batches:
        tokens += int(trainer.training_step([batch])["tokens"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["builtin", "hf"], default="builtin")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="examples per padded batch")
    ap.add_argument("--rows", type=int, default=2, help="packed rows per step")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    examples = chat_like(args.examples, args.vocab)
    rows = pack_examples(examples, MAX_LEN)
    real = sum(len(e["input_ids"]) for e in examples)
    padded_slots = sum(max(len(e["input_ids"]) for e in examples[i:i + args.batch]) * len(examples[i:i + args.batch])
                       for i in range(0, len(examples), args.batch))
    packed_slots = sum(max(len(r["input_ids"]) for r in rows[i:i + args.rows]) * len(rows[i:i + args.rows])
                       for i in range(0, len(rows), args.rows))
    print(f"{args.examples} examples, {real:,} real tokens (mean length {real / len(examples):.0f}); "
          f"{args.model} model, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.device}, "
          f"{args.precision}")
    print(f"padded: batches of {args.batch} examples, {padded_slots:,} token slots ({real / padded_slots:.0%} real)")
    print(f"packed: {len(rows)} rows of <= {MAX_LEN}, {args.rows} per step, {packed_slots:,} token slots "
          f"({real / packed_slots:.0%} real)")
    results = {}
    for name, items, collate, size in (("padded", examples, collate_causal_lm, args.batch),
                                       ("packed", rows, collate_causal_lm, args.rows)):
        seconds, tokens = one_pass(args.model, items, collate, size, args)
        assert tokens == real, (name, tokens, real)
        results[name] = real / seconds
        print(f"{name:>7}: {seconds:7.2f} s  {results[name]:10,.0f} real tok/s")
    print(f"packed / padded real-token throughput: {results['packed'] / results['padded']:.2f}x (target >= 2)")


if __name__ == "__main__":
    main()
