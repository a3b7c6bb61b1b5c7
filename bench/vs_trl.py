"""Training tokens/s of alignflow's SFT and DPO trainers against TRL's: same model, data and settings, CPU.

Both sides train the same random-weight Hugging Face model (Llama by default, `--arch qwen2`;
`--model-size`, default `small`: ~22M parameters, 16M of them the untied 32k-vocabulary
embeddings), loaded the same way (`from_pretrained`, fp32, `attn_implementation="sdpa"`,
`config.use_cache=False`), with the same word-level tokenizer, data, batch size, max length,
learning rate (constant), AdamW betas (0.9, 0.95), weight decay 0.01, clipping at 1.0, seed and
number of optimizer steps, fp32 throughout. Each keeps its own AdamW kernel (alignflow's
`configure_optimizer`: foreach; TRL: transformers' default `adamw_torch_fused`), printed.

  sft  chat-like data: prompt+completion lengths log-uniform in 16..max_length (seeded), the
       prompt 1/8..1/2 of it (labels -100 there), the completion ending in EOS. The data
       reaches TRL already tokenized (input_ids and labels columns), so both pack the same ids.
       alignflow: `trainers.packing.pack_examples` (best-fit decreasing) + `trainers.sft.collate_causal_lm`,
       `--rows` packed rows per step, the model given position_ids (restarting per example).
       TRL: `SFTTrainer(packing=True)` (strategy "bfd", best-fit decreasing, which turns
       `padding_free` on whatever it is set to): `--rows` packed rows per step, flattened into
       one sequence with position_ids. Both count packed rows of max_length, so a step holds
       about the same real tokens on both sides. `--trl-accumulate` adds a TRL row that takes
       one packed row per forward and accumulates `--rows` of them per step.
  dpo  pairs sharing a prompt, chosen and rejected lengths log-uniform in 16..dpo_max_length,
       given to TRL as text ("w17 w3 ...": one word is one token) and tokenised by TRL itself;
       alignflow gets the same ids (checked against TRL's). Both `DPOTrainer`s with
       `precompute_ref_log_probs=True` (the one-off scoring pass is not timed), sigmoid loss,
       `--pairs` pairs per step, chosen and rejected padded to one width and run as one forward.
       TRL is asked for `padding_free=True`; the output says whether it used it (TRL 1.16
       turns it off for DPO: "temporarily unavailable after a refactor").

Timing: each side runs `--warmup` + `--steps` optimizer steps through its own `train()`; the
clock runs from the end of the last warm-up step to the end of the last step (alignflow: its
`training_step` returning; TRL: `on_step_end`), so data loading, collation, the step and the
library's per-step bookkeeping are all inside. Real tokens are counted from the rows each side's
collator was given for the timed steps (packed rows' lengths; prompt+chosen plus prompt+rejected),
by one function for both sides, not from either library's logging; "positions" is what the
model ran over, padding included. The sides run one after the other, not interleaved: on a
shared machine run it more than once (and try --threads 1).

Not equal by design (what each library does, measured as it is): TRL's padding-free SFT
flattens a step's rows into one sequence, so with sdpa its attention (and the block-diagonal
mask transformers builds from position_ids) is quadratic in the whole step's tokens, not in
each row's; flash-attention's varlen kernel, which TRL targets, would not pay that (GPU only).
TRL's LM head is a chunked log-prob kernel: Triton on GPU (only label positions scored); on CPU
a torch-op fallback over every position that recomputes the projection in backward and also
computes entropy, top-1 and (DPO) mean-logit metrics each step. alignflow computes the full
logits, then chunked label log-probs. So CPU ratios say nothing about GPU ones.

Environment (TRL lives only here, never in the project's .venv or pyproject.toml):

    python3 -m venv /tmp/trl-bench && /tmp/trl-bench/bin/pip install torch==2.13.0 -e /work/main trl
    /tmp/trl-bench/bin/python bench/vs_trl.py [--only sft|dpo] [--steps 8] [--warmup 2]
        [--model-size tiny|small|medium|large] [--arch llama|qwen2] [--rows 2] [--pairs 2]
        [--max-length 1024] [--dpo-max-length 1024] [--vocab 32000] [--lr 1e-5] [--threads N]
        [--trl-accumulate]

(`torch==2.13.0` makes pip take the CPU build.) Default size: ~3 minutes on 2 idle cores.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference-scoring bar, datasets' map bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# bench/, beside this script: the shared model and data, and the two sides
from vs_trl_data import (MODEL_SIZES, Result, build_tokenizer, dpo_texts, load_model, save_model,  # noqa: E402
                         sft_examples, tokenize_pairs)
from vs_trl_runs import run_dpo_alignflow, run_dpo_trl, run_sft_alignflow, run_sft_trl  # noqa: E402


# ---- output ----

def table(title: str, results: list[Result]) -> None:
    print(f"\n{title}")
    print(f"  {'side':10s} {'steps':>5s} {'real tokens':>12s} {'positions':>10s} {'pad %':>6s} {'seconds':>8s} "
          f"{'real tok/s':>11s}  loss at steps 1, 2")
    for r in results:
        pad = 100.0 * (1 - r.tokens / r.positions) if r.positions else 0.0
        print(f"  {r.side:10s} {r.steps:5d} {r.tokens:12,d} {r.positions:10,d} {pad:6.1f} {r.seconds:8.2f} "
              f"{r.rate:11,.0f}  {', '.join(f'{x:.6f}' for x in r.losses)}")
    ours, *theirs = results
    for other in theirs:
        print(f"  ratio alignflow / {other.side.replace('trl', 'TRL')} (real tok/s) = {ours.rate / other.rate:.3f}")


@contextlib.contextmanager
def quiet():
    """TRL and transformers warn about CPU, padding-free without flash attention and so on:
    the settings lines below say what matters."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    trl_logger = logging.getLogger("trl")
    trl_level = trl_logger.level
    trl_logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            trl_logger.setLevel(trl_level)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("sft", "dpo"), help="run one comparison (default: both)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (at least 1)")
    ap.add_argument("--model-size", choices=tuple(MODEL_SIZES), default="small")
    ap.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=2, help="SFT: packed rows of max_length per step (both sides)")
    ap.add_argument("--pairs", type=int, default=2, help="DPO: preference pairs per step (both sides)")
    ap.add_argument("--max-length", type=int, default=1024, help="SFT max length (packed row length)")
    ap.add_argument("--dpo-max-length", type=int, default=1024, help="DPO: longest prompt+completion")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--trl-accumulate", action="store_true",
                    help="SFT: also time TRL with one packed row per forward and --rows of them accumulated "
                         "per step (no flattening of rows into one sequence)")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        import trl
    except ImportError:
        sys.exit("bench/vs_trl.py needs TRL in its own environment; see the docstring:\n"
                 "  python3 -m venv /tmp/trl-bench && /tmp/trl-bench/bin/pip install torch==2.13.0 -e /work/main trl")
    import accelerate
    import datasets
    import transformers

    datasets.disable_progress_bars()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"accelerate {accelerate.__version__}, datasets {datasets.__version__}; cpu, "
          f"threads {torch.get_num_threads()}, fp32")

    tok = build_tokenizer(args.vocab)
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp, quiet():
        model_dir = os.path.join(tmp, "model")
        save_model(args.arch, args.model_size, args.vocab, max(args.max_length, args.dpo_max_length), tok,
                   model_dir, args.seed)
        probe = load_model(model_dir)
        hidden, inter, layers, heads, kv = MODEL_SIZES[args.model_size]
        print(f"model: {type(probe).__name__} '{args.model_size}' ({probe.num_parameters() / 1e6:.1f}M parameters: "
              f"hidden {hidden}, intermediate {inter}, {layers} layers, {heads}/{kv} heads, vocab {args.vocab}, "
              f"tied={probe.config.tie_word_embeddings}), sdpa, use_cache=False; lr {args.lr} constant, AdamW "
              f"(0.9, 0.95), weight decay 0.01, clip 1.0; {args.warmup} warm-up + {args.steps} timed steps per side")
        del probe
        n = args.warmup + args.steps

        if args.only in (None, "sft"):
            # ~10% more tokens than the steps need, so the emptier packed rows BFD makes last stay unused.
            examples = sft_examples(int(1.1 * n * args.rows * args.max_length), args.max_length, args.vocab,
                                    tok.eos_token_id, args.seed)
            lengths = [len(x["input_ids"]) for x in examples]
            median = sorted(lengths)[len(lengths) // 2]
            print(f"\nSFT data: {len(examples)} examples, {sum(lengths):,} tokens, length log-uniform "
                  f"16..{args.max_length} (mean {sum(lengths) / len(lengths):.0f}, median {median}), "
                  f"prompt 1/8..1/2 of each (no loss there)")
            ours, ours_info = run_sft_alignflow(args, model_dir, examples, tok.pad_token_id)
            theirs, theirs_info = run_sft_trl(args, model_dir, examples, tok, os.path.join(tmp, "trl-sft"))
            extra = []
            if args.trl_accumulate and args.rows > 1:
                extra = [run_sft_trl(args, model_dir, examples, tok, os.path.join(tmp, "trl-sft-acc"), True)]
            print(f"  alignflow: {ours_info['batching']}; model got {describe(ours_info['model_kwargs'])}; "
                  f"{ours_info['optimizer']}")
            if "position_ids" not in ours_info["model_kwargs"]:
                print("  WARNING: SFTTrainer did not pass position_ids: packed examples attended across their "
                      "boundaries (the timing holds, the training would be wrong)")
            for result, info in [(theirs, theirs_info)] + extra:
                print(f"  {result.side + ':':10s} {info['batching']}; model got {describe(info['model_kwargs'])}; "
                      f"{info['optimizer']}")
            print(f"  batch size: {args.rows} packed rows of <= {args.max_length} tokens a step on both sides "
                  "(both count packed rows, so a step holds about the same real tokens)")
            table(f"SFT: alignflow packed vs TRL "
                  f"packing=True (bfd), padding_free={theirs_info['padding_free']}",
                  [ours, theirs] + [result for result, _ in extra])

        if args.only in (None, "dpo"):
            texts = dpo_texts(n * args.pairs, args.dpo_max_length, args.vocab, args.seed + 1)
            pairs = tokenize_pairs(texts, tok)
            seqs = [len(p["prompt_ids"]) + len(p[f"{s}_ids"]) for p in pairs for s in ("chosen", "rejected")]
            print(f"\nDPO data: {len(pairs)} pairs, sequence lengths log-uniform 16..{args.dpo_max_length} "
                  f"(mean {sum(seqs) / len(seqs):.0f}); {args.pairs} pairs/step on both sides "
                  f"(chosen and rejected in one forward), beta {args.beta}, sigmoid, "
                  f"precompute_ref_log_probs=True on both sides (the scoring pass is not timed)")
            ours, ours_info = run_dpo_alignflow(args, model_dir, pairs, tok.pad_token_id)
            theirs, theirs_info = run_dpo_trl(args, model_dir, texts, pairs, tok, os.path.join(tmp, "trl-dpo"))
            print(f"  alignflow: collate_pairs; model got {describe(ours_info['model_kwargs'])}; "
                  f"{ours_info['optimizer']}")
            print(f"  trl:       padding_free=True asked, {theirs_info['padding_free']} used"
                  + ("" if theirs_info["padding_free"] else
                     f" (TRL {trl.__version__}'s DPOTrainer turns it off: 'temporarily unavailable')")
                  + f"; model got {describe(theirs_info['model_kwargs'])}; {theirs_info['optimizer']}")
            table(f"DPO: alignflow vs TRL (padding_free={theirs_info['padding_free']})", [ours, theirs])
    print("\n(one run, sides one after the other; on a shared machine compare several runs)")


def describe(kwargs: dict) -> str:
    keys = [f"{k}{list(v) if isinstance(v, tuple) else ''}" for k, v in kwargs.items()
            if k in ("input_ids", "attention_mask", "position_ids") and v is not None]
    return ", ".join(keys) if keys else "(none)"


if __name__ == "__main__":
    main()
