"""Training speed of alignflow's SFT, DPO and GRPO trainers against TRL's best setting for each:
same model, data and settings, CPU.

Both sides train the same random-weight Hugging Face model (Llama by default, `--arch qwen2`;
`--model-size`, one or more of vs_trl_data.MODEL_SIZES, default `small`: ~22M parameters, 16M of
them the untied 32k-vocabulary embeddings; `large`: ~58M), loaded the same way (`from_pretrained`,
fp32, `attn_implementation="sdpa"`, `config.use_cache=False`), with the same word-level tokenizer,
data, batch size, max length, learning rate (constant), AdamW betas (0.9, 0.95), weight decay 0.01,
clipping at 1.0, seed and number of optimizer steps, fp32 throughout. Each keeps its own AdamW
(alignflow's `configure_optimizer`: foreach on the CPU; TRL: transformers' default
`adamw_torch_fused`), printed. The comparisons (`--only`, comma-separated; default all):

  sft-packed       chat-like data: prompt+completion lengths log-uniform in 16..max_length (seeded), the
                   prompt 1/8..1/2 of it (labels -100 there), the completion ending in EOS. The data
                   reaches TRL already tokenized (input_ids and labels columns), so both pack the same ids.
                   alignflow: `trainers.packing.pack_examples` (best-fit decreasing) + `collate_causal_lm`,
                   `--rows` packed rows per step, the model given position_ids (restarting per example).
                   TRL, two settings, the ratio taken against the faster: `trl` = `packing=True` (strategy
                   "bfd", which turns `padding_free` on): `--rows` packed rows per step flattened into one
                   sequence with position_ids; `trl-acc` = one packed row per forward, `--rows` of them
                   accumulated per step. Both count packed rows of max_length, so a step holds about the
                   same real tokens on both sides.
  sft-padded       the same examples, `--batch` of them a step, each batch right-padded to its longest:
                   alignflow's `collate_causal_lm` vs TRL `packing=False, padding_free=False`.
  dpo-precomputed  pairs sharing a prompt, chosen and rejected lengths log-uniform in 16..dpo_max_length,
                   given to TRL as text ("w17 w3 ...": one word is one token) and tokenised by TRL itself;
                   alignflow gets the same ids (checked against TRL's). Both `DPOTrainer`s with
                   `precompute_ref_log_probs=True` (the one-off scoring pass is not timed), sigmoid loss,
                   `--pairs` pairs per step, chosen and rejected padded to one width and run as one forward.
  dpo-live         the same with a live reference (`precompute_ref_log_probs=False`; both given the same
                   model directory loaded the same way as their reference model).
                   DPO padding-free: TRL is asked for `padding_free=True` in both; TRL 1.16's
                   `DPOTrainer.__init__` sets `self.padding_free = False` whenever it is asked for, with
                   the warning "`padding_free=True` is temporarily unavailable after a refactor and is
                   currently disabled" (trl/trainer/dpo_trainer.py), so padded is TRL's best for DPO; the
                   output says what TRL used.
  grpo-b<beta>     (`--grpo-betas`, default 0 and 0.04) alignflow's `trainers.grpo.GRPOTrainer`, generating
                   through `alignflow.models.generate_text` on the HF model, vs TRL's `GRPOTrainer` with
                   transformers' `generate` (no vLLM): `--prompts` (4) prompts of `--prompt-len` (16)
                   tokens x `--generations` (8) completions x `--new-tokens` (64), temperature 1.0, no
                   top-k/top-p, loss "dapo", scale_rewards "group", epsilon 0.2, one iteration per
                   generation round (TRL: per_device_train_batch_size = prompts x generations, one step per
                   generation), the same reward (the fraction of distinct words of the completion text);
                   beta > 0: each side's live reference from the same directory. Completions are made
                   exactly `--new-tokens` long on both sides, so the work is equal: TRL gets
                   `generation_kwargs={"min_new_tokens": new_tokens}` (transformers sets the EOS logit to
                   -inf until then), alignflow a forward hook on the LM head that sets the EOS logit to
                   -inf while it samples (removed after); both print the completion lengths they made.
                   Reported: optimizer steps/s and each side's generation share (alignflow: the trainer's
                   time/generation_share; TRL: a timer around its `_generate_single_turn`).

Timing: each side runs `--warmup` + `--steps` optimizer steps through its own `train()`; the
clock runs from the end of the last warm-up step to the end of the last step (alignflow: its
`training_step` returning; TRL: `on_step_end`), so data loading, collation, the step and the
library's per-step bookkeeping are all inside. Real tokens are counted from the rows each side's
collator was given for the timed steps (packed rows' lengths; prompt+chosen plus prompt+rejected),
by one function for both sides, not from either library's logging; "positions" is what the
model ran over, padding included. GRPO reports optimizer steps/s instead (each step generates
prompts x generations x new_tokens tokens on both sides).

Without `--rounds` the sides run one after the other in one process. `--rounds N` runs each side
of each (comparison, size) in a fresh process, alignflow and TRL interleaved (the order flips every
round), takes per round alignflow's rate over the fastest TRL setting of that round, and prints
the median of the N paired ratios.

Not equal by design (what each library does, measured as it is): TRL's padding-free SFT
flattens a step's rows into one sequence, so with sdpa its attention (and the block-diagonal
mask transformers builds from position_ids) is quadratic in the whole step's tokens, not in
each row's; flash-attention's varlen kernel, which TRL targets, would not pay that (GPU only).
TRL's LM head is a chunked log-prob kernel: Triton on GPU (only label positions scored); on CPU
a torch-op fallback over every position that recomputes the projection in backward and also
computes entropy, top-1 and (DPO) mean-logit metrics each step. alignflow computes the full
logits, then chunked label log-probs. So CPU ratios say nothing about GPU ones.

Measured (2-core CPU, nothing else running, torch 2.13 CPU, transformers 5.25, TRL 1.16, accelerate
1.16; each side a fresh process, interleaved; 1 warm-up + 4 timed steps; both sides' step-1 and
step-2 losses agree to 4 decimals in every row, and every GRPO completion was 64 tokens on both),
at commit c3c0735 (alignflow's LM head at labelled positions only, trainers/scoring.py, and the
1 MiB log-softmax chunks; the later last-position prefill in generation was not in these runs):

    PYTHONPATH=.:bench /tmp/trl-bench/bin/python bench/vs_trl.py --rounds 3 --model-size small \
        --steps 4 --warmup 1 --threads 2      # 11.6 minutes
    PYTHONPATH=.:bench /tmp/trl-bench/bin/python bench/vs_trl.py --rounds 3 --model-size large \
        --steps 4 --warmup 1 --threads 2      # 19.5 minutes

    alignflow / TRL's best setting, median of 3 paired rounds (each side a fresh process, interleaved; threads 2):
      size   comparison       unit        alignflow   TRL best best TRL setting ratios                   median
      small  sft-packed       tok/s           1,977        786          trl-acc 1.946 2.590 2.187         2.187
      small  sft-padded       tok/s           1,141        444              trl 2.681 2.434 2.576         2.576
      small  dpo-precomputed  tok/s           1,285        334              trl 3.845 4.015 3.981         3.981
      small  dpo-live         tok/s             985        269              trl 3.766 3.590 4.036         3.766
      small  grpo-b0          steps/s         0.519      0.167              trl 3.267 3.119 3.059         3.119
      small  grpo-b0.04       steps/s         0.438      0.155              trl 2.827 2.824 2.781         2.824
      large  sft-packed       tok/s             762        446          trl-acc 1.364 1.969 1.576         1.576
      large  sft-padded       tok/s             429        243              trl 1.619 1.735 1.819         1.735
      large  dpo-precomputed  tok/s             431        172              trl 2.396 2.441 2.897         2.441
      large  dpo-live         tok/s             335        130              trl 2.715 2.577 2.329         2.577
      large  grpo-b0          steps/s         0.212      0.100              trl 2.099 2.117 2.010         2.099
      large  grpo-b0.04       steps/s         0.202      0.102              trl 2.002 1.944 1.988         1.988
      (the large rows: the second command's summary table)

Against the 1.5x target: met by every median on both sizes. The closest is large SFT packed
(1.58x), whose first round was 1.36x: alignflow's rate varied 609-806 tok/s between rounds there,
TRL's best 409-484. Before the labelled-positions head (the same commands, earlier): small 1.55,
1.51, 2.20, 2.07, 1.37, 1.32; large 1.25, 1.21, 1.58, 1.63, 1.30, 1.28 (in the order above; GRPO
then also before the inverse-CDF sampler). SFT packed: TRL's one-row-per-forward + accumulation
(trl-acc) beat its flattened packing=True in every round on both sizes, so it is the reference
there. GRPO generation share of the step: alignflow 42-45% (beta 0) and 36-38% (0.04), TRL 35-37%
and 32-34%; alignflow now also generates faster (small, beta 0: about 0.8 s a step against TRL's
2.1 s), from the sampler's one uniform draw per row instead of torch.multinomial's exponentials.
bench/profile_steps.py says where alignflow's steps go.

Environment (TRL lives only here, never in the project's .venv or pyproject.toml):

    python3 -m venv /tmp/trl-bench && /tmp/trl-bench/bin/pip install torch==2.13.0 -e /work/main trl
    PYTHONPATH=.:bench /tmp/trl-bench/bin/python bench/vs_trl.py [--only sft,dpo,grpo,...] [--steps 8]
        [--warmup 2] [--model-size small,large] [--arch llama|qwen2] [--rows 2] [--batch 4] [--pairs 2]
        [--max-length 1024] [--dpo-max-length 1024] [--grpo-betas 0,0.04] [--prompts 4]
        [--generations 8] [--new-tokens 64] [--vocab 32000] [--lr 1e-5] [--threads N] [--rounds N]

(`torch==2.13.0` makes pip take the CPU build.) `--rounds 3` over the six comparisons on the small
model, 1 warm-up + 4 timed steps: ~16 minutes on 2 idle cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import logging
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference-scoring bar, datasets' map bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# bench/, beside this script: the shared model and data, and the two sides
from vs_trl_data import (MODEL_SIZES, build_tokenizer, dpo_texts, load_model, save_model,  # noqa: E402
                         sft_examples, tokenize_pairs)
from vs_trl_runs import (run_dpo_alignflow, run_dpo_trl, run_grpo_alignflow, run_grpo_trl,  # noqa: E402
                         run_sft_alignflow, run_sft_trl)


# ---- output ----

def table(title: str, results: list) -> None:
    print(f"\n{title}")
    print(f"  {'side':10s} {'steps':>5s} {'real tokens':>12s} {'positions':>10s} {'pad %':>6s} {'seconds':>8s} "
          f"{'real tok/s':>11s}  loss at steps 1, 2")
    for r in results:
        pad = 100.0 * (1 - r.tokens / r.positions) if r.positions else 0.0
        print(f"  {r.side:10s} {r.steps:5d} {r.tokens:12,d} {r.positions:10,d} {pad:6.1f} {r.seconds:8.2f} "
              f"{r.rate:11,.0f}  {', '.join(f'{x:.6f}' for x in r.losses)}")
    ratios(results, "real tok/s")


def grpo_table(title: str, results: list) -> None:
    print(f"\n{title}")
    print(f"  {'side':10s} {'steps':>5s} {'completion tok':>14s} {'seconds':>8s} {'steps/s':>8s} {'gen share':>9s}"
          f"  loss at steps 1, 2")
    for r in results:
        print(f"  {r.side:10s} {r.steps:5d} {r.tokens:14,d} {r.seconds:8.2f} {r.rate:8.3f} "
              f"{r.gen_seconds / r.seconds:9.1%}  {', '.join(f'{x:.6f}' for x in r.losses)}")
    ratios(results, "steps/s")


def ratios(results: list, unit: str) -> None:
    ours, *theirs = results
    for other in theirs:
        print(f"  ratio alignflow / {other.side.replace('trl', 'TRL')} ({unit}) = {ours.rate / other.rate:.3f}")
    if len(theirs) > 1:
        best = max(theirs, key=lambda r: r.rate)
        print(f"  ratio alignflow / TRL's best ({best.side}) = {ours.rate / best.rate:.3f}")


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


# ---- the comparisons: each is alignflow and one or more TRL settings ----

def comparisons(args) -> dict[str, tuple[str, ...]]:
    out = {"sft-packed": ("alignflow", "trl") + (("trl-acc",) if args.rows > 1 else ()),
           "sft-padded": ("alignflow", "trl"),
           "dpo-precomputed": ("alignflow", "trl"),
           "dpo-live": ("alignflow", "trl")}
    for beta in args.grpo_betas:
        out[f"grpo-b{beta:g}"] = ("alignflow", "trl")
    return out


def selected(args) -> list[str]:
    names = list(comparisons(args))
    if not args.only:
        return names
    picked = []
    for want in args.only.split(","):
        hits = [n for n in names if n == want or n.startswith(want + "-")]
        if not hits:
            raise SystemExit(f"--only: unknown comparison {want!r} (one of {', '.join(names)}, or sft, dpo, grpo)")
        picked += [h for h in hits if h not in picked]
    return picked


def sft_data(args, tok) -> list[dict]:
    n = args.warmup + args.steps
    # ~10% more tokens than packed steps need (the emptier packed rows BFD makes last stay
    # unused), and at least the examples padded steps need.
    examples = sft_examples(int(1.1 * n * max(args.rows * args.max_length, args.batch * args.max_length // 2)),
                            args.max_length, args.vocab, tok.eos_token_id, args.seed)
    assert len(examples) >= n * args.batch, "too few SFT examples for the padded steps"
    return examples


def run_side(args, comparison: str, side: str, model_dir: str, tok, tmp: str):
    """One side of one comparison in this process: (result, info lines)."""
    out = os.path.join(tmp, f"{comparison}-{side}")
    if comparison.startswith("sft"):
        examples = sft_data(args, tok)
        packed = comparison == "sft-packed"
        if side == "alignflow":
            result, info = run_sft_alignflow(args, model_dir, examples, tok.pad_token_id, packed=packed)
        else:
            result, info = run_sft_trl(args, model_dir, examples, tok, out, accumulate=side == "trl-acc",
                                       packed=packed)
        if side == "trl-acc":
            result.side = "trl-acc"
        lines = [f"{info['batching']}; model got {describe(info['model_kwargs'])}; {info['optimizer']}"]
    elif comparison.startswith("dpo"):
        n = args.warmup + args.steps
        texts = dpo_texts(n * args.pairs, args.dpo_max_length, args.vocab, args.seed + 1)
        pairs = tokenize_pairs(texts, tok)
        precompute = comparison == "dpo-precomputed"
        if side == "alignflow":
            result, info = run_dpo_alignflow(args, model_dir, pairs, tok.pad_token_id, precompute=precompute)
            lines = [f"collate_pairs; model got {describe(info['model_kwargs'])}; {info['optimizer']}"]
        else:
            import trl

            result, info = run_dpo_trl(args, model_dir, texts, pairs, tok, out, precompute=precompute)
            lines = [f"padding_free=True asked, {info['padding_free']} used"
                     + ("" if info["padding_free"] else
                        f" (TRL {trl.__version__}'s DPOTrainer.__init__ sets self.padding_free = False whenever "
                        "it is asked for: 'temporarily unavailable after a refactor')")
                     + f"; model got {describe(info['model_kwargs'])}; {info['optimizer']}"]
    else:
        beta = float(comparison.removeprefix("grpo-b"))
        if side == "alignflow":
            result, info = run_grpo_alignflow(args, model_dir, tok, beta)
            lines = [f"generate_text (EOS logit -inf while sampling); {info['lengths']}; {info['optimizer']}"]
        else:
            result, info = run_grpo_trl(args, model_dir, tok, out, beta)
            lines = [f"transformers generate, min_new_tokens={args.new_tokens}; reference "
                     f"{info['ref_model']}; {info['optimizer']}"]
    return result, lines


def setup_line(args, comparison: str) -> str:
    if comparison == "sft-packed":
        return (f"SFT packed: {args.rows} packed rows of <= {args.max_length} tokens a step on both sides; "
                "trl = packing=True (bfd, padding_free: a step's rows flattened into one sequence), trl-acc = one "
                f"packed row per forward x {args.rows} accumulated")
    if comparison == "sft-padded":
        return (f"SFT padded: {args.batch} examples a step, each batch padded to its longest, no packing "
                "(TRL packing=False, padding_free=False)")
    if comparison.startswith("dpo"):
        ref = ("precompute_ref_log_probs=True on both sides (the scoring pass is not timed)"
               if comparison == "dpo-precomputed" else
               "live reference (precompute_ref_log_probs=False; the same model directory loaded as the reference)")
        return (f"DPO: {args.pairs} pairs/step (chosen and rejected in one forward), lengths log-uniform "
                f"16..{args.dpo_max_length}, beta {args.beta}, sigmoid, {ref}")
    beta = float(comparison.removeprefix("grpo-b"))
    return (f"GRPO beta={beta:g}: {args.prompts} prompts x {args.generations} generations x {args.new_tokens} new "
            f"tokens (every completion exactly {args.new_tokens}: EOS never sampled), prompt {args.prompt_len} "
            "tokens, temperature 1.0, no top-k/top-p, loss dapo, scale_rewards group, epsilon 0.2, one iteration "
            "per generation round, reward = fraction of distinct words in the completion"
            + ("" if beta == 0 else "; reference model live (same directory)"))


def describe(kwargs: dict) -> str:
    keys = [f"{k}{list(v) if isinstance(v, tuple) else ''}" for k, v in kwargs.items()
            if k in ("input_ids", "attention_mask", "position_ids") and v is not None]
    return ", ".join(keys) if keys else "(none)"


def model_line(args, size: str, model_dir: str) -> str:
    probe = load_model(model_dir)
    hidden, inter, layers, heads, kv = MODEL_SIZES[size]
    return (f"model: {type(probe).__name__} '{size}' ({probe.num_parameters() / 1e6:.1f}M parameters: hidden "
            f"{hidden}, intermediate {inter}, {layers} layers, {heads}/{kv} heads, vocab {args.vocab}, "
            f"tied={probe.config.tie_word_embeddings}), sdpa, use_cache=False; lr {args.lr} constant, AdamW "
            f"(0.9, 0.95), weight decay 0.01, clip 1.0; {args.warmup} warm-up + {args.steps} timed steps per side")


# ---- modes ----

def in_process(args, tok, tmp: str) -> None:
    """Every side of every comparison in this one process, one after the other."""
    for size in args.sizes:
        model_dir = os.path.join(tmp, f"model-{size}")
        save_model(args.arch, size, args.vocab, max(args.max_length, args.dpo_max_length, 256), tok, model_dir,
                   args.seed)
        print(f"\n{model_line(args, size, model_dir)}")
        for comparison in selected(args):
            print(f"\n{setup_line(args, comparison)}")
            results = []
            for side in comparisons(args)[comparison]:
                result, lines = run_side(args, comparison, side, model_dir, tok, tmp)
                results.append(result)
                for line in lines:
                    print(f"  {side + ':':10s} {line}")
            (grpo_table if comparison.startswith("grpo") else table)(f"{comparison} ({size})", results)
    print("\n(one run, sides one after the other; --rounds N runs each side in a fresh process, interleaved)")


def one_side(args, tok, tmp: str) -> None:
    """--side: one side of one comparison, its result as one JSON line (for --rounds)."""
    result, lines = run_side(args, args.only, args.side, args.model_dir, tok, tmp)
    print("RESULT " + json.dumps({"side": result.side, "rate": result.rate, "seconds": result.seconds,
                                  "steps": result.steps, "tokens": result.tokens,
                                  "gen_seconds": getattr(result, "gen_seconds", None),
                                  "losses": result.losses, "lines": lines}), flush=True)


def rounds(args, tok, tmp: str, argv: list[str]) -> None:
    """Each side of each (comparison, size) in a fresh process, alignflow and TRL interleaved (the
    order flips every round); the ratio of each round is alignflow over the fastest TRL setting
    of that round; the median of the rounds' ratios is printed."""
    passthrough = strip(argv, {"--rounds", "--model-size", "--only", "--side", "--model-dir"})
    rows = []
    for size in args.sizes:
        model_dir = os.path.join(tmp, f"model-{size}")
        save_model(args.arch, size, args.vocab, max(args.max_length, args.dpo_max_length, 256), tok, model_dir,
                   args.seed)
        print(f"\n{model_line(args, size, model_dir)}", flush=True)
        for comparison in selected(args):
            sides = comparisons(args)[comparison]
            print(f"\n{setup_line(args, comparison)}", flush=True)
            per_round = []
            for r in range(args.rounds):
                got = {}
                for side in (sides if r % 2 == 0 else tuple(reversed(sides))):
                    cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--only", comparison,
                           "--side", side, "--model-dir", model_dir, "--model-size", size]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if proc.returncode or not line:
                        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                    got[side] = json.loads(line[0][len("RESULT "):])
                    if r == 0:
                        print(f"  {side + ':':10s} {'; '.join(got[side]['lines'])}", flush=True)
                best = max((s for s in sides if s != "alignflow"), key=lambda s: got[s]["rate"])
                per_round.append((got, best, got["alignflow"]["rate"] / got[best]["rate"]))
                unit = "steps/s" if comparison.startswith("grpo") else "real tok/s"
                print(f"  round {r + 1}: " + ", ".join(f"{s} {got[s]['rate']:,.3f}" if unit == "steps/s" else
                                                      f"{s} {got[s]['rate']:,.0f}" for s in sides)
                      + f" {unit}" + "".join(f", {s} gen share {got[s]['gen_seconds'] / got[s]['seconds']:.0%}"
                                             for s in sides if got[s]["gen_seconds"])
                      + f"; losses {' / '.join(', '.join(f'{x:.4f}' for x in got[s]['losses']) for s in sides)}"
                      + f"; ratio vs {best} {per_round[-1][2]:.3f}", flush=True)
            rows.append((size, comparison, per_round))
            print(f"  {size} {comparison}: median ratio alignflow / TRL's best over {len(per_round)} rounds = "
                  f"{statistics.median(x for _, _, x in per_round):.3f}", flush=True)
    print(f"\nalignflow / TRL's best setting, median of {args.rounds} paired rounds (each side a fresh process, "
          f"interleaved; threads {torch.get_num_threads()}):")
    print(f"  {'size':6s} {'comparison':16s} {'unit':10s} {'alignflow':>10s} {'TRL best':>10s} {'best TRL setting':>16s} "
          f"{'ratios':24s} {'median':>6s}")
    for size, comparison, per_round in rows:
        unit = "steps/s" if comparison.startswith("grpo") else "tok/s"
        fmt = (lambda x: f"{x:.3f}") if unit == "steps/s" else (lambda x: f"{x:,.0f}")
        ours = statistics.median(g["alignflow"]["rate"] for g, _, _ in per_round)
        theirs = statistics.median(g[b]["rate"] for g, b, _ in per_round)
        bests = sorted({b for _, b, _ in per_round})
        print(f"  {size:6s} {comparison:16s} {unit:10s} {fmt(ours):>10s} {fmt(theirs):>10s} {'/'.join(bests):>16s} "
              f"{' '.join(f'{x:.3f}' for _, _, x in per_round):24s} {statistics.median(x for _, _, x in per_round):6.3f}")


def strip(argv: list[str], names: set[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=")[0] in names:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated comparisons: sft-packed, sft-padded, dpo-precomputed, dpo-live, "
                                   "grpo-b<beta>, or sft, dpo, grpo for both of a kind (default: all)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (at least 1)")
    ap.add_argument("--model-size", default="small", help=f"one or more of {', '.join(MODEL_SIZES)}, comma-separated")
    ap.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=2, help="SFT packed: packed rows of max_length per step (both sides)")
    ap.add_argument("--batch", type=int, default=4, help="SFT padded: examples per step (both sides)")
    ap.add_argument("--pairs", type=int, default=2, help="DPO: preference pairs per step (both sides)")
    ap.add_argument("--max-length", type=int, default=1024, help="SFT max length (packed row length)")
    ap.add_argument("--dpo-max-length", type=int, default=1024, help="DPO: longest prompt+completion")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    ap.add_argument("--grpo-betas", default="0,0.04", help="GRPO: KL coefficients, one comparison each")
    ap.add_argument("--prompts", type=int, default=4, help="GRPO: prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="GRPO: completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="GRPO: max_completion_length (all of it generated)")
    ap.add_argument("--prompt-len", type=int, default=16, help="GRPO: prompt tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rounds", type=int, help="each side in a fresh process, interleaved, N paired rounds; "
                                               "prints the median of the rounds' ratios")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # --rounds' child: one side of one comparison
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    args.sizes = args.model_size.split(",")
    if any(s not in MODEL_SIZES for s in args.sizes):
        ap.error(f"--model-size: one or more of {', '.join(MODEL_SIZES)}")
    args.grpo_betas = [float(b) for b in args.grpo_betas.split(",")]
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
    tok = build_tokenizer(args.vocab)
    if not args.side:
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
              f"accelerate {accelerate.__version__}, datasets {datasets.__version__}; cpu, "
              f"threads {torch.get_num_threads()}, fp32")
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp, quiet():
        if args.side:
            one_side(args, tok, tmp)
        elif args.rounds:
            rounds(args, tok, tmp, sys.argv[1:])
        else:
            in_process(args, tok, tmp)


if __name__ == "__main__":
    main()
