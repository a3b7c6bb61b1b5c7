"""A reward model's share of a GRPO step, in one run.

GRPOTrainer steps on a built-in preset model, twice over: rewarded by a function alone (the
distinct-token reward of bench/grpo_step.py), and by that function plus a reward model of the
policy's own shape (stages/reward_models.py's RewardModelScorer on a transformers
LlamaForSequenceClassification: the policy's body saved with models.save_pretrained and loaded
by models.hf_io.load_reward_model under a new random one-label head). The two trainers start
from the same weights and take their steps in turn (after a warm-up step each), so load from
other processes on the machine falls on both alike.

    python bench/reward_model_share.py [--preset tiny|gpt2-small] [--device cpu|cuda] [--steps N]
                                       [--prompts N] [--generations N] [--prompt-len N]
                                       [--new-tokens N] [--beta 0.04] [--rm-batch 32] [--threads N]

Shape defaults depend on the preset (gpt2-small on a CPU is slow): tiny 32 steps of 4 prompts x
8 generations, 16 prompt + 64 new tokens (bench/grpo_step.py's step shape); gpt2-small 4 steps of
2 prompts x 8 generations, 16 + 32 tokens. The shape used is printed.

What the shares are (GRPOTrainer.training_step / _rollout): "generation" is sampling the
completions (generate_fn, which also decodes them to text); "scoring" is the rest of the
rollout: decoding the prompts, every reward function (the reward model included: tokenising
prompt + completion, padding, its forward), the advantages, and the old-policy (num_iterations
> 1) and reference (beta > 0) log-prob passes; "optimisation" is the update(s). The reward
model's share of a step is reported three ways: its own calls' seconds (timed around the
scorer) / the step; (scoring seconds with it - without it) / the step with it; and step time
with it / without it.

Measured (machine: 2-core CPU, another job's tests running beside it, torch 2.13 CPU; --threads 1,
as two threads against that job made single steps 10-100x slower at random):

    python bench/reward_model_share.py --threads 1
    preset=tiny device=cpu params=1.1M (policy), 1.1M (reward model) steps=32 (+1 warm-up) prompts=4 generations=8 prompt=16 new=64 beta=0.04 rm_batch=32 threads=1 wall 38 s
    rewards                   step s generation  scoring optimisation scoring s compl. len
    function only              0.547      37.7%    13.5%        48.7%     0.074       62.8
    function + reward model    0.606      34.2%    21.7%        44.1%     0.132       63.4
    reward model's share of the step with it:
      its calls (timed around the scorer)    0.057 s    9.4%
      scoring seconds, with - without        0.058 s    9.5%
      step seconds, with / without           1.108
      scored per step: 32 sequences of 16 prompt + 63.4 completion + 1 EOS tokens (mean)

    python bench/reward_model_share.py --preset gpt2-small --threads 1
    preset=gpt2-small device=cpu params=123.6M (policy), 123.6M (reward model) steps=4 (+1 warm-up) prompts=2 generations=8 prompt=16 new=32 beta=0.04 rm_batch=32 threads=1 wall 135 s
    rewards                   step s generation  scoring optimisation scoring s compl. len
    function only             11.938      27.9%    16.7%        55.4%     1.999       32.0
    function + reward model   13.042      25.8%    24.5%        49.7%     3.194       32.0
    reward model's share of the step with it:
      its calls (timed around the scorer)    1.277 s    9.8%
      scoring seconds, with - without        1.195 s    9.2%
      step seconds, with / without           1.092
      scored per step: 16 sequences of 16 prompt + 32.0 completion + 1 EOS tokens (mean)

A reward model the policy's size costs about a tenth of the step on both presets (one no-grad
forward over the rollout, like the reference's: without the reward model, "scoring" is mostly
the reference pass, 0.074 s and 2.0 s); the three measures agree to within a point.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from transformers.utils import logging as hf_logging

from alignflow.models import LlamaForCausalLM, generate_text, get_preset, save_pretrained
from alignflow.models.hf_io import load_reward_model
from alignflow.stages.reward_models import BATCH, RewardModelScorer
from alignflow.trainers.grpo import GRPOTrainer, collate_prompts
from alignflow.trainers.reference import freeze_reference

from grpo_step import distinct_tokens  # bench/, beside this script
from timing import seconds

# steps, prompts, generations, prompt length, new tokens: a run of 1-4 minutes on 2 CPU cores
SHAPES = {"tiny": (32, 4, 8, 16, 64), "gpt2-small": (4, 2, 8, 16, 32)}
SHAPE_FLAGS = ("steps", "prompts", "generations", "prompt_len", "new_tokens")


class NumberTokenizer:
    """Ids as space-separated numbers, both ways: the policy decodes its samples with it and the
    reward model's scorer encodes prompt + completion back to the same ids. Adds no BOS."""
    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}


class Timed:
    """A reward function that adds up the seconds of its calls."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device, self.seconds = fn, device, 0.0
        self.__name__ = fn.__name__

    def __call__(self, prompts, completions, **columns):
        out = []
        self.seconds += seconds(lambda: out.append(self.fn(prompts, completions, **columns)), self.device)
        return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    for flag in SHAPE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, help="default: the preset's (see above)")
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight (0: no reference model)")
    parser.add_argument("--rm-batch", type=int, default=BATCH, help="sequences the reward model scores together")
    parser.add_argument("--threads", type=int, help="CPU threads (on a busy machine 1 can be much faster)")
    args = parser.parse_args()
    for flag, default in zip(SHAPE_FLAGS, SHAPES[args.preset]):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    config = get_preset(args.preset)
    torch.manual_seed(0)
    initial = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(initial, directory)
        torch.manual_seed(1)  # the new score head
        hf_logging.set_verbosity_error()  # not the load report's "score.weight MISSING": it is meant to be
        rm = freeze_reference(load_reward_model(directory, device))
    rm.config.pad_token_id = NumberTokenizer.pad_token_id
    tok = NumberTokenizer()
    scorer = Timed(RewardModelScorer("reward_model", rm, tok, device, batch=args.rm_batch), device)

    torch.manual_seed(2)
    # Ids 0 and 1 play PAD and EOS; an untrained model rarely samples EOS, so completions run
    # close to full length.
    items = [{"prompt_input_ids": torch.randint(2, config.vocab_size, (args.prompt_len,)).tolist()}
             for _ in range(args.prompts * (args.steps + 1))]

    def trainer(reward_funcs):
        model = LlamaForCausalLM(config)
        model.load_state_dict(initial.state_dict())
        ref = None
        if args.beta:
            ref = LlamaForCausalLM(config)
            ref.load_state_dict(initial.state_dict())
        loader = DataLoader(items, batch_size=args.prompts, collate_fn=lambda b: collate_prompts(b, pad_id=0))
        t = GRPOTrainer(model, ref, torch.optim.AdamW(model.parameters(), lr=1e-4), loader, reward_funcs,
                        generate_fn=generate_text, tokenizer=tok, num_generations=args.generations,
                        max_completion_length=args.new_tokens, beta=args.beta, device=device,
                        max_steps=args.steps + 1, progress_bar=False)
        return t, iter(loader)

    runs = {"function only": trainer([distinct_tokens]), "function + reward model": trainer([distinct_tokens, scorer])}
    params = initial.num_parameters() / 1e6
    keys = ("time/generation_share", "time/scoring_share", "time/optimization_share", "completion_length/mean")
    totals = {name: dict.fromkeys(keys + ("step_s",), 0.0) for name in runs}
    rm_seconds = 0.0
    started = time.perf_counter()
    for step in range(args.steps + 1):  # step 0 warms up: allocator, kernels, lazy init
        for name, (t, batches) in runs.items():
            batch, out = next(batches), []
            before = scorer.seconds
            s = seconds(lambda: out.append(t.training_step([batch])), device)
            if step == 0:
                continue
            totals[name]["step_s"] += s / args.steps
            for k in keys:
                totals[name][k] += out[0][k] / args.steps
            if name != "function only":
                rm_seconds += (scorer.seconds - before) / args.steps

    n = args.prompts * args.generations
    print(f"preset={args.preset} device={device} params={params:.1f}M (policy), "
          f"{rm.num_parameters() / 1e6:.1f}M (reward model) "
          f"steps={args.steps} (+1 warm-up) prompts={args.prompts} generations={args.generations} "
          f"prompt={args.prompt_len} new={args.new_tokens} beta={args.beta} rm_batch={args.rm_batch} "
          f"threads={torch.get_num_threads()} wall {time.perf_counter() - started:.0f} s")
    print(f"{'rewards':<24} {'step s':>7} {'generation':>10} {'scoring':>8} {'optimisation':>12} "
          f"{'scoring s':>9} {'compl. len':>10}")
    for name, r in totals.items():
        print(f"{name:<24} {r['step_s']:>7.3f} {r['time/generation_share']:>10.1%} {r['time/scoring_share']:>8.1%} "
              f"{r['time/optimization_share']:>12.1%} {r['time/scoring_share'] * r['step_s']:>9.3f} "
              f"{r['completion_length/mean']:>10.1f}")
    without, with_rm = totals["function only"], totals["function + reward model"]
    scoring_s = {name: r["time/scoring_share"] * r["step_s"] for name, r in totals.items()}
    extra_scoring = scoring_s["function + reward model"] - scoring_s["function only"]
    print(f"reward model's share of the step with it:\n"
          f"  its calls (timed around the scorer)  {rm_seconds:7.3f} s  {rm_seconds / with_rm['step_s']:6.1%}\n"
          f"  scoring seconds, with - without      {extra_scoring:7.3f} s  {extra_scoring / with_rm['step_s']:6.1%}\n"
          f"  step seconds, with / without         {with_rm['step_s'] / without['step_s']:7.3f}\n"
          f"  scored per step: {n} sequences of {args.prompt_len} prompt + "
          f"{with_rm['completion_length/mean']:.1f} completion + 1 EOS tokens (mean)")

if __name__ == "__main__":
    main()
