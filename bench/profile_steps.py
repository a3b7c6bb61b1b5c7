"""Where one optimizer step of each alignflow trainer spends its time on CPU: the steps
bench/vs_trl.py times (same model, data and settings), split by timers into

  data/collate     the DataLoader's next batch (collation included)
  generation       GRPO: generate_text (the sampling loop, its forwards included)
  reward           GRPO: the reward function
  reference fwd    the reference model's forwards (DPO live, GRPO beta > 0)
  policy fwd       the policy's training forwards (the model's own forward: logits included)
  log-prob + loss  the trainer's compute_loss minus the forward inside it (label log-probs, the loss)
  backward         Tensor.backward
  optimizer        optimizer.step
  other            the rest of the step: zero_grad, clipping, metrics, bookkeeping; GRPO's
                   rollout assembly, advantages and the reference's log-probs from its logits

Each region counts its own time only (a forward inside generation is generation's), so the
columns add up to the step. Then, with `--ops`, torch.profiler's top operators (self CPU) over
one more step of each.

    PYTHONPATH=.:bench python bench/profile_steps.py [--model-size small] [--threads 2] [--steps 2]
        [--only sft-padded,sft-packed,dpo-precomputed,dpo-live,grpo] [--ops]

Runs in the project's venv (no TRL).

Measured (2-core CPU, nothing else running, torch 2.13 CPU, transformers 5.24):

    PYTHONPATH=.:bench .venv/bin/python bench/profile_steps.py --model-size small --threads 2 --ops --ops-rows 6

    alignflow step time by region, model 'small', threads 2, mean of 2 steps after 1 warm-up (share of the step)
      region                      sft-padded            sft-packed       dpo-precomputed                  grpo
      data/collate            0.000 s (  0%)        0.001 s (  0%)        0.000 s (  0%)        0.000 s (  0%)
      generation              0.000 s (  0%)        0.000 s (  0%)        0.000 s (  0%)        0.894 s ( 38%)
      reward                  0.000 s (  0%)        0.000 s (  0%)        0.000 s (  0%)        0.000 s (  0%)
      reference fwd           0.000 s (  0%)        0.000 s (  0%)        0.000 s (  0%)        0.276 s ( 12%)
      policy fwd              0.086 s ( 24%)        0.284 s ( 27%)        0.238 s ( 29%)        0.288 s ( 12%)
      log-prob + loss         0.007 s (  2%)        0.026 s (  3%)        0.014 s (  2%)        0.051 s (  2%)
      backward                0.175 s ( 48%)        0.652 s ( 62%)        0.478 s ( 59%)        0.688 s ( 29%)
      optimizer               0.079 s ( 22%)        0.075 s (  7%)        0.064 s (  8%)        0.071 s (  3%)
      other                   0.018 s (  5%)        0.014 s (  1%)        0.017 s (  2%)        0.064 s (  3%)
      step                    0.364 s               1.052 s               0.812 s               2.334 s
      (sft: SFT packed 2 rows x 1024 / padded 4 examples; dpo: 2 pairs, lengths 16..1024; grpo: beta 0.04,
       4 prompts x 8 x 64 new tokens)

The same command before this round of changes (same machine, the same day, run back to back):
step 0.780 / 1.757 / 2.465 / 4.408 s, of which log-prob + loss 0.140 / 0.396 / 0.754 / 1.486 s.
What changed, each kept because this table moved:
- the LM head runs only at labelled positions (trainers/scoring.py): prompts, padding and each
  row's last position get no logits. At a 32k vocabulary the head is 40-60% of these models'
  matmul work, so the forward and backward shrank with it (DPO, whose pairs are mostly padding
  and prompt, the most);
- the selective log-softmax works in 1 MiB chunks (was 64 MiB) and GRPO's entropy metric comes
  from the same pass instead of a second log-softmax over every logit ("log-prob + loss" and
  GRPO's "other", which held the old-policy and reference log-probs: 0.49 -> 0.06 s);
- generation asks for the last position's logits only (logits_to_keep=1; the prefill ran the
  head at every prompt position).
(DPO 2.47 -> 0.74 s is the head's saving; the 0.81 s in the table above is this run's.)
Backward is now most of every SFT and DPO step (48-62%), then the forward; the optimizer (AdamW
foreach) is 22% of a padded SFT step. With --ops (a run with the same code): aten::mm is half of
the operator time (49-60%), attention (sdpa's CPU flash kernels, forward and backward) 8-18%: on
packed rows it attends over the whole 1,024-token row under a block-diagonal mask. Generation
is the largest GRPO region (38%).
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from alignflow.trainers import configure_optimizer  # noqa: E402
from alignflow.trainers.dpo import DPOTrainer, collate_pairs  # noqa: E402
from alignflow.trainers.grpo import GRPOTrainer, collate_prompts  # noqa: E402
from alignflow.trainers.packing import pack_examples  # noqa: E402
from alignflow.trainers.sft import SFTTrainer, collate_causal_lm  # noqa: E402

from vs_trl_data import (MODEL_SIZES, as_alignflow_pair, build_tokenizer, dpo_texts, load_model,  # noqa: E402
                         save_model, sft_examples, tokenize_pairs)
from vs_trl_runs import completion_reward, grpo_prompts, no_eos_generate  # noqa: E402

REGIONS = ("data/collate", "generation", "reward", "reference fwd", "policy fwd", "log-prob + loss", "backward",
           "optimizer", "other")


class Timers:
    """Exclusive wall time per region: entering a region pauses the one it is inside."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [name, started]

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        if self.stack:
            top = self.stack[-1]
            self.totals[top[0]] += now - top[1]
        self.stack.append([name, now])

    def leave(self) -> None:
        now = time.perf_counter()
        name, started = self.stack.pop()
        self.totals[name] += now - started
        if self.stack:
            self.stack[-1][1] = now

    def wrap(self, fn, name: str):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            if self.stack and self.stack[-1][0] == "generation":  # its forwards are generation's
                return fn(*a, **k)
            self.enter(name)
            try:
                return fn(*a, **k)
            finally:
                self.leave()
        return wrapped


def instrument(trainer, timers: Timers, model, ref=None) -> None:
    model.forward = timers.wrap(model.forward, "policy fwd")
    if ref is not None:
        ref.forward = timers.wrap(ref.forward, "reference fwd")
    trainer.compute_loss = timers.wrap(trainer.compute_loss, "log-prob + loss")
    trainer.optimizer.step = timers.wrap(trainer.optimizer.step, "optimizer")


def timed_collate(collate, timers: Timers):
    return timers.wrap(collate, "data/collate")


def build(kind: str, args, model_dir: str, tok, timers: Timers):
    n = args.warmup + args.steps + 1
    common = dict(max_steps=n, log_interval=10 ** 6, device="cpu", seed=0, progress_bar=False, max_grad_norm=1.0,
                  precision="fp32")
    model = load_model(model_dir)
    optimizer = configure_optimizer(model, lr=1e-5, weight_decay=0.01)
    ref = None
    if kind.startswith("sft"):
        examples = sft_examples(int(1.1 * n * max(2 * 1024, 4 * 512)), 1024, args.vocab, tok.eos_token_id, 0)
        collate = timed_collate(functools.partial(collate_causal_lm, pad_id=tok.pad_token_id), timers)
        if kind == "sft-packed":
            loader = DataLoader(pack_examples(examples, 1024), batch_size=2, shuffle=False, collate_fn=collate)
        else:
            loader = DataLoader(examples, batch_size=4, shuffle=False, collate_fn=collate)
        trainer = SFTTrainer(model=model, optimizer=optimizer, train_loader=loader, **common)
    elif kind.startswith("dpo"):
        pairs = [as_alignflow_pair(p) for p in tokenize_pairs(dpo_texts(n * 2, 1024, args.vocab, 1), tok)]
        collate = timed_collate(functools.partial(collate_pairs, pad_id=tok.pad_token_id), timers)
        loader = DataLoader(pairs, batch_size=2, shuffle=False, collate_fn=collate)
        precompute = kind == "dpo-precomputed"
        ref = load_model(model_dir)
        trainer = DPOTrainer(model=model, ref_model=ref, optimizer=optimizer, train_loader=loader,
                             precompute_ref_log_probs=precompute, beta=0.1, loss_type="sigmoid", **common)
        if precompute:
            trainer.precompute_reference_logps()
            ref = None
    else:
        ns = argparse.Namespace(seed=0, warmup=n, steps=0, prompts=4, prompt_len=16)
        items = [{"prompt_input_ids": p} for p in grpo_prompts(ns, args.vocab)]
        collate = timed_collate(functools.partial(collate_prompts, pad_id=tok.pad_token_id), timers)
        loader = DataLoader(items, batch_size=4, shuffle=False, collate_fn=collate)
        ref = load_model(model_dir)
        reward = timers.wrap(completion_reward, "reward")
        reward.__name__ = "completion_reward"
        trainer = GRPOTrainer(model, ref, optimizer, loader, [reward], generate_fn=no_eos_generate(tok.eos_token_id),
                              tokenizer=tok, num_generations=8, max_completion_length=64, temperature=1.0,
                              beta=0.04, num_iterations=1, loss_type="dapo", **common)
        trainer.generate_fn = timers.wrap(trainer.generate_fn, "generation")
    instrument(trainer, timers, model, ref)
    return trainer


def profile(kind: str, args, model_dir: str, tok):
    """(seconds per step, {region: seconds per step}, profiler table or None)."""
    timers = Timers()
    trainer = build(kind, args, model_dir, tok, timers)
    step = trainer.training_step
    state = {"k": 0, "mark": None, "prof": None}
    original_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        timers.enter("backward")
        try:
            return original_backward(self, *a, **k)
        finally:
            timers.leave()

    def timed_step(micro):
        k = state["k"]
        if k == args.warmup + args.steps and args.ops:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].__enter__()
        out = step(micro)
        if k == args.warmup + args.steps and args.ops:
            state["prof"].__exit__(None, None, None)
        state["k"] = k + 1
        return out

    trainer.training_step = timers.wrap(timed_step, "other")
    torch.Tensor.backward = backward
    wall = {}
    inner_train_step = trainer.training_step

    def step_with_marks(micro):
        k = state["k"]
        out = inner_train_step(micro)
        if k == args.warmup - 1:  # the clock starts at the end of the warm-up step (the next batch's loading is in)
            timers.totals.clear()
            wall["start"] = time.perf_counter()
        if k == args.warmup + args.steps - 1:
            wall["end"] = time.perf_counter()
            wall["totals"] = dict(timers.totals)
        return out

    trainer.training_step = step_with_marks
    try:
        trainer.train()
    finally:
        torch.Tensor.backward = original_backward
    seconds = (wall["end"] - wall["start"]) / args.steps
    totals = {k: v / args.steps for k, v in wall["totals"].items()}
    # Time outside training_step (train()'s loop, the loader's own work beyond collate) is "other" too.
    totals["other"] = totals.get("other", 0.0) + seconds - sum(totals.values())
    table = None
    if state["prof"] is not None:
        table = state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops_rows,
                                                   max_name_column_width=48)
    return seconds, totals, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", choices=tuple(MODEL_SIZES), default="small")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps averaged")
    ap.add_argument("--only", default="sft-padded,sft-packed,dpo-precomputed,grpo")
    ap.add_argument("--ops", action="store_true", help="also torch.profiler's top operators over one more step")
    ap.add_argument("--ops-rows", type=int, default=8)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer(args.vocab)
    kinds = args.only.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="profile_steps-") as tmp:
        model_dir = os.path.join(tmp, "model")
        save_model("llama", args.model_size, args.vocab, 1024, tok, model_dir, 0)
        for kind in kinds:
            seconds, totals, ops = profile(kind, args, model_dir, tok)
            rows.append((kind, seconds, totals))
            if ops:
                print(f"\n{kind}: torch.profiler, one step, top operators by self CPU\n{ops}")
    print(f"\nalignflow step time by region, model '{args.model_size}', threads {torch.get_num_threads()}, "
          f"mean of {args.steps} steps after {args.warmup} warm-up (share of the step)")
    print(f"  {'region':16s}" + "".join(f"{kind:>22s}" for kind, _, _ in rows))
    for r in REGIONS:
        print(f"  {r:16s}" + "".join(f"{totals.get(r, 0.0):8.3f} s ({totals.get(r, 0.0) / seconds:4.0%})".rjust(22)
                                     for _, seconds, totals in rows))
    print(f"  {'step':16s}" + "".join(f"{seconds:8.3f} s       ".rjust(22) for _, seconds, _ in rows))
    print("  (sft: SFT packed 2 rows x 1024 / padded 4 examples; dpo: 2 pairs, lengths 16..1024; grpo: beta 0.04, "
          "4 prompts x 8 x 64 new tokens)")


if __name__ == "__main__":
    main()
